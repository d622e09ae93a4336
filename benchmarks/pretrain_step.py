"""Pre-training step throughput: a UTA step vs a MIM step at the same model size and mask ratio, side by side.

A step is forward + backward + AdamW on the student against fixed teacher targets (so the two objectives pay
for the same teacher); the frozen teacher's forward on the full image is timed separately. The student's
achieved TFLOP/s (6 x parameters x tokens: the matmuls of forward and backward) is compared with this
machine's measured matmul peak.

With M keep sets per view (`llava-uta-pretrain --masks_per_view M`) one teacher forward serves M student passes: the
step of M passes is timed as the engine runs it (one batch of M x B rows), and the end-to-end table adds the
teacher's forward once per step: images/s (teacher views) and student passes/s end to end, each against MIM's
single pass. M = 2 at mask ratio 0.5 uses complement pairs (`--mask_pairing complement`), other M independent draws.

    python benchmarks/pretrain_step.py                                  # CPU: uta_b14_224, batch 8, ViT-L-14 teacher
    python benchmarks/pretrain_step.py --device cuda --dtype bf16 --batch-size 128 --teacher open_clip:EVA01-g-14-plus
    python benchmarks/pretrain_step.py --masks-per-view 1 2 4 8 --mim-masks-per-view 1 2   # which M to time
    python benchmarks/pretrain_step.py --compile-teacher      # the teacher eager and compiled (torch.compile)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llava_uta.model.uta_vit import build_uta_vit
from pretrain.masking import KeepIndexGenerator, complement_keep
from pretrain.objectives import OBJECTIVES, flops_per_token, objective_loss
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


def keep_sets(masks: KeepIndexGenerator, batch_size: int, passes: int) -> torch.Tensor:
    """(B, K) keep indices for one pass, (B, M, K) for M: complement pairs for M = 2 at ratio 0.5, else draws."""
    if passes == 1:
        return torch.stack([masks() for _ in range(batch_size)])
    if passes == 2 and 2 * masks.num_keep == masks.num_patches:
        first = [masks() for _ in range(batch_size)]
        return torch.stack([torch.stack([k, complement_keep(k, masks.num_patches)]) for k in first])
    return torch.stack([torch.stack([masks() for _ in range(passes)]) for _ in range(batch_size)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="uta_b14_224")
    parser.add_argument("--teacher", default="open_clip:ViT-L-14",
                        help="an open_clip model source (docs/model-sources.md); random weights: timing only")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mask-ratio", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--masks-per-view", type=int, nargs="+", default=[1, 2, 4],
                        help="UTA student passes per teacher forward to time (1 is always timed)")
    parser.add_argument("--mim-masks-per-view", type=int, nargs="+", default=[1],
                        help="the same for MIM (1 is always timed: EVA-02's one mask per view)")
    parser.add_argument("--compile-teacher", action="store_true",
                        help="also time the teacher's forward under torch.compile; the end-to-end table then uses it")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)

    teacher = CLIPTeacher.from_pretrained(args.teacher, precision=args.dtype, random_weights=True).to(device)
    images = torch.randn(args.batch_size, 3, *teacher.image_size, device=device)
    students = {name: build_uta_vit(args.model, out_dim=teacher.embed_dim,
                                    use_mask_token=OBJECTIVES[name].mask_token).to(device) for name in ("uta", "mim")}
    grid = students["uta"].cfg.grid_size
    teacher.input_size_for((grid, grid))
    masks = KeepIndexGenerator(grid, args.mask_ratio, "reversed_block", seed=0)
    passes = {"uta": sorted({1, *args.masks_per_view}), "mim": sorted({1, *args.mim_masks_per_view})}
    if min(passes["uta"] + passes["mim"]) < 1:
        parser.error("masks per view must be at least 1")
    keeps = {m: keep_sets(masks, args.batch_size, m).to(device) for m in sorted({*passes["uta"], *passes["mim"]})}
    targets = teacher(images, (grid, grid))
    teacher_s = eager_teacher_s = timed(lambda: teacher(images, (grid, grid)), device, args.repeats)
    if args.compile_teacher:
        teacher.compile_encoder()  # timed()'s warm-up call compiles
        teacher_s = timed(lambda: teacher(images, (grid, grid)), device, args.repeats)

    peak = matmul_peak_tflops(device, dtype, args.matmul_size)
    rows = {}  # (objective, M) -> (tokens per image and pass, student s/step, student TFLOP/s)
    for name, student in students.items():
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
        for m in passes[name]:
            def step(student=student, optimizer=optimizer, name=name, keep=keeps[m]):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                    loss, _ = objective_loss(name, student, images, targets, keep)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            seconds = timed(step, device, args.repeats)
            per_pass = OBJECTIVES[name].tokens_per_image(keeps[m].shape[-1], grid * grid)
            tflops = flops_per_token(student) * args.batch_size * m * per_pass / seconds / 1e12
            rows[name, m] = (per_pass, seconds, tflops)

    batch = args.batch_size
    print(f"{args.model}, batch {batch}, mask ratio {args.mask_ratio}, {args.dtype} on {device}; "
          f"measured {args.dtype} matmul peak {peak:.3f} TFLOP/s ({args.matmul_size}^3)")
    print("\nStudent only (fixed teacher targets):\n")
    print("| step | passes per teacher forward | tokens/image/pass | s/step | images/s | student passes/s | "
          "student TFLOP/s | fraction of peak |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for (name, m), (tok, sec, tf) in rows.items():
        print(f"| {name} M={m} | {m} | {tok} | {sec:.3f} | {batch / sec:.2f} | {m * batch / sec:.2f} | {tf:.3f} | "
              f"{tf / peak:.1%} |")
    forwards = {"": eager_teacher_s} | ({", torch.compile": teacher_s} if args.compile_teacher else {})
    for how, sec in forwards.items():
        print(f"| teacher forward ({args.teacher}{how}) | | {1 + grid * grid} | {sec:.3f} | {batch / sec:.2f} | | | |")

    mim = rows["mim", 1][1] + teacher_s  # the reference: EVA-02's MIM, one pass per teacher forward
    compiled = " (compiled)" if args.compile_teacher else ""
    print(f"\nEnd to end (student step + one teacher forward{compiled} per image), against MIM M=1:\n")
    print("| step | student passes per teacher forward | s/step | images/s | student passes/s | "
          "images/s vs MIM M=1 | passes/s vs MIM M=1 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (name, m), (_, sec, _) in rows.items():
        total = sec + teacher_s
        print(f"| {name} M={m} | {m} | {total:.3f} | {batch / total:.2f} | {m * batch / total:.2f} | "
              f"{mim / total:.2f}x | {m * mim / total:.2f}x |")
    uta = rows["uta", 1][1]
    if args.compile_teacher:
        print(f"\ntorch.compile makes the teacher's forward {eager_teacher_s / teacher_s:.2f}x as fast "
              f"({eager_teacher_s:.3f} -> {teacher_s:.3f} s per batch)")
    print(f"\nUTA step is {rows['mim', 1][1] / uta:.2f}x faster than MIM (student only); with the teacher's forward "
          f"each: {mim / (uta + teacher_s):.2f}x (teacher {teacher_s / (uta + teacher_s):.0%} of a UTA step, "
          f"{teacher_s / mim:.0%} of a MIM step)")
    for m in passes["uta"][1:]:
        total = rows["uta", m][1] + teacher_s
        print(f"UTA M={m}: {m} student passes per teacher forward, {batch / total:.2f} images/s and "
              f"{m * batch / total:.2f} passes/s end to end = {mim / total:.2f}x / {m * mim / total:.2f}x MIM M=1's")


if __name__ == "__main__":
    main()
