"""Linear probe of frozen tower features on an ImageFolder: train on one split, top-1 / top-5 on the other.

    llava-uta-linprobe --train DATA/train --val DATA/val --out runs/probe/linprobe.json \\
        --tower uta=runs/shapes/students/uta/student.safetensors \\
        --tower teacher=open_clip:local-dir:runs/shapes/teacher --random-init

Each tower (and, with --random-init, the same architecture with fresh seeded weights: the floor) encodes every
image once, at its evaluation preprocessing, into one feature per image: the CLS token (--pool cls) or the mean of
the patch tokens (--pool mean) of --layer (default -1, the last block's output, before the final LayerNorm). A
linear classifier is fitted on the cached train features (llava_uta/eval/probe/linear.py: standardisation, the
BatchNorm without affine of MAE's probe, then L-BFGS logistic regression for small sets, SGD for large) and scored
on the val split. Labels follow the sorted class folders of --train; every class folder must hold images.
Writes OUT (JSON) and a markdown table (OUT with .md, or --table), each atomically.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import Tensor

from llava_uta.argparsing import ArgumentParser
from llava_uta.data.image_folder import checked_image_folder, limit_per_class
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

POOLS = ("cls", "mean")


def pooled(pool: str) -> Selector:
    """A selector keeping one feature per image: the first prefix token (CLS) or the mean patch token."""
    def select(prefix: Tensor, patches: Tensor, indices: Tensor) -> Tensor:
        if pool == "mean":
            return patches.mean(dim=1)
        if prefix.shape[1] == 0:
            raise ValueError("this tower has no CLS token; use --pool mean")
        return prefix[:, 0]
    return select


def image_features(tower: FrozenTower, root: str, class_to_idx: dict[str, int] | None, args: argparse.Namespace,
                   split: str) -> tuple[Tensor, Tensor, dict[str, int]]:
    """(features, labels, class_to_idx) of an ImageFolder split, extracted once (or read from --cache-dir)."""
    dataset = checked_image_folder(root, tower.transform(), class_to_idx)
    if split == "train" and args.max_per_class:
        limit_per_class(dataset, args.max_per_class, args.seed)
    files = [p for p, _ in dataset.samples]
    key = cache_key(tower, args.seed, {"layer": args.layer, "pool": args.pool, "files": files})
    features = cached_features(args.cache_dir, key, lambda: extract_features(
        tower, IndexedFolder(dataset), args.layer, pooled(args.pool), args.batch_size, args.workers, split))
    return features, torch.tensor(dataset.targets), dataset.class_to_idx


class IndexedFolder(torch.utils.data.Dataset):
    """An ImageFolder yielding (image, index) instead of (image, label), for extract_features."""

    def __init__(self, folder):
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int):
        return self.folder[index][0], index


def markdown_table(result: dict) -> str:
    """One row per tower (random-init twins last, the floor), top-1 / top-5 in %, chance first."""
    lines = [f"Linear probe ({result['pool']} token, layer {result['layer']}), {result['num_classes']} classes, "
             f"{result['n_train']} train / {result['n_val']} val images.", "",
             "| tower | top-1 | top-5 | probe |", "| --- | ---: | ---: | --- |",
             f"| chance (most frequent train class) | {100 * result['chance_top1']:.1f} | | |"]
    for t in result["towers"]:
        lines.append(f"| {t['label']} | {100 * t['top1']:.1f} | {100 * t['top5']:.1f} | {t['method']} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True, help="ImageFolder train split (ROOT/CLASS/IMAGE)")
    parser.add_argument("--val", required=True, help="ImageFolder val split (its classes: a subset of train's)")
    parser.add_argument("--max-per-class", type=int, default=0,
                        help="fit on a seeded random N train images per class (k-shot; default 0: all)")
    parser.add_argument("--pool", choices=POOLS, default="cls", help="CLS token, or the mean of the patch tokens")
    parser.add_argument("--out", required=True, help="results JSON")
    parser.add_argument("--table", help="markdown table (default: OUT with suffix .md)")
    add_tower_arguments(parser, default_layer=-1)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)

    result = {"command": "llava-uta-linprobe", "train": args.train, "val": args.val, "pool": args.pool,
              "layer": args.layer, "max_per_class": args.max_per_class, "seed": args.seed, "towers": []}
    for tower in iter_towers(args.tower, args.random_init, args.seed, args.device):
        start = time.perf_counter()
        train_x, train_y, class_to_idx = image_features(tower, args.train, None, args, "train")
        val_x, val_y, _ = image_features(tower, args.val, class_to_idx, args, "val")
        extracted = time.perf_counter()
        probe = fit_linear_probe(train_x, train_y, val_x, val_y, len(class_to_idx), **probe_kwargs(args))
        result.update(num_classes=len(class_to_idx), n_train=len(train_y), n_val=len(val_y),
                      chance_top1=majority_chance(train_y, val_y))
        result["towers"].append(tower_record(tower, extracted - start, time.perf_counter() - extracted,
                                             feature_dim=train_x.shape[1], **probe.to_dict()))
        print(f"{tower.label}: top-1 {probe.top1:.4f} top-5 {probe.top5:.4f} ({probe.method})", flush=True)
    write_results(result, args.out, markdown_table(result), args.table)


if __name__ == "__main__":
    main()
