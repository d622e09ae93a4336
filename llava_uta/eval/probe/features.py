"""Frozen-feature extraction, once per tower and split (optionally cached on disk), and the probes' shared flags."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from llava_uta.eval.probe.towers import FrozenTower, TowerSpec, load_tower, parse_tower, tower_fingerprint
from llava_uta.io_utils import write_json_atomic, write_text_atomic

# select(prefix tokens (B, P, D), patch tokens (B, N, D), dataset indices (B,)) -> features of the batch (M, D)
Selector = Callable[[Tensor, Tensor, Tensor], Tensor]


@torch.no_grad()
def extract_features(tower: FrozenTower, dataset: Dataset, layer: int, select: Selector, batch_size: int = 64,
                     workers: int = 0, desc: str = "features") -> Tensor:
    """Run the frozen tower over a dataset of (image, index) items and keep what `select` takes of each batch."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=tower.device.type == "cuda")
    chunks = []
    for images, indices in tqdm(loader, desc=f"{tower.label}: {desc}", unit="batch", leave=False):
        prefix, patches = tower.tokens(images, layer)
        chunks.append(select(prefix, patches, indices).cpu())
    return torch.cat(chunks)


def cache_key(tower: FrozenTower, seed: int, what: dict) -> str:
    """A hash of the tower's weights (spec + file stats, or seed), its preprocessing and what is extracted."""
    key = {"tower": tower_fingerprint(tower.spec, seed), "image_size": tower.image_size, "mean": tower.mean,
           "std": tower.std, **what}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]


def cached_features(cache_dir: str | os.PathLike | None, key: str, compute: Callable[[], Tensor]) -> Tensor:
    """compute() once: with a cache folder, read CACHE/KEY.safetensors if it exists, else write it atomically."""
    if cache_dir is None:
        return compute()
    path = Path(cache_dir) / f"{key}.safetensors"
    if path.is_file():
        return load_file(path)["features"]
    features = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"features": features.contiguous()}, tmp)
    os.replace(tmp, path)
    return features


def add_tower_arguments(parser: argparse.ArgumentParser, default_layer: int) -> None:
    """The flags both probes share: towers, random-init twins, layer, extraction and probe settings."""
    from llava_uta.eval.probe.linear import METHODS

    towers = parser.add_argument_group("towers")
    towers.add_argument("--tower", action="append", required=True, metavar="[LABEL=]SOURCE",
                        help="a tower to probe (repeat for several), as a model source: a UTA student / released "
                        "checkpoint, open_clip:NAME@WEIGHTS, an open_clip or transformers tower folder, random:SOURCE "
                        "(see docs/model-sources.md)")
    towers.add_argument("--random-init", action="store_true",
                        help="also probe each tower's architecture with fresh weights (seeded by --seed), the floor; "
                        "towers of one architecture share one twin")
    towers.add_argument("--seed", type=int, default=0, help="seed of the random-init twins and of the probes")
    towers.add_argument("--layer", type=int, default=default_layer,
                        help="hidden state to read: 0 = block-0 input, k = block k's output, negative from the end "
                        f"(-2 = LLaVA's default); default {default_layer}")
    run = parser.add_argument_group("extraction and probe")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    run.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding images")
    run.add_argument("--cache-dir", help="keep extracted features here (safetensors, keyed by tower, layer and images) "
                     "and reuse them on the next run")
    run.add_argument("--method", choices=METHODS, default="auto",
                     help="logreg (L-BFGS logistic regression), sgd (MAE's BatchNorm + linear, SGD) or auto (logreg up "
                     "to 20,000 training samples); see llava_uta/eval/probe/linear.py")
    run.add_argument("--C", type=float, nargs="+", default=[1.0],
                     help="logreg inverse L2 strength; several values are chosen between on 20%% of the train split")
    run.add_argument("--max-iter", type=int, default=1000, help="logreg L-BFGS iterations")
    run.add_argument("--epochs", type=int, default=90, help="sgd epochs")
    run.add_argument("--lr", type=float, default=0.1, help="sgd base lr (scaled by batch / 256)")
    run.add_argument("--probe-batch-size", type=int, default=1024, help="sgd batch size")


def probe_kwargs(args: argparse.Namespace) -> dict:
    """fit_linear_probe's keyword arguments from the shared flags."""
    return dict(method=args.method, Cs=args.C, max_iter=args.max_iter, epochs=args.epochs,
                batch_size=args.probe_batch_size, base_lr=args.lr, seed=args.seed)


def iter_towers(specs: Sequence[str], random_init: bool, seed: int, device: str) -> Iterator[FrozenTower]:
    """Load the towers one at a time (parsed from [LABEL=]SOURCE), then the random-init twin of each architecture."""
    parsed = [parse_tower(s) for s in specs]
    labels = [p.label for p in parsed]
    if len(set(labels)) != len(labels):
        raise ValueError(f"towers need distinct labels (give LABEL=SPEC): {labels}")
    twins: dict[str, TowerSpec] = {}
    for spec in parsed:
        tower = load_tower(spec, seed, device)
        if random_init and not spec.source.random_init:
            twins.setdefault(tower.arch_key, spec.twin())
        yield tower
        del tower
    for twin in twins.values():
        yield load_tower(twin, seed, device)


def tower_record(tower, extract_seconds: float, fit_seconds: float, **fields) -> dict:
    """One tower's entry of a probe's results JSON."""
    source = tower.spec.source
    return {"label": tower.label, "spec": str(source), "random_init": source.random_init, **fields,
            "extract_seconds": round(extract_seconds, 2), "fit_seconds": round(fit_seconds, 2)}


def write_results(result: dict, out: str, table: str, table_path: str | None) -> None:
    """The results JSON at `out` and the markdown table beside it (or at `table_path`), both atomically."""
    write_json_atomic(Path(out), result)
    write_text_atomic(table_path or Path(out).with_suffix(".md"), table)
    print(table)
