"""Write a complete ShapesWorld dataset: images, scene graphs and every LLaVA / CLIP / UTA file."""

from __future__ import annotations

import csv
import json
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from llava_uta.constants import DEFAULT_IMAGE_TOKEN
from llava_uta.data.shapes import language as lang
from llava_uta.data.shapes.scene import (
    CODE_SIDE,
    COLORS,
    FACTS,
    GRIDS,
    SHAPES,
    largest_object,
    render,
    render_symbolic,
    sample_scene,
    scene_key,
    shape_variants,
)
from llava_uta.io_utils import atomic_dir

FORMAT_VERSION = 4
BENCH_DIR = "eval/llava-bench-shapes"
BENCH_CATEGORIES = ("conv", "detail", "complex")
GROUNDING_DIR = "eval/grounding"
# Stage-2 mix, as in LLaVA-1.5: Instruct-150K's three kinds plus short-answer VQA ("single word or phrase").
STAGE2_MIX = {"conv": 0.3, "short": 0.3, "detail": 0.15, "complex": 0.25}


@dataclass
class ShapesWorldConfig:
    """Sizes of every split. The defaults keep the whole later pipeline to minutes on 2 CPU cores."""

    seed: int = 0
    image_size: int = 64
    grid: int = 2  # objects sit in the cells of a grid x grid layout (2 or 3); fewer cells, larger objects
    num_clip: int = 20000  # image-caption pairs for training the teacher CLIP
    clip_group_size: int = 4  # consecutive CLIP rows differ only in shapes (hard negatives); 1 = independent
    clip_single_percent: int = 75  # share of CLIP scenes with one object (the others have 2-4, equally often)
    num_pretrain: int = 20000  # unlabeled images for UTA pre-training (ImageFolder layout)
    num_zeroshot_per_class: int = 20  # single-object images per colour+shape class
    num_stage1: int = 10000  # LLaVA stage-1 caption samples (on the CLIP images)
    num_stage2: int = 8000  # LLaVA stage-2 instruction samples (on the pre-training images)
    num_text_instruct: int = 16000  # text-only instruction samples for the LLM (scenes in words, no image)
    num_bench_images: int = 30
    questions_per_bench_image: int = 2
    num_grounding_images: int = 100  # held-out images with short-answer questions of every kind + a description
    symbolic: bool = False  # images show each scene graph as a code for the symbolic tower (diagnostic), no drawing

    def validate(self) -> None:
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32 px, got {self.image_size}")
        if self.grid not in GRIDS:
            raise ValueError(f"grid must be one of {GRIDS}, got {self.grid}")
        if self.symbolic and self.image_size < 2 * self.grid * CODE_SIDE:
            raise ValueError(f"a symbolic world needs image_size of at least {2 * self.grid * CODE_SIDE} px "
                             f"(2 px per code square), got {self.image_size}")
        if not 0 <= self.clip_single_percent <= 100:
            raise ValueError(f"clip_single_percent must be in 0..100, got {self.clip_single_percent}")
        if self.clip_single_percent and self.clip_group_size > len(SHAPES):
            raise ValueError(f"clip_group_size ({self.clip_group_size}) cannot exceed the {len(SHAPES)} shape variants "
                             "of a one-object scene; lower it or set clip_single_percent to 0")
        for name in (
            "num_clip", "clip_group_size",
            "num_pretrain",
            "num_zeroshot_per_class",
            "num_bench_images",
            "questions_per_bench_image",
            "num_grounding_images",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_text_instruct < 0:
            raise ValueError(f"num_text_instruct must be at least 0, got {self.num_text_instruct}")
        if self.num_stage1 > self.num_clip:
            raise ValueError(f"num_stage1 ({self.num_stage1}) cannot exceed num_clip ({self.num_clip})")
        if self.num_stage2 > self.num_pretrain:
            raise ValueError(f"num_stage2 ({self.num_stage2}) cannot exceed num_pretrain ({self.num_pretrain})")


def class_folder(color: str, shape: str) -> str:
    return f"{color}_{shape}"


def split_rng(seed: int, split: str) -> random.Random:
    """An independent, reproducible random stream per split (string seeds are stable across runs)."""
    return random.Random(f"shapesworld-{seed}-{split}")


def sample_unique_scenes(rng: random.Random, n: int, size: int, grid: int, exclude: set,
                         exclude_single: bool = False) -> list:
    """`n` scenes whose keys are not in `exclude` (and, with exclude_single, have at least two objects)."""
    scenes = []
    while len(scenes) < n:
        scene = sample_scene(rng, size, num_objects=rng.choice((2, 3, 4)) if exclude_single else None, grid=grid)
        if scene_key(scene) not in exclude:
            scenes.append(scene)
    return scenes


def sample_scene_groups(rng: random.Random, n: int, size: int, grid: int, exclude: set, group_size: int,
                        single_percent: int) -> list:
    """`n` scenes in consecutive groups of `group_size` shape variants, none of them in `exclude`; a group has
    one object with probability `single_percent` %, else 2-4."""
    scenes = []
    while len(scenes) < n:
        num_objects = 1 if rng.random() * 100 < single_percent else rng.choice((2, 3, 4))
        scene = sample_scene(rng, size, num_objects=num_objects, grid=grid)
        group = [s for s in shape_variants(scene, rng, group_size) if scene_key(s) not in exclude]
        if len(group) == group_size:
            scenes += group
    return scenes[:n]


def _render_to(job: tuple[dict, str, bool]) -> None:
    scene, path, symbolic = job
    (render_symbolic if symbolic else render)(scene).save(path, format="PNG")


def write_images(root: Path, scenes: list[dict], workers: int, symbolic: bool = False) -> None:
    for scene in scenes:
        (root / scene["image"]).parent.mkdir(parents=True, exist_ok=True)
    jobs = [(s, str(root / s["image"]), symbolic) for s in scenes]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_render_to, jobs, chunksize=256))
    else:
        for job in jobs:
            _render_to(job)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def human_turn(question: str, rng: random.Random, first: bool) -> dict:
    """A human turn; the first one carries the image token before or after the text, as in LLaVA's data."""
    if not first:
        return {"from": "human", "value": question}
    value = f"{DEFAULT_IMAGE_TOKEN}\n{question}" if rng.random() < 0.5 else f"{question}\n{DEFAULT_IMAGE_TOKEN}"
    return {"from": "human", "value": value}


def stage1_records(scenes: list[dict], rng: random.Random) -> list[dict]:
    """LLaVA-Pretrain (CC-3M-595K) format: one brief-description request and its caption."""
    return [
        {
            "id": Path(s["image"]).stem,
            "image": s["image"],
            "conversations": [
                human_turn(rng.choice(lang.BRIEF_PROMPTS), rng, first=True),
                {"from": "gpt", "value": lang.caption(s, rng, prefix=False)},
            ],
        }
        for s in scenes
    ]


def stage2_questions(scene: dict, rng: random.Random) -> tuple[str, list[lang.QA]]:
    """One instruction sample's kind (drawn from STAGE2_MIX) and its questions with their answers."""
    kind = rng.choices(list(STAGE2_MIX), weights=list(STAGE2_MIX.values()))[0]
    if kind == "conv":
        return kind, lang.conversation(scene, rng, turns=rng.randint(2, 4))
    if kind == "short":
        return kind, lang.short_conversation(scene, rng, turns=rng.randint(2, 4))
    if kind == "detail":
        return kind, [lang.detail_question(scene, rng)]
    return kind, [lang.complex_question(scene, rng)]


def stage2_records(scenes: list[dict], rng: random.Random) -> list[dict]:
    """LLaVA-Instruct-150K format: conversations, short-answer VQA, detailed descriptions, complex reasoning."""
    records = []
    for s in scenes:
        kind, qas = stage2_questions(s, rng)
        turns = []
        for i, qa in enumerate(qas):
            turns += [human_turn(qa.question, rng, first=i == 0), {"from": "gpt", "value": qa.answer}]
        records.append({"id": f"{Path(s['image']).stem}_{kind}", "image": s["image"], "conversations": turns})
    return records


def text_instruct_records(scenes: list[dict], rng: random.Random) -> list[dict]:
    """Text-only instruction data for the LLM before it meets images, as Vicuna's conversations are for LLaVA's: the
    stage-2 kinds of sample, with the scene's detailed description in words where the image would be."""
    records = []
    for j, s in enumerate(scenes):
        kind, qas = stage2_questions(s, rng)
        turns = []
        for i, qa in enumerate(qas):
            question = f"{lang.detailed_description(s)}\n{qa.question}" if i == 0 else qa.question
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": qa.answer}]
        records.append({"id": f"text{j:06d}_{kind}", "conversations": turns})
    return records


def bench_files(scenes: list[dict], rng: random.Random, per_image: int) -> dict[str, list[dict]]:
    """LLaVA-Bench (In-the-Wild) layout: questions, reference answers, context, plus the ground truth."""
    questions, answers, context, truth = [], [], [], []
    for i, s in enumerate(scenes):
        image = Path(s["image"]).name
        context.append({"image": image, "caption": lang.detailed_description(s)})
        for j in range(per_image):
            qid = len(questions)
            category = BENCH_CATEGORIES[(i * per_image + j) % len(BENCH_CATEGORIES)]
            if category == "conv":
                qa = rng.choice(lang.CONVERSATION_QUESTIONS)(s, rng)
            elif category == "detail":
                qa = lang.detail_question(s, rng)
            else:
                qa = lang.complex_question(s, rng)
            questions.append({"question_id": qid, "image": image, "text": qa.question, "category": category})
            answers.append(
                {
                    "question_id": qid,
                    "text": qa.answer,
                    "category": category,
                    "answer_id": f"ref-{qid}",
                    "model_id": "shapesworld-reference",
                    "metadata": {},
                }
            )
            truth.append(
                {
                    "question_id": qid,
                    "image": image,
                    "category": category,
                    "kind": qa.kind,
                    "facts": qa.facts,
                    "scene": s,
                }
            )
    return {
        "questions.jsonl": questions,
        "answers_gpt4.jsonl": answers,
        "context.jsonl": context,
        "ground_truth.jsonl": truth,
    }


def grounding_questions(scenes: list[dict], rng: random.Random) -> list[dict]:
    """Per held-out image: one short-answer question of every kind it supports, then a detailed description.

    Each row carries its short reference answer and the fact it checks (`llava-uta-bench grounding` scores them).
    """
    rows = []
    for s in scenes:
        image = Path(s["image"]).name
        qas = [lang.short_question(k, s, rng) for k in lang.short_kinds(s)] + [lang.detail_question(s, rng)]
        for qa in qas:
            rows.append({"question_id": len(rows), "image": image, "text": qa.question, "kind": qa.kind,
                         "answer": qa.answer, "facts": qa.facts})
    return rows


def generate(cfg: ShapesWorldConfig, out: Path, workers: int = 2) -> dict[str, int]:
    """Write the whole world into `out` and return what was written, with counts.

    `workers` rendering processes share the images; the output does not depend on their number.
    """
    cfg.validate()
    size, grid = cfg.image_size, cfg.grid

    # The bench comes first: its scenes are excluded from every training split.
    bench = sample_unique_scenes(split_rng(cfg.seed, "bench"), cfg.num_bench_images, size, grid, set(),
                                exclude_single=True)
    for i, s in enumerate(bench):
        s["image"] = f"{BENCH_DIR}/images/{i:03d}.png"
    bench_keys = {scene_key(s) for s in bench}
    grounding = sample_unique_scenes(split_rng(cfg.seed, "grounding"), cfg.num_grounding_images, size, grid,
                                     bench_keys)
    for i, s in enumerate(grounding):
        s["image"] = f"{GROUNDING_DIR}/images/{i:03d}.png"
    bench_keys |= {scene_key(s) for s in grounding}  # no held-out scene appears in any training split
    clip = sample_scene_groups(split_rng(cfg.seed, "clip"), cfg.num_clip, size, grid, bench_keys,
                               cfg.clip_group_size, cfg.clip_single_percent)
    for i, s in enumerate(clip):
        s["image"] = f"clip/images/{i:06d}.png"
    pretrain = sample_unique_scenes(split_rng(cfg.seed, "pretrain"), cfg.num_pretrain, size, grid, bench_keys)
    for i, s in enumerate(pretrain):
        top = largest_object(s)
        s["image"] = f"pretrain/train/{class_folder(top['color'], top['shape'])}/{i:06d}.png"

    zs_rng = split_rng(cfg.seed, "zeroshot")
    classes = sorted((class_folder(c, s), c, s) for c in COLORS for s in SHAPES)
    zeroshot = []
    for folder, color, shape in classes:
        for k in range(cfg.num_zeroshot_per_class):
            scene = sample_scene(zs_rng, size, num_objects=1, color=color, shape=shape, grid=grid)
            scene["image"] = f"zeroshot/val/{folder}/{k:04d}.png"
            zeroshot.append(scene)

    scenes = bench + grounding + clip + pretrain + zeroshot
    write_images(out, scenes, workers, cfg.symbolic)
    write_jsonl(
        out / "scenes.jsonl", [{"image": s["image"], **{k: v for k, v in s.items() if k != "image"}} for s in scenes]
    )

    caption_rng = split_rng(cfg.seed, "captions")
    captions = [(Path(s["image"]).relative_to("clip").as_posix(), lang.caption(s, caption_rng)) for s in clip]
    with open(out / "clip/captions.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["filepath", "title"])
        writer.writerows(captions)

    write_json(out / "zeroshot/classnames.json", [f"{c} {s}" for _, c, s in classes])
    write_json(out / "zeroshot/templates.json", list(lang.ZEROSHOT_TEMPLATES))

    stage1 = stage1_records(clip[: cfg.num_stage1], split_rng(cfg.seed, "stage1"))
    stage2 = stage2_records(pretrain[: cfg.num_stage2], split_rng(cfg.seed, "stage2"))
    write_json(out / "llava/pretrain.json", stage1)
    write_json(out / "llava/instruct.json", stage2)
    text_scenes = sample_unique_scenes(split_rng(cfg.seed, "text-instruct"), cfg.num_text_instruct, size, grid,
                                       bench_keys)  # never rendered: the LLM reads them in words
    text_instruct = text_instruct_records(text_scenes, split_rng(cfg.seed, "text-instruct-questions"))
    write_json(out / "llava/text_instruct.json", text_instruct)

    bench_out = bench_files(bench, split_rng(cfg.seed, "bench-questions"), cfg.questions_per_bench_image)
    for name, rows in bench_out.items():
        write_jsonl(out / BENCH_DIR / name, rows)
    grounding_rows = grounding_questions(grounding, split_rng(cfg.seed, "grounding-questions"))
    write_jsonl(out / GROUNDING_DIR / "questions.jsonl", grounding_rows)

    corpus = [t for _, t in captions]
    corpus += [
        turn["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip() for r in stage1 + stage2 for turn in r["conversations"]
    ]
    (out / "text").mkdir()
    (out / "text/corpus.txt").write_text("\n".join(corpus) + "\n")

    counts = {
        "clip/images": len(clip),
        "clip/captions.csv": len(captions),
        "pretrain/train": len(pretrain),
        "pretrain classes": len({Path(s["image"]).parent.name for s in pretrain}),
        "zeroshot/val": len(zeroshot),
        "zeroshot classes": len(classes),
        "llava/pretrain.json": len(stage1),
        "llava/instruct.json": len(stage2),
        "llava/text_instruct.json": len(text_instruct),
        f"{BENCH_DIR}/images": len(bench),
        f"{BENCH_DIR}/questions.jsonl": len(bench_out["questions.jsonl"]),
        f"{GROUNDING_DIR}/images": len(grounding),
        f"{GROUNDING_DIR}/questions.jsonl": len(grounding_rows),
        "text/corpus.txt lines": len(corpus),
        "scenes.jsonl": len(scenes),
    }
    manifest = {"format_version": FORMAT_VERSION, "config": asdict(cfg), "counts": counts}
    if cfg.symbolic:  # how the images are drawn: what the symbolic tower reads back
        manifest["symbolic_code"] = {"facts": list(FACTS), "code_side": CODE_SIDE}
    write_json(out / "manifest.json", manifest)
    return counts


def config_matches(out: Path, cfg: ShapesWorldConfig) -> bool:
    """True when `out` holds a finished world made with this config."""
    manifest = out / "manifest.json"
    if not manifest.is_file():
        return False
    saved = json.loads(manifest.read_text())
    return saved.get("format_version") == FORMAT_VERSION and saved.get("config") == asdict(cfg)


def build(cfg: ShapesWorldConfig, out: Path, overwrite: bool = False, workers: int = 2) -> tuple[dict[str, int], bool]:
    """Generate into a temporary sibling folder and move it into place, so `out` is never half-written.

    Returns (counts, reused): an existing world made with the same config is reused as is.
    """
    out = Path(out)
    if config_matches(out, cfg):
        return json.loads((out / "manifest.json").read_text())["counts"], True
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out} already holds other data (no manifest.json with this config); "
            "pass --overwrite to replace it or choose another --out"
        )
    with atomic_dir(out) as tmp:
        counts = generate(cfg, tmp, workers)
    return counts, False
