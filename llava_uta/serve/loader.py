"""Load any LLaVA-UTA training output for generation, as LLaVA's `load_pretrained_model` does.

    loaded = load_pretrained_model("checkpoints/llava-uta")                          # stage 2 (or merged LoRA)
    loaded = load_pretrained_model("checkpoints/llava-uta-lora")                     # LoRA, base from config.json
    loaded = load_pretrained_model("checkpoints/llava-uta-pretrain", "vicuna-7b")    # stage-1 projector only

The folder kind is read from its files, not from its name as in LLaVA (docs/llava.md#loading-a-training-output):
`adapter_config.json` marks a LoRA run (its base LLM and tower are rebuilt from config.json or `model_base`, then
the adapter is merged), a `mm_projector` file without model weights marks a stage-1 run (base LLM + recorded tower
+ the trained projector), anything else is a `save_pretrained` Llava folder. The dtype follows the device: bf16 (or
fp16) on CUDA, fp32 on the CPU, where fp16 matmuls are not implemented (docs/llava.md#known-pitfalls). Serving
imports no training code: the LoRA and stage-1 cases rebuild the base with the model layer's
`llava_builder.rebuild_llava` (peft is imported for LoRA folders only).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaForConditionalGeneration,
)

import llava_uta.model  # noqa: F401  (registers the UTA tower with transformers' Auto classes)
from llava_uta.conversation import conv_templates
from llava_uta.model.checkpoint import load_state_dict_file
from llava_uta.model.language_model import load_tokenizer
from llava_uta.model.llava_builder import load_lora_model, rebuild_llava, recorded_parts
from llava_uta.model.merge_llava import LLAVA_MODEL_TYPES
from llava_uta.model.processors import make_processor
from llava_uta.model.projector import load_llava_projector

DEFAULT_CONV_MODE = "v1"
PROJECTOR_FILES = ("mm_projector.safetensors", "mm_projector.bin")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


@dataclass
class LoadedModel:
    """A model ready for generation, with its processor and the settings generation needs."""

    model: LlavaForConditionalGeneration
    processor: object  # LlavaProcessor: tokenizer + image processor that expands <image>
    conv_mode: str
    context_len: int

    @property
    def tokenizer(self):
        return self.processor.tokenizer


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(device: str | torch.device, dtype: torch.dtype | str | None = None) -> torch.dtype:
    """The requested dtype, checked against the device; by default bf16/fp16 on CUDA and fp32 elsewhere."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    kind = torch.device(device).type
    if dtype is None:
        if kind == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if kind == "cpu" and dtype == torch.float16:
        raise ValueError("float16 does not run on the CPU (addmm is not implemented for Half); use float32 or bfloat16")
    return dtype


def is_llava_output(model_path: str | os.PathLike) -> bool:
    """True for a LLaVA training output folder (stage 1, stage 2, LoRA), False for a language model."""
    config = Path(model_path) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") in LLAVA_MODEL_TYPES


def folder_kind(model_path: str | os.PathLike) -> str:
    """'lora', 'projector' (stage 1) or 'full', from the files in the folder."""
    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a LLaVA-UTA training output")
    if (path / "adapter_config.json").is_file():
        return "lora"
    has_weights = any((path / name).is_file() for name in WEIGHT_FILES)
    if not has_weights and any((path / name).is_file() for name in PROJECTOR_FILES):
        return "projector"
    return "full"


def _load_full(model_path: str, dtype: torch.dtype):
    model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=dtype)
    return model, AutoProcessor.from_pretrained(model_path)


def _load_lora(model_path: str, model_base: str | None, dtype: torch.dtype):
    model = load_lora_model(model_path, model_base).merge_and_unload().to(dtype)
    return model, AutoProcessor.from_pretrained(model_path)


def _load_projector(model_path: str, model_base: str | None, dtype: torch.dtype, image_aspect_ratio: str):
    config = AutoConfig.from_pretrained(model_path)
    model_base, tower = recorded_parts(config, model_base)
    tokenizer = load_tokenizer(model_base)
    model = rebuild_llava(config, tokenizer, model_base, tower, dtype)
    weights = next(Path(model_path, name) for name in PROJECTOR_FILES if Path(model_path, name).is_file())
    load_llava_projector(model.model.multi_modal_projector, load_state_dict_file(weights), config.mm_projector_type)
    return model, make_processor(model, tokenizer, AutoImageProcessor.from_pretrained(tower), image_aspect_ratio)


def load_pretrained_model(
    model_path: str | os.PathLike,
    model_base: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    image_aspect_ratio: str = "square",
) -> LoadedModel:
    """Model + processor + conversation mode for a stage-2, LoRA or stage-1 folder (see the module docstring).

    `model_base` is the base LLM of a LoRA or stage-1 run (default: the path recorded in config.json);
    `image_aspect_ratio` (square / pad) only matters for stage-1 folders, which save no image processor.
    """
    model_path = str(model_path)
    model_base = str(model_base) if model_base else None
    device = device or default_device()
    dtype = resolve_dtype(device, dtype)
    kind = folder_kind(model_path)
    if kind == "lora":
        model, processor = _load_lora(model_path, model_base, dtype)
    elif kind == "projector":
        model, processor = _load_projector(model_path, model_base, dtype, image_aspect_ratio)
    else:
        model, processor = _load_full(model_path, dtype)
    model = model.to(device).eval()
    # the template the folder was trained with (a stage-1 or LoRA model is rebuilt: read its own config.json)
    conv_mode = getattr(AutoConfig.from_pretrained(model_path), "conv_mode", None) or DEFAULT_CONV_MODE
    context_len = getattr(model.config.text_config, "max_position_embeddings", None) or 2048
    return LoadedModel(model, processor, conv_mode, context_len)


def add_model_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The flags that choose and load a model (shared by the chat, the servers and the bench answerer)."""
    parser.add_argument("--model-path", required=required, help="stage-2, LoRA or stage-1 output folder")
    parser.add_argument("--model-base",
                        help="base LLM (folder or GGUF file) of a LoRA / stage-1 folder (default: recorded in its "
                        "config.json)")
    parser.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")
    parser.add_argument("--dtype", help="float32 / bfloat16 / float16 (default: follows the device)")
    parser.add_argument(
        "--image-aspect-ratio",
        default="square",
        choices=("square", "pad"),
        help="preprocessing of a stage-1 folder (others record their own)",
    )
    parser.add_argument("--conv-mode", choices=sorted(conv_templates), help="template (default: the model's, or v1)")


def load_from_args(args: argparse.Namespace) -> LoadedModel:
    return load_pretrained_model(args.model_path, args.model_base, args.device, args.dtype, args.image_aspect_ratio)
