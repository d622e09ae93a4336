"""Per-patch linear probes on ShapesWorld: can a linear map read an object's colour, shape and size off the patch
tokens a tower gives LLaVA?

    llava-uta-patchprobe --data playground/data/shapes --out runs/shapes/probe/patch.json \\
        --tower uta=runs/shapes/students/uta/student.safetensors \\
        --tower teacher=open_clip:local-dir:runs/shapes/teacher --random-init

Patches are labelled from the scene graphs in DATA/scenes.jsonl (llava_uta/eval/probe/data.py): by default every
patch whose centre lies inside an object carries that object's colour / shape / size and background patches are left
out (`--patches centers`: only the patch at each object's centre; `--include-background`: background patches too,
as one more class). `--window K` gives each labelled patch the K x K patch tokens around it, concatenated (zeros
beyond the grid's edge): a single token shows a piece of an object, its neighbourhood shows the object's outline, so
`--patches centers --window K` asks whether an object is readable from the tokens around it rather than from one.
`--patches centers --merge F` probes the tokens a pixel_shuffleF projector reads: each object is represented by the
merged token (its F x F block of patch tokens, concatenated) that holds its centre patch.
Each tower (and with --random-init the same architecture with fresh seeded weights, the floor) encodes the images
once; the patch tokens of --layer (default -2, the layer LLaVA feeds its projector) of the train images fit one
linear probe per attribute (llava_uta/eval/probe/linear.py), scored on the held-out images. Train
images come from --train-dir (default pretrain/train, a random --max-train-images of them), test images from
--test-dir (default the held-out grounding and LLaVA-Bench images, whose scenes no training split contains).
Chance per attribute: always answering the most frequent training class. Writes OUT (JSON) and a markdown table
(OUT with .md, or --table), each atomically.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from llava_uta.argparsing import ArgumentParser
from llava_uta.eval.probe.data import (
    ATTRIBUTES,
    PATCH_MODES,
    ImageList,
    PatchLabels,
    ProbeDataError,
    label_patches,
    read_scenes,
    scenes_under,
)
from llava_uta.eval.probe.features import (
    Selector,
    add_tower_arguments,
    cache_key,
    cached_features,
    extract_features,
    iter_towers,
    probe_kwargs,
    tower_record,
    write_results,
)
from llava_uta.eval.probe.linear import fit_linear_probe, majority_chance
from llava_uta.eval.probe.towers import FrozenTower
from llava_uta.model.projector import pixel_shuffle

DEFAULT_TRAIN_DIRS = ("pretrain/train",)
DEFAULT_TEST_DIRS = ("eval/grounding/images", "eval/llava-bench-shapes/images")


def select_scenes(scenes: list[dict], root: str, folders: list[str], limit: int, seed: int) -> list[dict]:
    """The scenes under `folders`, then a seeded random `limit` of them (all if limit is 0), in file order."""
    selected = [s for folder in folders for s in scenes_under(scenes, root, folder)]
    if limit and len(selected) > limit:
        keep = sorted(random.Random(seed).sample(range(len(selected)), limit))
        selected = [selected[i] for i in keep]
    return selected


def neighbourhoods(patches: Tensor, window: int) -> Tensor:
    """(B, g*g, D) row-major patch tokens -> (B, g*g, window*window*D): each token's window x window neighbourhood,
    row-major, zeros beyond the grid's edge (window 1: the tokens themselves)."""
    if window == 1:
        return patches
    batch, count, dim = patches.shape
    grid = math.isqrt(count)
    if grid * grid != count:
        raise ValueError(f"{count} patch tokens do not form a square grid")
    image = patches.transpose(1, 2).reshape(batch, dim, grid, grid)
    cols = F.unfold(image, window, padding=window // 2)  # (B, D * window^2, g*g), channel-major
    return cols.view(batch, dim, window * window, count).permute(0, 3, 2, 1).reshape(batch, count, -1)


def merged_index(patch: int, grid: int, merge: int) -> int:
    """The pixel-shuffle token (row-major over the (grid/merge)^2 blocks) that holds patch `patch` of the grid."""
    row, col = divmod(patch, grid)
    return (row // merge) * (grid // merge) + col // merge


def patch_selector(labels: PatchLabels, window: int = 1, merge: int = 1) -> Selector:
    """A selector keeping, for each image of the batch, the patch tokens (or K x K neighbourhoods, or the merged tokens
    holding them) `labels` holds labels for."""
    def select(prefix: Tensor, patches: Tensor, indices: Tensor) -> Tensor:
        grid = math.isqrt(patches.shape[1])
        tokens = pixel_shuffle(patches, merge) if merge > 1 else neighbourhoods(patches, window)
        rows = [tokens[b, [merged_index(p, grid, merge) for p in labels.patches[int(i)]]]
                for b, i in enumerate(indices)]
        return torch.cat(rows) if rows else tokens.new_zeros(0, tokens.shape[-1])
    return select


def patch_features(tower: FrozenTower, root: str, scenes: list[dict], labels: PatchLabels, args: argparse.Namespace,
                   split: str) -> Tensor:
    """(labelled patches, D) tokens of `scenes` at --layer, in label order, extracted once (or read from the cache)."""
    files = [str(Path(root) / s["image"]) for s in scenes]
    key = cache_key(tower, args.seed, {"layer": args.layer, "patches": labels.patches, "window": args.window,
                                       "merge": args.merge, "files": files})
    dataset = ImageList(files, tower.transform())
    features = cached_features(args.cache_dir, key, lambda: extract_features(
        tower, dataset, args.layer, patch_selector(labels, args.window, args.merge), args.batch_size, args.workers,
        split))
    if len(features) != labels.count:
        raise RuntimeError(f"{tower.label}: {len(features)} patch features for {labels.count} labelled patches")
    return features


def markdown_table(result: dict) -> str:
    """One row per tower (random-init twins last: the floor), accuracy in % per attribute, chance first."""
    attrs = result["attributes"]
    window = result["window"]
    head = [f"Per-patch linear probes, layer {result['layer']}, patches: {result['patches']}"
            + (" (+ background class)" if result["include_background"] else "")
            + (f", features: each patch's {window}x{window} neighbourhood of tokens" if window > 1 else "")
            + (f", features: the {result['merge']}x{result['merge']}-merged token holding it (pixel shuffle)"
               if result.get("merge", 1) > 1 else "") + ".", ""]
    lines = head + ["| tower | " + " | ".join(attrs) + " |", "| --- |" + " ---: |" * len(attrs)]
    for grid, chance in result["chance"].items():
        cells = " | ".join(f"{100 * chance[a]:.1f}" for a in attrs)
        lines.append(f"| chance (most frequent train class, {grid} patches) | {cells} |")
    for t in result["towers"]:
        lines.append(f"| {t['label']} | " + " | ".join(f"{100 * t['probes'][a]['top1']:.1f}" for a in attrs) + " |")
    counts = {g: f"{n['train']} train / {n['test']} test patches" for g, n in result["patch_counts"].items()}
    lines += ["", f"Train images: {result['n_train_images']} ({', '.join(result['train_dirs'])}); test images: "
              f"{result['n_test_images']} ({', '.join(result['test_dirs'])}); "
              + "; ".join(f"{g}: {c}" for g, c in counts.items()) + "."]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="ShapesWorld root (with scenes.jsonl), from llava-uta-shapes")
    parser.add_argument("--train-dir", action="append", help="image folder(s) under DATA to fit on (repeatable; "
                        f"default {' '.join(DEFAULT_TRAIN_DIRS)})")
    parser.add_argument("--test-dir", action="append", help="held-out image folder(s) under DATA to score on "
                        f"(repeatable; default {' '.join(DEFAULT_TEST_DIRS)})")
    parser.add_argument("--max-train-images", type=int, default=2000, help="random subset of the train images "
                        "(0: all)")
    parser.add_argument("--max-test-images", type=int, default=0, help="random subset of the test images (0: all)")
    parser.add_argument("--patches", choices=PATCH_MODES, default="covered",
                        help="covered: every patch whose centre is inside an object; centers: each object's centre "
                        "patch only")
    parser.add_argument("--include-background", action="store_true",
                        help="also label background patches, as class 'background' of every attribute")
    parser.add_argument("--window", type=int, default=1, help="odd K: probe each labelled patch's K x K "
                        "neighbourhood of tokens, concatenated (default 1: the patch token alone)")
    parser.add_argument("--merge", type=int, default=1, help="F: probe the F x F-merged token (pixel shuffle, as "
                        "--mm_projector_type pixel_shuffleF_mlp2x_gelu feeds the LM) holding each object's centre; "
                        "with --patches centers")
    parser.add_argument("--attributes", nargs="+", choices=tuple(ATTRIBUTES), default=list(ATTRIBUTES))
    parser.add_argument("--out", required=True, help="results JSON")
    parser.add_argument("--table", help="markdown table (default: OUT with suffix .md)")
    add_tower_arguments(parser, default_layer=-2)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.window < 1 or args.window % 2 == 0:
        parser.error(f"--window must be an odd number >= 1 (a neighbourhood centred on the patch), got {args.window}")
    if args.merge > 1 and (args.window > 1 or args.patches != "centers"):
        parser.error("--merge F probes one merged token per object: use it with --patches centers and no --window")
    train_dirs = args.train_dir or list(DEFAULT_TRAIN_DIRS)
    test_dirs = args.test_dir or list(DEFAULT_TEST_DIRS)

    scenes = read_scenes(args.data)
    train_scenes = select_scenes(scenes, args.data, train_dirs, args.max_train_images, args.seed)
    test_scenes = select_scenes(scenes, args.data, test_dirs, args.max_test_images, args.seed)
    overlap = {s["image"] for s in train_scenes} & {s["image"] for s in test_scenes}
    if overlap:
        raise ProbeDataError(f"{len(overlap)} images are in both the train and test folders, e.g. {min(overlap)}")

    result = {"command": "llava-uta-patchprobe", "data": args.data, "train_dirs": train_dirs, "test_dirs": test_dirs,
              "n_train_images": len(train_scenes), "n_test_images": len(test_scenes), "layer": args.layer,
              "patches": args.patches, "window": args.window, "merge": args.merge,
              "include_background": args.include_background, "attributes": args.attributes, "seed": args.seed,
              "chance": {}, "patch_counts": {}, "classes": {}, "towers": []}
    labels_by_grid: dict[int, tuple[PatchLabels, PatchLabels]] = {}
    for tower in iter_towers(args.tower, args.random_init, args.seed, args.device):
        grid = tower.grid_size
        if grid not in labels_by_grid:
            labels_by_grid[grid] = tuple(label_patches(s, grid, args.patches, args.include_background, args.attributes)
                                         for s in (train_scenes, test_scenes))
        train_labels, test_labels = labels_by_grid[grid]
        if not train_labels.count or not test_labels.count:
            raise ProbeDataError(f"{tower.label}: no labelled patches on its {grid}x{grid} grid "
                                 f"({train_labels.count} train, {test_labels.count} test)")
        grid_name = f"{grid}x{grid}"
        result["patch_counts"][grid_name] = {"train": train_labels.count, "test": test_labels.count}
        result["chance"][grid_name] = {a: majority_chance(train_labels.labels[a], test_labels.labels[a])
                                       for a in args.attributes}
        result["classes"] = {a: list(train_labels.classes[a]) for a in args.attributes}
        start = time.perf_counter()
        train_x = patch_features(tower, args.data, train_scenes, train_labels, args, "train")
        test_x = patch_features(tower, args.data, test_scenes, test_labels, args, "test")
        extracted = time.perf_counter()
        probes = {}
        for a in args.attributes:
            probe = fit_linear_probe(train_x, torch.tensor(train_labels.labels[a]), test_x,
                                     torch.tensor(test_labels.labels[a]), len(train_labels.classes[a]),
                                     **probe_kwargs(args))
            probes[a] = probe.to_dict()
        result["towers"].append(tower_record(tower, extracted - start, time.perf_counter() - extracted,
                                             grid=grid_name, feature_dim=train_x.shape[1], probes=probes))
        print(f"{tower.label}: " + ", ".join(f"{a} {p['top1']:.3f}" for a, p in probes.items()), flush=True)
    write_results(result, args.out, markdown_table(result), args.table)


if __name__ == "__main__":
    main()
