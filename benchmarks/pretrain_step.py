"""Pre-training step throughput: a UTA step vs a MIM step at the same model size and mask ratio, side by side.

A step is forward + backward + AdamW on the student against fixed teacher targets (so the two objectives pay
for the same teacher); the frozen teacher's forward on the full image is timed separately. The student's
achieved TFLOP/s (6 x parameters x tokens: the matmuls of forward and backward) is compared with this
machine's measured matmul peak.

    python benchmarks/pretrain_step.py                                  # CPU: uta_b14_224, batch 8, ViT-L-14 teacher
    python benchmarks/pretrain_step.py --device cuda --dtype bf16 --batch-size 128 --teacher EVA01-g-14-plus
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llava_uta.model.uta_vit import build_uta_vit
from pretrain.masking import KeepIndexGenerator
from pretrain.objectives import objective_loss
from pretrain.teacher import CLIPTeacher

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, n: int) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, device, 5) / 1e12


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="uta_b14_224")
    parser.add_argument("--teacher", default="ViT-L-14", help="open_clip model (random weights: timing only)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mask-ratio", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--matmul-size", type=int, default=2048)
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)

    teacher = CLIPTeacher.from_pretrained(args.teacher, precision=args.dtype).to(device)
    images = torch.randn(args.batch_size, 3, *teacher.image_size, device=device)
    students = {name: build_uta_vit(args.model, out_dim=teacher.embed_dim, use_mask_token=name == "mim").to(device)
                for name in ("uta", "mim")}
    grid = students["uta"].cfg.grid_size
    teacher.input_size_for((grid, grid))
    masks = KeepIndexGenerator(grid, args.mask_ratio, "reversed_block", seed=0)
    keep = torch.stack([masks() for _ in range(args.batch_size)]).to(device)
    targets = teacher(images, (grid, grid))
    teacher_s = timed(lambda: teacher(images, (grid, grid)), device, args.repeats)

    peak = matmul_peak_tflops(device, dtype, args.matmul_size)
    rows = []
    for name, student in students.items():
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)

        def step(student=student, optimizer=optimizer, name=name):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                loss, _ = objective_loss(name, student, images, targets, keep)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        seconds = timed(step, device, args.repeats)
        tokens = args.batch_size * (1 + (keep.shape[1] if name == "uta" else grid * grid))
        params = sum(p.numel() for n, p in student.named_parameters() if n not in ("pos_embed", "cls_token",
                                                                                  "mask_token"))
        tflops = 6 * params * tokens / seconds / 1e12
        rows.append((name, tokens // args.batch_size, seconds, args.batch_size / seconds, tflops, tflops / peak))

    print(f"{args.model}, batch {args.batch_size}, mask ratio {args.mask_ratio}, {args.dtype} on {device}; "
          f"measured {args.dtype} matmul peak {peak:.3f} TFLOP/s ({args.matmul_size}^3)")
    print("| step | tokens/image | s/step | images/s | student TFLOP/s | fraction of peak |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, tok, sec, ips, tf, frac in rows:
        print(f"| {name} | {tok} | {sec:.3f} | {ips:.2f} | {tf:.3f} | {frac:.1%} |")
    print(f"| teacher forward ({args.teacher}) | {1 + grid * grid} | {teacher_s:.3f} | "
          f"{args.batch_size / teacher_s:.2f} | | |")
    uta, mim = rows[0][2], rows[1][2]
    print(f"UTA step is {mim / uta:.2f}x faster than MIM (student only); with the teacher's forward each: "
          f"{(mim + teacher_s) / (uta + teacher_s):.2f}x")


if __name__ == "__main__":
    main()
