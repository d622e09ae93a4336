"""The teacher cache of `llava-uta-pretrain`: seconds per step with the teacher on the fly vs reading cached targets.

    python -m llava_uta.data.shapes --out /tmp/shapes-cache-bench --seed 0 --num-clip 256 --num-pretrain 2048 \\
        --num-stage1 64 --num-stage2 64 --num-zeroshot-per-class 1 --num-bench-images 1
    python benchmarks/teacher_cache.py --data /tmp/shapes-cache-bench             # tiny random CLIP teacher
    python benchmarks/teacher_cache.py --data /tmp/shapes-cache-bench --teacher open_clip:ViT-B-16 --num-steps 8

Both runs are the real engine (`Pretrainer(...).train()`, UTA objective, one optimizer step per batch) on the
world's pre-training images, from the same start, into temporary folders. The teacher has random weights (timing
only): by default an open_clip CLIP of `TINY_CLIP_CFG` saved as a local-dir folder, or any open_clip model source
(docs/model-sources.md). The student's image size is set so that its token grid equals the teacher's (ViT-B-16:
14 x 14, so `uta_tiny_p8_64` runs at 112 px). A step's seconds are the engine's own per-step timing (data wait
included), median over the steps after the first (worker start-up); runs alternate, `--repeats` times each, median
reported.

The one-off build is the cached run's setup time (`--teacher_cache` builds the cache in `Pretrainer.__init__`)
minus the on-the-fly run's setup time. Break-even = build seconds / seconds saved per step. The disk a cache
would need at real scale is printed analytically: (1 + N) x E values per image per view, 2 bytes each in fp16,
1 byte (+ a 4-byte scale per token) in fp8.

The fp8 cache (`--cache_encoding fp8`) is run too, and its targets are compared with the fp16 cache's, token by
token: cosine, relative error, and the largest change it can make to a token's UTA loss (1 - cos(prediction,
target)) for any prediction, which is |t/|t| - t'/|t'|| = sqrt(2 - 2 cos(t, t')).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import open_clip
import torch

from llava_uta.model.model_source import parse_model_source
from llava_uta.model.uta_vit import UTA_VIT_CONFIGS
from pretrain.engine import PretrainArguments, Pretrainer
from pretrain.teacher import CLIPTeacher
from pretrain.teacher_cache import TeacherCache
from pretrain.train_clip import TINY_CLIP_CFG, save_local_dir

REAL_TEACHER, REAL_PATCH = "EVA01-g-14-plus", 14  # the paper's teacher; patch 14 is in its timm model name
REAL_DATASETS = {"ImageNet-1K": 1_281_167, "ImageNet-21K": 14_197_122}


def teacher_name(name: str | None, root: Path) -> str:
    """An open_clip model source as given, or a random tiny CLIP written as a local-dir folder under `root`."""
    if name:
        return name
    torch.manual_seed(0)
    save_local_dir(open_clip.CLIP(**TINY_CLIP_CFG), TINY_CLIP_CFG, root / "teacher")
    return f"open_clip:local-dir:{root / 'teacher'}"


def run(args: PretrainArguments) -> tuple[float, dict]:
    """(seconds to build the Pretrainer, the run's step figures) of one `Pretrainer(args).train()`."""
    start = time.perf_counter()
    trainer = Pretrainer(args)
    setup = time.perf_counter() - start
    summary = trainer.train()
    records = [json.loads(line) for line in (Path(args.output_dir) / "log.jsonl").read_text().splitlines()]
    return setup, {"s/step": statistics.median(r["seconds"] for r in records[1:]),
                   "teacher share": summary["teacher_share"], "steps per epoch": trainer.steps_per_epoch,
                   "images": len(trainer.dataset)}


def fp8_error(fp16: TeacherCache, fp8: TeacherCache, images: int) -> dict[str, float]:
    """Token-level differences between the two caches' targets over `images` images of view 0."""
    exact = torch.stack([fp16.get(0, i).float() for i in range(images)]).flatten(0, 1)
    coded = torch.stack([fp8.get(0, i) for i in range(images)]).flatten(0, 1)
    cosine = torch.nn.functional.cosine_similarity(exact, coded, dim=-1)
    relative = (coded - exact).norm(dim=-1) / exact.norm(dim=-1)
    loss_bound = (2 - 2 * cosine).clamp_min(0).sqrt()
    return {"tokens": len(cosine), "min cosine": cosine.min().item(), "mean relative error": relative.mean().item(),
            "max relative error": relative.max().item(), "mean loss bound": loss_bound.mean().item(),
            "max loss bound": loss_bound.max().item()}


def real_scale_table(views: int) -> None:
    embed_dim = open_clip.get_model_config(REAL_TEACHER)["embed_dim"]
    image_size = open_clip.get_model_config(REAL_TEACHER)["vision_cfg"]["image_size"]
    tokens = 1 + (image_size // REAL_PATCH) ** 2
    per_image = {"fp16": tokens * embed_dim * 2, "fp8": tokens * (embed_dim + 4)}
    print(f"At real scale, {REAL_TEACHER} (E = {embed_dim}, 1 + N = {tokens} tokens at {image_size} px / patch "
          f"{REAL_PATCH}): (1 + N) x E x 2 B = {per_image['fp16']:,} B = {per_image['fp16'] / 2**10:.0f} KiB per "
          f"image per view in fp16, (1 + N) x (E + 4) B = {per_image['fp8'] / 2**10:.0f} KiB in fp8")
    print(f"| dataset | images | 1 view fp16 | 1 view fp8 | {views} views fp16 | {views} views fp8 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, images in REAL_DATASETS.items():
        tb = {k: images * v / 1e12 for k, v in per_image.items()}
        print(f"| {name} | {images:,} | {tb['fp16']:.2f} TB | {tb['fp8']:.2f} TB | {views * tb['fp16']:.2f} TB | "
              f"{views * tb['fp8']:.2f} TB |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a ShapesWorld folder (llava-uta-shapes --out)")
    parser.add_argument("--teacher", default=None, help="an open_clip model source: open_clip:NAME (random weights) or "
                        "open_clip:local-dir:DIR (its weights, e.g. the quickstart's teacher); default: a random tiny "
                        "CLIP")
    parser.add_argument("--model", default="uta_tiny_p8_64", help="student config (uta_b14_224: slow on a CPU)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--mask-ratio", type=float, default=0.5)
    parser.add_argument("--num-steps", type=int, default=32, help="optimizer steps per run")
    parser.add_argument("--cache-views", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--real-views", type=int, default=4, help="views of the real-scale disk column")
    args = parser.parse_args(argv)
    if args.num_steps < 2:
        parser.error("--num-steps must be at least 2 (the first step is left out as warm-up)")

    with tempfile.TemporaryDirectory(prefix="teacher-cache-bench-") as tmp:
        root = Path(tmp)
        teacher = teacher_name(args.teacher, root)
        random_weights = not parse_model_source(teacher).has_weights  # a name alone: a random teacher, timing only
        probe = CLIPTeacher.from_pretrained(teacher, random_weights=random_weights)  # its grid sets the student's size
        grid, embed_dim = probe.grid, probe.embed_dim
        del probe
        image_size = grid[0] * UTA_VIT_CONFIGS[args.model].patch_size
        common = dict(data_path=str(args.data / "pretrain/train"), teacher=teacher,
                      teacher_random_weights=random_weights, model=args.model,
                      image_size=image_size, mask_ratio=args.mask_ratio, max_steps=args.num_steps,
                      batch_size=args.batch_size, micro_batch_size=args.batch_size, warmup_steps=1,
                      workers=args.workers, save_every=10**9, keep_last=1, log_every=1)
        caches = {"fp16": root / "cache", "fp8": root / "cache-fp8"}
        results: dict[str, list[dict]] = {"on the fly": [], "cached": [], "cached fp8": []}
        for repeat in range(args.repeats):
            fly_setup, fly = run(PretrainArguments(output_dir=str(root / f"fly-{repeat}"), **common))
            results["on the fly"].append(fly)
            for encoding, cache in caches.items():
                cached_setup, cached = run(PretrainArguments(
                    output_dir=str(root / f"cached-{encoding}-{repeat}"), teacher_cache=str(cache),
                    cache_views=args.cache_views, cache_encoding=encoding, **common))
                if repeat == 0 and encoding == "fp16":  # later cached runs reuse the complete cache
                    build = cached_setup - fly_setup
                results["cached" if encoding == "fp16" else "cached fp8"].append(cached)
        readers = {encoding: TeacherCache(cache, encoding=encoding) for encoding, cache in caches.items()}
        disk = {encoding: reader.disk_bytes() for encoding, reader in readers.items()}
        error = fp8_error(readers["fp16"], readers["fp8"], min(256, fly["images"]))

    images, steps_per_epoch = fly["images"], fly["steps per epoch"]
    medians = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
               for name, runs in results.items()}
    weights = "its weights" if (args.teacher or "").startswith("local-dir:") else "random weights"
    print(f"{args.teacher or 'tiny CLIP (TINY_CLIP_CFG)'} teacher ({weights}), student {args.model} at {image_size} px "
          f"(grid {grid[0]}x{grid[1]}), UTA, batch {args.batch_size}, mask ratio {args.mask_ratio}, "
          f"{args.num_steps} steps, {images} images ({steps_per_epoch} steps/epoch), {args.cache_views} cached "
          f"view(s), {args.workers} worker(s), {torch.get_num_threads()} threads, median of {args.repeats}")
    print("| teacher targets | s/step | images/s | teacher share of a step |")
    print("| --- | --- | --- | --- |")
    for name, m in medians.items():
        print(f"| {name} | {m['s/step']:.3f} | {args.batch_size / m['s/step']:.1f} | {m['teacher share']:.1%} |")
    fly_s, cached_s = medians["on the fly"]["s/step"], medians["cached"]["s/step"]
    per_image = {encoding: size / (images * args.cache_views) for encoding, size in disk.items()}
    analytic = (1 + grid[0] * grid[1]) * embed_dim * 2
    print(f"cache build: {build:.1f} s for {images} images x {args.cache_views} view(s); disk {disk['fp16']:,} B = "
          f"{per_image['fp16']:,.0f} B per image per view ((1 + N) x E x 2 = {analytic:,} B); fp8: "
          f"{disk['fp8']:,} B = {per_image['fp8']:,.0f} B ({disk['fp8'] / disk['fp16']:.2f}x)")
    print(f"fp8 vs fp16 targets over {error['tokens']} tokens: min cosine {error['min cosine']:.5f}, relative error "
          f"mean {error['mean relative error']:.4f} / max {error['max relative error']:.4f}; largest change of a "
          f"token's UTA loss: mean {error['mean loss bound']:.4f}, max {error['max loss bound']:.4f}")
    saved = fly_s - cached_s
    if saved > 0:
        print(f"cached step is {fly_s / cached_s:.2f}x faster; the build pays off after {build / saved:.0f} steps "
              f"= {build / saved / steps_per_epoch:.1f} epochs")
    else:
        print(f"cached step is {fly_s / cached_s:.2f}x as fast: the build never pays off here")
    real_scale_table(args.real_views)


if __name__ == "__main__":
    main()
