"""Throughput of the UTA ViT forward: masked (only the kept tokens enter the blocks) vs full, side by side.

    python benchmarks/vit_forward.py                     # uta_b14_224, batch 8, keep ratio 0.5, this CPU
    python benchmarks/vit_forward.py --model uta_l14_224 --device cuda --batch-size 64

The two forwards alternate within each repeat, so a busy machine slows both alike; the median is reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llava_uta.model.uta_vit import build_uta_vit


def seconds_per_forward(model, x, keep, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    model(x, keep_indices=keep)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="uta_b14_224")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--keep-ratio", type=float, default=0.5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_uta_vit(args.model).to(device).eval()
    cfg = model.cfg
    x = torch.randn(args.batch_size, 3, cfg.img_size, cfg.img_size, device=device)
    n_keep = int(cfg.num_patches * args.keep_ratio)
    keep = torch.rand(args.batch_size, cfg.num_patches, device=device).argsort(dim=1)[:, :n_keep]
    runs = {"full": None, f"masked (keep {n_keep}/{cfg.num_patches})": keep}

    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for i in range(args.warmup + args.repeats):
            for name, keep_indices in runs.items():
                t = seconds_per_forward(model, x, keep_indices, device)
                if i >= args.warmup:
                    times[name].append(t)

    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"{args.model}: batch {args.batch_size}, {cfg.img_size}px, {device}{threads}, median of {args.repeats}")
    print(f"{'forward':<28}{'tokens':>8}{'s/batch':>10}{'images/s':>10}")
    rates = {}
    for name, ts in times.items():
        median = statistics.median(ts)
        rates[name] = args.batch_size / median
        tokens = 1 + (cfg.num_patches if runs[name] is None else n_keep)
        print(f"{name:<28}{tokens:>8}{median:>10.3f}{rates[name]:>10.2f}")
    full, masked = rates.values()
    print(f"masked / full throughput: {masked / full:.2f}x")


if __name__ == "__main__":
    main()
