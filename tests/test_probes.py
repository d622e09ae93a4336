"""Probing frozen towers: the linear probe, ShapesWorld patch labels, tower loaders, and both CLIs end to end."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from transformers import AutoModel

from llava_uta.data.image_folder import ImageDataError, checked_image_folder, limit_per_class
from llava_uta.data.shapes.scene import COLORS, render, sample_scene
from llava_uta.eval.probe.data import BACKGROUND, PatchLabels, ProbeDataError, label_patches, patch_labels
from llava_uta.eval.probe.linear import fit_linear_probe, majority_chance
from llava_uta.eval.probe.linprobe import main as linprobe_main
from llava_uta.eval.probe.patchprobe import main as patchprobe_main
from llava_uta.eval.probe.patchprobe import merged_index, neighbourhoods, patch_selector
from llava_uta.eval.probe.towers import load_tower, parse_tower
from llava_uta.model.checkpoint import save_uta_vit
from llava_uta.model.convert import convert
from llava_uta.model.model_source import ModelSource
from llava_uta.model.open_clip_tower import convert_open_clip
from llava_uta.model.uta_vit import build_uta_vit
from pretrain.train_clip import save_local_dir

OPEN_CLIP_CFG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}
COMMON = ["--workers", "0", "--device", "cpu", "--batch-size", "32"]


@pytest.fixture(scope="module")
def world(tiny_world) -> Path:
    return tiny_world


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    """A tiny UTA student checkpoint whose weights differ from its seed-0 random-init twin."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("student") / "student.safetensors"
    save_uta_vit(build_uta_vit("uta_test_p8_32"), path)
    return path


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    torch.manual_seed(2)
    out = tmp_path_factory.mktemp("open_clip") / "teacher"
    save_local_dir(open_clip.CLIP(**OPEN_CLIP_CFG), OPEN_CLIP_CFG, out)
    return out


@pytest.fixture(scope="module")
def colour_folders(tmp_path_factory) -> Path:
    """An ImageFolder train/val pair of noisy solid-colour 32 px images, three classes."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("val", 5)):
        for name in ("red", "green", "blue"):
            (root / split / name).mkdir(parents=True)
            for k in range(n):
                pixels = np.clip(np.array(COLORS[name]) + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{k}.png")
    return root


# ---- the linear probe


def _planted(n: int, dim: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features whose label is the argmax of a fixed linear map (seed 0's), plus a constant offset and scale."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, classes, generator=torch.Generator().manual_seed(0))
    x = torch.randn(n, dim, generator=g)
    return x * 30 + 5, (x @ w).argmax(dim=1)  # scale and offset: the probe standardises


@pytest.mark.parametrize("method", ["logreg", "sgd"])
def test_probe_recovers_a_planted_linear_signal_and_not_noise(method):
    train_x, train_y = _planted(800, 16, 4, seed=1)
    test_x, test_y = _planted(400, 16, 4, seed=2)
    kw = dict(method=method, epochs=30, seed=0)
    signal = fit_linear_probe(train_x, train_y, test_x, test_y, 4, **kw)
    assert signal.method == method and signal.top1 > 0.9 and signal.top5 == 1.0
    noise_y = torch.randint(0, 4, (800,), generator=torch.Generator().manual_seed(3))
    noise_test = torch.randint(0, 4, (400,), generator=torch.Generator().manual_seed(4))
    noise = fit_linear_probe(train_x, noise_y, test_x, noise_test, 4, **kw)
    assert abs(noise.top1 - 0.25) < 0.08
    assert abs(noise.top1 - majority_chance(noise_y, noise_test)) < 0.1


def test_probe_picks_C_on_a_train_split_and_checks_its_inputs():
    train_x, train_y = _planted(300, 8, 3, seed=1)
    test_x, test_y = _planted(100, 8, 3, seed=2)
    result = fit_linear_probe(train_x, train_y, test_x, test_y, 3, method="logreg", Cs=[1e-4, 1.0])
    assert set(result.val_top1) == {"0.0001", "1.0"} and result.C == 1.0 and result.top1 > 0.85
    assert majority_chance([0, 0, 1], [0, 1, 1, 1]) == 0.25
    with pytest.raises(ValueError, match="labels must lie in 0..2"):
        fit_linear_probe(train_x, train_y + 1, test_x, test_y, 3)
    with pytest.raises(ValueError, match="NaN"):
        fit_linear_probe(train_x * float("nan"), train_y, test_x, test_y, 3)


# ---- patch labels


def _obj(shape: str, color: str, size: str, cx: float, cy: float, radius: float) -> dict:
    return {"shape": shape, "color": color, "size": size, "center": [cx, cy], "radius": radius}


HAND_SCENE = {
    "image": "hand.png", "width": 64, "height": 64,
    "objects": [
        _obj("square", "red", "large", 12, 12, 10.24),  # half side 8.7: patch centres 4, 12, 20 in both axes
        _obj("triangle", "green", "large", 32, 32, 10.24),  # apex (32, 21.8), base y 37.1: centres (28|36, 36)
        _obj("circle", "blue", "small", 52, 52, 7.04),  # only its own centre: neighbours are 8 px away
    ],
}


def test_patch_labels_of_a_hand_made_scene():
    labels = dict(patch_labels(HAND_SCENE, grid=8, mode="covered"))
    assert len(labels) == 64
    square = {r * 8 + c for r in range(3) for c in range(3)}
    named = {i: (o["color"], o["shape"]) for i, o in labels.items() if o is not None}
    assert named == {**{i: ("red", "square") for i in square}, 35: ("green", "triangle"), 36: ("green", "triangle"),
                     54: ("blue", "circle")}
    centers = [(i, o["color"]) for i, o in patch_labels(HAND_SCENE, grid=8, mode="centers")]
    assert centers == [(9, "red"), (36, "green"), (54, "blue")]
    # the same scene on a 4x4 grid (patch side 16): centres at 8, 24, 40, 56
    coarse = {i: o["color"] for i, o in patch_labels(HAND_SCENE, grid=4) if o is not None}
    assert coarse == {0: "red", 15: "blue"}

    out = label_patches([HAND_SCENE], grid=8, attributes=("color", "size"))
    assert out.patches == [sorted(named)] and out.count == 12
    colours = [out.classes["color"][i] for i in out.labels["color"]]
    assert colours == [named[i][0] for i in sorted(named)]
    assert [out.classes["size"][i] for i in out.labels["size"]].count("small") == 1
    with_bg = label_patches([HAND_SCENE], grid=8, include_background=True, attributes=("shape",))
    assert with_bg.count == 64 and with_bg.classes["shape"][-1] == BACKGROUND
    assert sum(with_bg.classes["shape"][i] == BACKGROUND for i in with_bg.labels["shape"]) == 52


def test_patch_labels_agree_with_the_rendered_pixels():
    """A patch centre is a pixel corner: the object's exact colour is on one of the 4 pixels around it, or on none."""
    rng = random.Random(0)
    inside = inside_hits = background = background_hits = 0
    for _ in range(30):
        scene = sample_scene(rng, 64)
        pixels = np.asarray(render(scene))
        colours = {tuple(COLORS[o["color"]]) for o in scene["objects"]}
        for patch, obj in patch_labels(scene, grid=16):  # patch centres at (4x + 2, 4y + 2)
            y, x = divmod(patch, 16)
            block = pixels[4 * y + 1 : 4 * y + 3, 4 * x + 1 : 4 * x + 3].reshape(-1, 3)
            around = {tuple(int(c) for c in v) for v in block}
            if obj is None:
                background += 1
                background_hits += not around & colours
            else:
                inside += 1
                inside_hits += tuple(COLORS[obj["color"]]) in around
    assert inside > 500 and inside_hits / inside > 0.99  # misses: the thin tips of stars
    assert background > 5000 and background_hits / background > 0.99


# ---- towers


def test_parse_tower_specs(student, teacher, tmp_path):
    spec = parse_tower(f"uta={student}")
    assert (spec.label, spec.source) == ("uta", ModelSource("uta", str(student)))
    assert parse_tower(f"uta:{student}").source == spec.source
    assert parse_tower(str(teacher)).source == ModelSource("open_clip", f"local-dir:{teacher}")
    assert parse_tower(f"teacher=open_clip:local-dir:{teacher}").source == parse_tower(str(teacher)).source
    named = parse_tower("random:open_clip:ViT-B-16@/w/vit.bin")
    assert named.source == ModelSource("open_clip", "ViT-B-16", "/w/vit.bin", random_init=True)
    assert parse_tower(str(named.source)) == named
    assert spec.twin().label == "random init (uta)" and spec.twin().source.random_init
    with pytest.warns(FutureWarning, match="the prefix 'openclip:' is deprecated"):
        assert parse_tower(f"teacher=openclip:local-dir:{teacher}").source == parse_tower(str(teacher)).source
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        parse_tower(str(tmp_path / "nope.safetensors"))
    with pytest.raises(FileNotFoundError, match="neither open_clip_config.json"):
        parse_tower(str(tmp_path))


def test_layers_index_hidden_states_the_same_way_for_every_loader(student, teacher, tmp_path):
    images = torch.randn(2, 3, 32, 32)
    uta = load_tower(parse_tower(str(student)))
    hf_uta = convert(student, tmp_path / "uta")
    _, hidden = uta.module.forward_blocks(images)
    hf_hidden = AutoModel.from_pretrained(hf_uta)(pixel_values=images, output_hidden_states=True).hidden_states
    clip = load_tower(parse_tower(f"open_clip:local-dir:{teacher}"))
    hf_clip_dir = convert_open_clip(f"open_clip:local-dir:{teacher}", tmp_path / "clip")
    hf_clip = load_tower(parse_tower(f"hf:{hf_clip_dir}"))
    for layer in (-2, -1, 1):
        prefix, patches = uta.tokens(images, layer)
        assert torch.equal(torch.cat([prefix, patches], 1), hidden[layer])
        assert torch.allclose(patches, hf_hidden[layer][:, 1:], atol=1e-5)
        prefix, patches = clip.tokens(images, layer)
        ref_prefix, ref_patches = hf_clip.tokens(images, layer)
        assert patches.shape == (2, 16, 32) and prefix.shape == (2, 1, 32)
        assert torch.allclose(patches, ref_patches, atol=1e-4) and torch.allclose(prefix, ref_prefix, atol=1e-4)
    with pytest.raises(ValueError, match="block outputs only"):
        clip.tokens(images, 0)
    with pytest.raises(ValueError, match="layer 3 out of range"):
        uta.tokens(images, 3)


def test_random_init_twins_share_the_architecture_and_are_seeded(student, teacher):
    trained = load_tower(parse_tower(str(student)))
    twin = load_tower(parse_tower(str(student)).twin(), seed=0)
    again = load_tower(parse_tower(str(student)).twin(), seed=0)
    other = load_tower(parse_tower(str(student)).twin(), seed=5)
    assert twin.arch_key == trained.arch_key
    a, b, c = (t.module.patch_embed.proj.weight for t in (twin, again, other))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, trained.module.patch_embed.proj.weight)
    clip_twin = load_tower(parse_tower(f"random:{teacher}"))
    clip = load_tower(parse_tower(str(teacher)))
    assert clip_twin.arch_key == clip.arch_key
    assert not torch.equal(clip_twin.module.conv1.weight, clip.module.conv1.weight)


# ---- the commands


def test_patchprobe_cli_end_to_end(world, student, tmp_path):
    out = tmp_path / "probe" / "patch.json"
    patchprobe_main(["--data", str(world), "--tower", f"uta={student}", "--random-init", "--out", str(out), *COMMON])
    saved = json.loads(out.read_text())
    counts = json.loads((world / "manifest.json").read_text())["counts"]
    held_out = counts["eval/grounding/images"] + counts["eval/llava-bench-shapes/images"]  # the default test dirs
    assert [t["label"] for t in saved["towers"]] == ["uta", "random init (uta)"]
    assert saved["towers"][1]["random_init"] and saved["n_train_images"] == counts["pretrain/train"]
    assert saved["n_test_images"] == held_out
    for tower in saved["towers"]:
        assert set(tower["probes"]) == {"color", "shape", "size"}
        assert all(0 <= p["top1"] <= 1 and p["n_test"] == saved["patch_counts"]["4x4"]["test"]
                   for p in tower["probes"].values())
    assert set(saved["chance"]["4x4"]) == {"color", "shape", "size"}
    table = out.with_suffix(".md").read_text()
    assert "| chance (most frequent train class, 4x4 patches) |" in table
    assert "| uta |" in table and "| random init (uta) |" in table
    assert not list(out.parent.glob(".*.tmp"))

    patchprobe_main(["--data", str(world), "--tower", f"uta={student}", "--patches", "centers",
                     "--include-background", "--attributes", "color", "--test-dir", "eval/grounding/images",
                     "--max-train-images", "20", "--layer", "0", "--out", str(tmp_path / "c.json"), *COMMON])
    centers = json.loads((tmp_path / "c.json").read_text())
    assert centers["n_train_images"] == 20 and centers["n_test_images"] == counts["eval/grounding/images"]
    assert centers["classes"]["color"][-1] == BACKGROUND

    patchprobe_main(["--data", str(world), "--tower", f"uta={student}", "--patches", "centers", "--window", "3",
                     "--attributes", "shape", "--max-train-images", "20", "--out", str(tmp_path / "w.json"), *COMMON])
    windowed = json.loads((tmp_path / "w.json").read_text())
    assert windowed["window"] == 3 and windowed["towers"][0]["feature_dim"] == 9 * saved["towers"][0]["feature_dim"]
    assert "3x3 neighbourhood" in (tmp_path / "w.md").read_text()
    with pytest.raises(SystemExit):
        patchprobe_main(["--data", str(world), "--tower", str(student), "--window", "2",
                         "--out", str(tmp_path / "x.json"), *COMMON])

    patchprobe_main(["--data", str(world), "--tower", f"uta={student}", "--patches", "centers", "--merge", "2",
                     "--attributes", "shape", "--max-train-images", "20", "--out", str(tmp_path / "m.json"), *COMMON])
    merged = json.loads((tmp_path / "m.json").read_text())
    assert merged["merge"] == 2 and merged["towers"][0]["feature_dim"] == 4 * saved["towers"][0]["feature_dim"]
    assert "2x2-merged token" in (tmp_path / "m.md").read_text()
    with pytest.raises(SystemExit):  # one merged token per object: centre patches only
        patchprobe_main(["--data", str(world), "--tower", str(student), "--merge", "2",
                         "--out", str(tmp_path / "y.json"), *COMMON])


def test_a_merged_token_is_the_pixel_shuffle_block_holding_the_patch():
    grid = 4
    tokens = torch.arange(grid * grid, dtype=torch.float).view(1, grid * grid, 1)
    labels = PatchLabels(patches=[[0, 5, 10, 15, 3]], labels={}, classes={})
    rows = patch_selector(labels, merge=2)(None, tokens, torch.tensor([0]))
    assert [merged_index(p, grid, 2) for p in (0, 5, 10, 15, 3)] == [0, 0, 3, 3, 1]
    assert rows.tolist() == [[0, 1, 4, 5], [0, 1, 4, 5], [10, 11, 14, 15], [10, 11, 14, 15], [2, 3, 6, 7]]


def test_neighbourhoods_are_the_tokens_around_each_patch_zero_beyond_the_edge():
    grid, dim = 4, 2
    tokens = torch.arange(2 * grid * grid * dim, dtype=torch.float).view(2, grid * grid, dim) + 1  # no token is 0
    assert torch.equal(neighbourhoods(tokens, 1), tokens)
    windows = neighbourhoods(tokens, 3)
    assert windows.shape == (2, grid * grid, 9 * dim)
    for b in range(2):
        for row in range(grid):
            for col in range(grid):
                expected = []
                for dr in (-1, 0, 1):
                    for dc in (-1, 0, 1):
                        r, c = row + dr, col + dc
                        inside = 0 <= r < grid and 0 <= c < grid
                        expected.append(tokens[b, r * grid + c] if inside else torch.zeros(dim))
                assert torch.equal(windows[b, row * grid + col], torch.cat(expected))


def test_patchprobe_names_missing_data(world, student, tmp_path):
    with pytest.raises(ProbeDataError, match="no_such_dir"):
        patchprobe_main(["--data", str(world), "--tower", str(student), "--test-dir", "no_such_dir",
                         "--out", str(tmp_path / "p.json"), *COMMON])
    with pytest.raises(ProbeDataError, match="scenes.jsonl"):
        patchprobe_main(["--data", str(tmp_path), "--tower", str(student), "--out", str(tmp_path / "p.json"), *COMMON])


def test_linprobe_cli_end_to_end_over_every_loader(colour_folders, student, teacher, tmp_path):
    hf_uta = convert(student, tmp_path / "uta_tower")
    out = tmp_path / "lin.json"
    cache = tmp_path / "cache"
    args = ["--train", str(colour_folders / "train"), "--val", str(colour_folders / "val"), "--pool", "mean",
            "--tower", f"uta={student}", "--tower", f"uta-hf={hf_uta}", "--tower", f"teacher={teacher}",
            "--random-init", "--cache-dir", str(cache), "--out", str(out), *COMMON]
    linprobe_main(args)
    result = json.loads(out.read_text())
    labels = [t["label"] for t in result["towers"]]
    assert labels == ["uta", "uta-hf", "teacher", "random init (uta)", "random init (teacher)"]  # one twin per arch
    by_label = {t["label"]: t for t in result["towers"]}
    assert by_label["uta"]["top1"] == by_label["uta-hf"]["top1"]  # the same weights in two formats
    assert result["num_classes"] == 3 and result["n_train"] == 30 and result["n_val"] == 15
    assert all(t["top1"] >= 0.9 for t in result["towers"])  # colour is linearly readable from any tower
    assert "| random init (teacher) |" in out.with_suffix(".md").read_text()
    cached = sorted(cache.glob("*.safetensors"))
    assert len(cached) == 10  # 5 towers x (train, val)
    stamps = [p.stat().st_mtime_ns for p in cached]
    linprobe_main(args)  # read back from the cache: same features, same probes
    again = json.loads(out.read_text())
    assert [t["top1"] for t in again["towers"]] == [t["top1"] for t in result["towers"]]
    assert [p.stat().st_mtime_ns for p in sorted(cache.glob("*.safetensors"))] == stamps


def test_linprobe_names_an_empty_class_folder_and_an_unreadable_image(colour_folders, student, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(colour_folders, root)
    (root / "train" / "purple").mkdir()
    args = ["--train", str(root / "train"), "--val", str(root / "val"), "--tower", str(student),
            "--out", str(tmp_path / "lin.json"), *COMMON]
    with pytest.raises(ImageDataError, match=r"no images: .*train/purple"):
        linprobe_main(args)
    (root / "train" / "purple").rmdir()
    (root / "val" / "green" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ImageDataError, match=r"val/green/broken.png: unreadable image"):
        linprobe_main(args)
    (root / "val" / "green" / "broken.png").unlink()
    (root / "val" / "cyan").mkdir()
    Image.new("RGB", (32, 32), COLORS["cyan"]).save(root / "val" / "cyan" / "0.png")
    with pytest.raises(ImageDataError, match="not in the train split: cyan"):
        linprobe_main(args)
    with pytest.raises(ImageDataError, match="no such image folder"):
        checked_image_folder(tmp_path / "missing")


def test_limit_per_class_keeps_a_seeded_k_shot_subset(colour_folders):
    pick = lambda seed: limit_per_class(checked_image_folder(colour_folders / "train"), 4, seed).samples
    kept = pick(0)
    assert len(kept) == 12 and sorted(t for _, t in kept) == [0] * 4 + [1] * 4 + [2] * 4
    assert kept == pick(0) and kept != pick(1) and kept == sorted(kept)
