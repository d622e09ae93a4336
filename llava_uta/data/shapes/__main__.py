"""Generate ShapesWorld: `python -m llava_uta.data.shapes --out playground/data/shapes --seed 0`."""

from __future__ import annotations

import argparse
import time
from dataclasses import fields
from pathlib import Path

from llava_uta.argparsing import ArgumentParser
from llava_uta.data.shapes.writer import ShapesWorldConfig, build


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="llava-uta-shapes", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("playground/data/shapes"), help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing world made with another config")
    parser.add_argument("--workers", type=int, default=2, help="rendering processes (the output does not depend on it)")
    for f in fields(ShapesWorldConfig):
        flag = f"--{f.name.replace('_', '-')}"
        if f.type == "bool":
            parser.add_argument(flag, dest=f.name, action="store_true",
                                help="images show each scene graph as a code for the symbolic tower (a diagnostic)")
        else:
            parser.add_argument(flag, dest=f.name, type=int, default=f.default, help=f"(default: {f.default})")
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[ShapesWorldConfig, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    cfg = ShapesWorldConfig(**{f.name: getattr(args, f.name) for f in fields(ShapesWorldConfig)})
    return cfg, args


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse_args(argv)
    start = time.perf_counter()
    try:
        counts, reused = build(cfg, args.out, overwrite=args.overwrite, workers=args.workers)
    except (FileExistsError, ValueError) as e:
        raise SystemExit(f"llava-uta-shapes: {e}") from None
    verb = "is up to date (same config), reused" if reused else f"written in {time.perf_counter() - start:.1f} s"
    print(f"ShapesWorld (seed {cfg.seed}, {cfg.image_size}x{cfg.image_size} px) at {args.out} {verb}:")
    width = max(map(len, counts))
    for name, n in counts.items():
        print(f"  {name:<{width}}  {n:>7,}")


if __name__ == "__main__":
    main()
