"""ShapesWorld: determinism, LLaVA / CLIP formats, ground truth against pixels, no train/bench leakage."""

import csv
import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llava_uta.constants import DEFAULT_IMAGE_TOKEN
from llava_uta.data.shapes import ShapesWorldConfig, build
from llava_uta.data.shapes import language as lang
from llava_uta.data.shapes.__main__ import main as shapes_main
from llava_uta.data.shapes.scene import COLORS, SHAPES, largest_object, sample_scene, scene_key
from llava_uta.data.shapes.writer import BENCH_DIR, GROUNDING_DIR, sample_scene_groups

SMALL = dict(num_clip=80, num_pretrain=80, num_zeroshot_per_class=2, num_stage1=40, num_stage2=60,
             num_bench_images=30, questions_per_bench_image=2, num_grounding_images=12, num_text_instruct=50)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "shapes"
    build(ShapesWorldConfig(seed=0, **SMALL), out, workers=2)
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(world, tmp_path):
    again = tmp_path / "again"
    build(ShapesWorldConfig(seed=0, **SMALL), again, workers=1)  # the worker count must not matter
    assert digest(again) == digest(world)


def test_different_seed_gives_different_scenes(world, tmp_path):
    other = tmp_path / "other"
    build(ShapesWorldConfig(seed=1, **SMALL), other)
    keys0 = [scene_key(s) for s in read_jsonl(world / "scenes.jsonl")]
    keys1 = [scene_key(s) for s in read_jsonl(other / "scenes.jsonl")]
    assert len(keys0) == len(keys1)
    assert sum(a != b for a, b in zip(keys0, keys1, strict=True)) > 0.8 * len(keys0)


def test_rebuild_is_reused_and_foreign_data_is_protected(world, tmp_path, capsys):
    counts, reused = build(ShapesWorldConfig(seed=0, **SMALL), world, workers=1)
    assert reused and counts["clip/images"] == SMALL["num_clip"]
    with pytest.raises(FileExistsError, match="--overwrite"):
        build(ShapesWorldConfig(seed=3, **SMALL), world)
    assert (world / "manifest.json").is_file()  # nothing lost
    out = tmp_path / "cli"
    shapes_main(["--out", str(out), "--seed", "2", "--num-clip", "20", "--num-pretrain", "20",
                 "--num-stage1", "10", "--num-stage2", "10", "--num-bench-images", "4"])
    printed = capsys.readouterr().out
    assert "clip/images" in printed and "20" in printed
    assert not (tmp_path / ".cli.partial").exists()
    with pytest.raises(SystemExit, match="cannot exceed"):
        shapes_main(["--out", str(tmp_path / "bad"), "--num-clip", "5", "--num-stage1", "10"])


def test_ground_truth_matches_pixels(world):
    scenes = read_jsonl(world / "scenes.jsonl")
    assert len(scenes) == 80 + 80 + 48 * 2 + 30 + 12
    for scene in random.Random(0).sample(scenes, 60):
        pixels = np.asarray(Image.open(world / scene["image"]).convert("RGB"))
        assert pixels.shape == (64, 64, 3)
        for obj in scene["objects"]:
            x, y = (int(v) for v in obj["center"])
            assert tuple(pixels[y, x]) == COLORS[obj["color"]], (scene["image"], obj)
        n = scene["grid"]
        empty = [(r, c) for r in range(n) for c in range(n)
                 if not any((o["row"], o["col"]) == (r, c) for o in scene["objects"])]
        for r, c in empty:  # an empty cell shows only background (dark, never an object colour)
            centre = pixels[int((r + 0.5) * 64 / n), int((c + 0.5) * 64 / n)]
            assert centre.max() < 100


def test_pretrain_imagefolder_and_zeroshot_split(world):
    scenes = {s["image"]: s for s in read_jsonl(world / "scenes.jsonl")}
    pretrain = sorted((world / "pretrain/train").rglob("*.png"))
    assert len(pretrain) == 80
    for path in pretrain:
        top = largest_object(scenes[path.relative_to(world).as_posix()])
        assert path.parent.name == f"{top['color']}_{top['shape']}"
    folders = sorted(p.name for p in (world / "zeroshot/val").iterdir())
    classnames = json.loads((world / "zeroshot/classnames.json").read_text())
    assert len(folders) == len(classnames) == len(COLORS) * len(SHAPES) == 48
    assert [f.replace("_", " ") for f in folders] == classnames
    for folder in folders:
        images = list((world / "zeroshot/val" / folder).glob("*.png"))
        assert len(images) == 2
        for image in images:
            (obj,) = scenes[image.relative_to(world).as_posix()]["objects"]
            assert f"{obj['color']}_{obj['shape']}" == folder
    templates = json.loads((world / "zeroshot/templates.json").read_text())
    assert all(t.count("{}") == 1 for t in templates)


def test_clip_captions_csv_names_every_object(world):
    scenes = {s["image"]: s for s in read_jsonl(world / "scenes.jsonl")}
    with open(world / "clip/captions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 80 and list(rows[0]) == ["filepath", "title"]
    for row in rows:
        assert (world / "clip" / row["filepath"]).is_file()
        scene = scenes[f"clip/{row['filepath']}"]
        for obj in scene["objects"]:
            assert obj["color"] in row["title"] and obj["shape"] in row["title"]


def check_conversation(record: dict, exactly_two: bool) -> None:
    assert set(record) == {"id", "image", "conversations"}
    turns = record["conversations"]
    assert len(turns) >= 2 and len(turns) % 2 == 0
    if exactly_two:
        assert len(turns) == 2
    for i, turn in enumerate(turns):
        assert set(turn) == {"from", "value"}
        assert turn["from"] == ("human" if i % 2 == 0 else "gpt")
        assert turn["value"].strip()
        assert turn["value"].count(DEFAULT_IMAGE_TOKEN) == (1 if i == 0 else 0)
    first = turns[0]["value"]
    assert first.startswith(DEFAULT_IMAGE_TOKEN + "\n") or first.endswith("\n" + DEFAULT_IMAGE_TOKEN)


def test_llava_stage1_and_stage2_records(world):
    stage1 = json.loads((world / "llava/pretrain.json").read_text())
    stage2 = json.loads((world / "llava/instruct.json").read_text())
    assert len(stage1) == 40 and len(stage2) == 60
    for record in stage1:
        check_conversation(record, exactly_two=True)
        assert record["image"].startswith("clip/images/") and (world / record["image"]).is_file()
    for record in stage2:
        check_conversation(record, exactly_two=False)
        assert record["image"].startswith("pretrain/train/") and (world / record["image"]).is_file()
    ids = [r["id"] for r in stage1 + stage2]
    assert len(set(ids)) == len(ids)
    kinds = {r["id"].rsplit("_", 1)[1] for r in stage2}
    assert kinds == {"conv", "short", "detail", "complex"}
    assert len({r["conversations"][0]["value"] for r in stage2}) > 30  # varied phrasings, not one template


def test_text_instruct_writes_the_scene_in_words_where_the_image_would_be(world):
    records = json.loads((world / "llava/text_instruct.json").read_text())
    assert len(records) == 50 and len({r["id"] for r in records}) == 50
    assert {r["id"].rsplit("_", 1)[1] for r in records} == {"conv", "short", "detail", "complex"}
    held_out = {lang.detailed_description(s) for s in read_jsonl(world / "scenes.jsonl")
                if s["image"].startswith("eval/")}
    for record in records:
        assert set(record) == {"id", "conversations"}  # no image: the LLM reads the scene
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and all(t["value"] for t in turns)
        assert not any(DEFAULT_IMAGE_TOKEN in t["value"] for t in turns)
        description, question = turns[0]["value"].split("\n", 1)
        assert description.startswith("The image shows ") and description not in held_out
        assert question.strip()


def test_bench_layout_and_no_leakage(world):
    bench = world / BENCH_DIR
    questions = read_jsonl(bench / "questions.jsonl")
    answers = read_jsonl(bench / "answers_gpt4.jsonl")
    context = read_jsonl(bench / "context.jsonl")
    truth = read_jsonl(bench / "ground_truth.jsonl")
    images = sorted(p.name for p in (bench / "images").glob("*.png"))
    assert len(questions) == 60 and len(images) == 30
    assert {q["category"] for q in questions} == {"conv", "detail", "complex"}
    for q, a, t in zip(questions, answers, truth, strict=True):
        assert set(q) == {"question_id", "image", "text", "category"}
        assert q["question_id"] == a["question_id"] == t["question_id"]
        assert {"question_id", "text", "answer_id", "model_id", "metadata"} <= set(a)
        assert q["image"] in images and t["scene"]["image"].endswith(q["image"])
    assert sorted(c["image"] for c in context) == images and all(c["caption"] for c in context)

    bench_keys = {scene_key(t["scene"]) for t in truth}
    training = [s for s in read_jsonl(world / "scenes.jsonl") if not s["image"].startswith(BENCH_DIR)]
    assert not bench_keys & {scene_key(s) for s in training}
    bench_hashes = {hashlib.sha256((bench / "images" / i).read_bytes()).hexdigest() for i in images}
    train_files = [world / s["image"] for s in training]
    assert not bench_hashes & {hashlib.sha256(p.read_bytes()).hexdigest() for p in train_files}
    referenced = json.loads((world / "llava/instruct.json").read_text()) + \
        json.loads((world / "llava/pretrain.json").read_text())
    assert not any(r["image"].startswith("eval/") for r in referenced)
    corpus = (world / "text/corpus.txt").read_text()
    assert DEFAULT_IMAGE_TOKEN not in corpus
    assert lang.detailed_description(truth[0]["scene"]) not in corpus


def test_grounding_split_is_held_out_and_asks_every_kind(world):
    grounding = world / GROUNDING_DIR
    rows = read_jsonl(grounding / "questions.jsonl")
    images = {p.name for p in (grounding / "images").glob("*.png")}
    assert len(images) == 12 and {r["image"] for r in rows} == images
    assert {r["kind"] for r in rows} == {"color", "shape", "count", "position", "existence", "relation", "detail"}
    assert [r["question_id"] for r in rows] == list(range(len(rows)))
    scenes = read_jsonl(world / "scenes.jsonl")
    held_out = {scene_key(s) for s in scenes if s["image"].startswith(GROUNDING_DIR)}
    training = [s for s in scenes if not s["image"].startswith("eval/")]
    assert len(held_out) > 1 and not held_out & {scene_key(s) for s in training}


SCENE = {"grid": 3, "objects": [
    {"shape": "circle", "color": "red", "size": "large", "row": 0, "col": 0, "position": "top left"},
    {"shape": "circle", "color": "red", "size": "small", "row": 2, "col": 2, "position": "bottom right"},
    {"shape": "square", "color": "blue", "size": "small", "row": 1, "col": 2, "position": "right"},
]}


def test_language_is_consistent_with_a_hand_made_scene():
    big, small, square = SCENE["objects"]
    assert lang.describe(square, SCENE) == "square"
    assert lang.describe(big, SCENE) == "large red circle"
    assert lang.where("top left") == "in the top left corner" and lang.where("right") == "on the right"
    rng = random.Random(0)
    for _ in range(200):
        qa = lang.ask_relation(SCENE, rng)
        subject = qa.question.split("the ", 1)[1]
        if subject.startswith("large red circle above"):
            assert qa.facts == {"answer": "yes"}
        if subject.startswith("square to the left of the large red circle"):
            assert qa.facts == {"answer": "no"}
        qa = lang.ask_count(SCENE, rng)
        expected = {"How many objects are there?": 3, "How many circles can you see?": 2,
                    "How many blue objects are there?": 1}
        if qa.question in expected:
            assert qa.facts["count"] == expected[qa.question]
        qa = lang.ask_existence(SCENE, rng)
        present = any(f"a {o['color']} {o['shape']}" in qa.question for o in SCENE["objects"])
        assert qa.facts["answer"] == ("yes" if present else "no")
    assert lang.ask_same_color(SCENE, rng).facts == {"answer": "no"}
    assert lang.detailed_description(SCENE).startswith("The image shows three objects")


def test_clip_rows_come_in_groups_of_shape_variants(world):
    clip = [s for s in read_jsonl(world / "scenes.jsonl") if s["image"].startswith("clip/")]
    group = ShapesWorldConfig().clip_group_size
    assert group > 1 and len(clip) % group == 0
    for start in range(0, len(clip), group):
        members = clip[start:start + group]
        layouts = {tuple((o["row"], o["col"], o["color"], o["size"]) for o in s["objects"]) for s in members}
        assert len(layouts) == 1  # same cells, colours and sizes ...
        assert len({scene_key(s) for s in members}) == group  # ... but every member has other shapes


@pytest.mark.parametrize("grid,positions", [
    (2, {"top left", "top right", "bottom left", "bottom right"}),
    (3, {"top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"}),
])
def test_the_grid_sets_cells_names_and_object_sizes(grid, positions):
    rng = random.Random(0)
    scenes = [sample_scene(rng, 64, grid=grid) for _ in range(300)]
    objects = [o for s in scenes for o in s["objects"]]
    assert {o["position"] for o in objects} == positions
    assert all(s["grid"] == grid and len(s["objects"]) <= 4 for s in scenes)
    # a large object's radius is 48 % of its cell: 10.24 px on the 3x3 grid, 15.36 px on the 2x2 one
    assert {o["radius"] for o in objects} == {round(0.48 * 64 / grid, 2), round(0.33 * 64 / grid, 2)}
    for o in objects:  # every object stays inside its cell
        x0, y0, x1, y1 = o["bbox"]
        side = 64 / grid
        assert o["col"] * side <= x0 and x1 <= (o["col"] + 1) * side
        assert o["row"] * side <= y0 and y1 <= (o["row"] + 1) * side
    rows = {"top", "bottom"} if grid == 2 else {"top", "middle", "bottom"}
    for _ in range(50):  # the relation explanations name the scene's own rows and columns
        scene = next(s for s in scenes if len(s["objects"]) > 1)
        answer = lang.ask_relation(scene, rng).answer
        assert grid == 3 or "middle" not in answer and "center" not in answer
        if " row " in answer:
            assert set(answer.split(" row")[0].split()) & rows


def test_clip_single_percent_sets_the_share_of_one_object_groups():
    for percent, low, high in ((0, 0.0, 0.0), (75, 0.68, 0.82), (100, 1.0, 1.0)):
        scenes = sample_scene_groups(random.Random(0), 1600, 64, 2, set(), 4, percent)
        singles = [len(scenes[i]["objects"]) == 1 for i in range(0, len(scenes), 4)]
        assert low <= sum(singles) / len(singles) <= high, percent
    for bad, match in ((dict(grid=4), "grid must be one of"), (dict(clip_single_percent=101), "0..100"),
                       (dict(clip_group_size=7), "cannot exceed the 6 shape variants")):
        with pytest.raises(ValueError, match=match):
            ShapesWorldConfig(**bad).validate()
