"""Tiny parts for the LLaVA tests: a sentencepiece tokenizer, a Llama LM, a UTA tower folder, and LLaVA JSON data."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from llava_uta.model.hf_vision import UTAVisionConfig, UTAVisionModel
from llava_uta.model.processors import clip_image_processor
from llava_uta.train.tiny_lm import train_tokenizer

COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
SHAPES = ("circle", "square", "star", "cross")


def tiny_tower_config() -> UTAVisionConfig:
    return UTAVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, projection_dim=32
    )


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        lines.append(f"USER: What is in the image? ASSISTANT: a {color} {shape}. It is {color}.")
    return lines


def make_tokenizer_dir(root: Path) -> Path:
    train_tokenizer(corpus(), root, vocab_size=300)
    return root


def tiny_llama_config(tokenizer, **overrides) -> LlamaConfig:
    fields = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
    return LlamaConfig(**{**fields, **overrides})


def make_lm_dir(root: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = tiny_llama_config(tokenizer, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def make_tower_dir(root: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    UTAVisionModel(tiny_tower_config()).save_pretrained(root)
    clip_image_processor(32).save_pretrained(root)
    return root


def solid_image(path: Path, color: str, size: tuple[int, int] = (40, 40)) -> None:
    """A flat-colour image with a little noise, size = (width, height)."""
    rgb = np.array(COLORS[color], dtype=np.int16)[None, None]
    noise = np.random.default_rng(len(str(path))).integers(-8, 8, (size[1], size[0], 3))
    Image.fromarray(np.clip(rgb + noise, 0, 255).astype(np.uint8)).save(path)


def make_dataset(root: Path, n: int = 16, text_only: int = 0, plain: bool = False, seed: int = 0) -> Path:
    """`n` image samples (v1: two rounds; plain: one caption) and `text_only` samples without an image."""
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(n):
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        solid_image(root / "images" / f"{i}.png", color)
        turns = [("What is in the image?\n<image>", f"a {color} {shape}.")]
        if not plain:
            turns.append(("What color is it?", f"It is {color}."))
        conversations = [{"from": who, "value": v} for q, a in turns for who, v in (("human", q), ("gpt", a))]
        samples.append({"id": f"img{i}", "image": f"images/{i}.png", "conversations": conversations})
    for i in range(text_only):
        color = rng.choice(list(COLORS))
        conversations = [{"from": "human", "value": "Name a color."}, {"from": "gpt", "value": f"{color}."}]
        samples.append({"id": f"txt{i}", "conversations": conversations})
    path = root / ("pretrain.json" if plain else "instruct.json")
    path.write_text(json.dumps(samples))
    return path


def llava_args(parts: dict[str, Path], out: Path, stage: int, projector: str = "mlp2x_gelu", **extra) -> list[str]:
    """llava-uta-train flags for a few steps of stage 1 (plain) or stage 2 (v1) on the tiny parts."""
    data = parts["data"] / ("pretrain.json" if stage == 1 else "instruct.json")
    args = {
        "model_name_or_path": parts["lm"],
        "vision_tower": parts["tower"],
        "version": "plain" if stage == 1 else "v1",
        "mm_projector_type": projector,
        "data_path": data,
        "image_folder": parts["data"],
        "output_dir": out,
        "per_device_train_batch_size": 4,
        "max_steps": 4,
        "learning_rate": 1e-2 if stage == 1 else 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "weight_decay": 0.0,
        "dataloader_num_workers": 0,
        **({"tune_mm_mlp_adapter": True} if stage == 1 else {}),
        **extra,
    }
    return [f"--{k}={v}" for k, v in args.items()]
