"""Train a small open_clip CLIP on image-caption pairs: the teacher of the embedded default.

Real runs use a released CLIP (EVA-CLIP) as the teacher; on ShapesWorld there is none, so this trains one
from scratch in minutes on the CPU. The data (open_clip's CSV layout) is decoded into memory once, which
suits small datasets; for large ones use `python -m open_clip_train.main`.

The result is an open_clip "local-dir" folder (`open_clip_config.json` + `open_clip_model.safetensors`)
that loads with `open_clip.create_model_and_transforms("local-dir:PATH")`.

    llava-uta-train-clip --train-csv playground/data/shapes/clip/captions.csv --out runs/teacher --steps 400
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.loss import ClipLoss
from PIL import Image
from safetensors.torch import save_file
from tqdm import tqdm

from llava_uta.argparsing import ArgumentParser
from llava_uta.io_utils import atomic_dir, write_jsonl_atomic
from pretrain.caption_data import read_captions

# A small CLIP for 64x64 ShapesWorld images (patch 8 -> an 8x8 token grid). Width 64 rather than 128: a step is
# about 2.5x cheaper and learns shape about as fast per step, so a 3-minute budget buys ~2.5x the progress.
TINY_CLIP_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 64, "layers": 4, "head_width": 32, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3},
}


def load_images(paths: list[Path], image_size: int) -> torch.Tensor:
    """Decode every image once into a uint8 (N, 3, H, W) tensor, resized to `image_size` if needed."""
    out = torch.empty(len(paths), 3, image_size, image_size, dtype=torch.uint8)
    for i, p in enumerate(paths):
        img = Image.open(p).convert("RGB")
        if img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
        out[i] = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    return out


def normalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's rule: no weight decay on gains, biases, embeddings and the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name \
            or "embedding" in name or "class_embedding" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def cosine_lr(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1 + math.cos(math.pi * progress))


def save_local_dir(model: open_clip.CLIP, model_cfg: dict, out: Path) -> None:
    """Write an open_clip local-dir folder atomically (temporary sibling, then rename)."""
    config = {"model_cfg": model_cfg,
              "preprocess_cfg": {"mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD),
                                 "interpolation": "bicubic", "resize_mode": "shortest"}}
    with atomic_dir(out) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "open_clip_model.safetensors")
        (tmp / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")


def sample_batch(num_rows: int, batch_size: int, group_size: int, generator: torch.Generator) -> torch.Tensor:
    """Row indices of a batch made of whole groups of `group_size` consecutive rows (hard negatives)."""
    if batch_size % group_size:
        raise ValueError(f"batch size {batch_size} is not a multiple of the group size {group_size}")
    starts = torch.randint(num_rows // group_size, (batch_size // group_size,), generator=generator) * group_size
    return (starts[:, None] + torch.arange(group_size)).flatten()


def train(train_csv: Path, out: Path, model_cfg: dict, steps: int, batch_size: int = 128, lr: float = 1e-3,
          weight_decay: float = 0.1, warmup: int = 20, seed: int = 0, group_size: int = 1,
          log_every: int = 20) -> list[dict]:
    """Train a CLIP for `steps` steps and save it to `out`; returns the per-step log.

    With `group_size` G > 1 the CSV rows come in groups of G related captions (ShapesWorld: shape variants
    of one layout) and every batch is made of whole groups, so each sample meets its hard negatives.
    """
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    tokenizer = open_clip.SimpleTokenizer(context_length=model_cfg["text_cfg"]["context_length"])
    paths, captions = read_captions(train_csv)
    images = load_images(paths, model_cfg["vision_cfg"]["image_size"])
    tokens = tokenizer(captions)
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = ClipLoss()
    generator = torch.Generator().manual_seed(seed)
    log, start = [], time.perf_counter()
    model.train()
    progress = tqdm(range(steps), desc="teacher CLIP", unit="step")
    for step in progress:
        idx = sample_batch(len(images), batch_size, group_size, generator)
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, warmup, lr)
        image_features, text_features, logit_scale = model(normalize(images[idx]), tokens[idx])
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        record = {"step": step + 1, "loss": loss.item(), "seconds": time.perf_counter() - start}
        log.append(record)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            progress.set_postfix(loss=f"{record['loss']:.4f}")
    save_local_dir(model, model_cfg, out)
    write_jsonl_atomic(out / "train_log.jsonl", log)
    return log


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="llava-uta-train-clip", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-csv", type=Path, required=True, help="CSV with filepath,title columns")
    parser.add_argument("--out", type=Path, required=True, help="output open_clip local-dir folder")
    parser.add_argument("--model-config", type=Path, help="JSON model_cfg (default: the tiny ShapesWorld CLIP)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--wd", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--group-size", type=int, default=1,
                        help="batches are made of whole groups of this many consecutive CSV rows (hard negatives)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    model_cfg = json.loads(args.model_config.read_text()) if args.model_config else TINY_CLIP_CFG
    train(args.train_csv, args.out, model_cfg, args.steps, args.batch_size, args.lr, args.wd, args.warmup, args.seed,
          args.group_size)
    print(f"saved CLIP to {args.out} (load with open_clip.create_model_and_transforms('local-dir:{args.out}'))")


if __name__ == "__main__":
    main()
