"""Checkpoint I/O, the one home of state-dict files: read them without unpickling code, write them atomically,
load them strictly, save and load UTA students.

A UTA student checkpoint (what the pre-training engine writes) is `NAME.safetensors` holding the
`UTAViT` state dict plus `NAME.json` beside it holding its `UTAViTConfig` fields.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from llava_uta.io_utils import atomic_file, write_json_atomic
from llava_uta.model.uta_vit import UTAViT, UTAViTConfig

WRAPPER_KEYS = ("state_dict", "model", "module")  # common containers around a state dict


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model."""


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a flat state dict from .safetensors, or from .pt/.pth/.bin with torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        if path.suffix == ".safetensors":
            obj = load_file(path, device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, not a checkpoint, or pickled code that weights_only refuses
        raise CheckpointError(
            f"{path}: not a readable checkpoint (expected .safetensors, or a torch.save'd state dict "
            f"loadable with weights_only=True): {type(e).__name__}: {e}"
        ) from e
    while isinstance(obj, dict) and len(obj) and not isinstance(next(iter(obj.values())), Tensor):
        wrapper = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if wrapper is None:
            break
        obj = obj[wrapper]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path}: expected a dict of tensors (possibly under one of {WRAPPER_KEYS}), "
            f"got {type(obj).__name__}" + (f" with keys {list(obj)[:8]}" if isinstance(obj, dict) else "")
        )
    return obj


def save_state_dict_file(state: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
                         ) -> None:
    """Write a flat state dict atomically: .safetensors (with `metadata`), or a torch.save'd dict for .bin/.pt."""
    path = Path(path)
    state = {k: v.detach().contiguous() for k, v in state.items()}
    with atomic_file(path) as tmp:
        if path.suffix == ".safetensors":
            save_file(state, tmp, metadata=metadata)
        elif metadata:
            raise ValueError(f"{path}: metadata needs a .safetensors file")
        else:
            torch.save(state, tmp)


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a .safetensors file ({} for other files)."""
    if Path(path).suffix != ".safetensors":
        return {}
    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}


def load_strict(module: nn.Module, state_dict: dict[str, Tensor], source: str) -> None:
    """load_state_dict(strict=True), but listing every missing/unexpected key and shape mismatch at once."""
    expected = module.state_dict()
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(expected.keys() & state_dict.keys())
        if state_dict[k].shape != expected[k].shape
    ]
    problems = [
        f"{title} ({len(items)}): {', '.join(items[:12])}{' ...' if len(items) > 12 else ''}"
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if items
    ]
    if problems:
        raise CheckpointError(f"{source} does not fit {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(state_dict, strict=True)


def student_config_path(path: str | os.PathLike) -> Path:
    return Path(path).with_suffix(".json")


def save_uta_vit(model: UTAViT, path: str | os.PathLike, state_dict: dict[str, Tensor] | None = None) -> None:
    """Write a UTA student checkpoint: PATH (.safetensors) and its config PATH.json, each atomically.

    `state_dict` replaces the model's own weights (e.g. the fp32 masters of a bf16 DeepSpeed run).
    """
    save_state_dict_file(state_dict or model.state_dict(), path, metadata={"format": "pt"})
    write_json_atomic(student_config_path(path), dataclasses.asdict(model.cfg))


def load_uta_vit_config(path: str | os.PathLike) -> UTAViTConfig:
    cfg_path = student_config_path(path)
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: a UTA student checkpoint needs its config file {cfg_path} beside it")
    fields = json.loads(cfg_path.read_text())
    known = {f.name for f in dataclasses.fields(UTAViTConfig)}
    if unknown := fields.keys() - known:
        raise CheckpointError(f"{cfg_path}: unknown UTAViTConfig fields {sorted(unknown)}")
    return UTAViTConfig(**fields)


def resize_uta_vit(model: UTAViT, img_size: int) -> UTAViT:
    """Give a loaded UTAViT another (square) input size, in place, e.g. a 224 px student as a 336 px LLaVA tower.

    timm's `Eva.set_input_size` resamples the learned absolute position embedding (`resample_abs_pos_embed`,
    bicubic, the CLS row kept as is) and rebuilds the RoPE table for the new grid on the same reference grid, i.e.
    the table a model built at the new size has. The patch size, and so every other weight, is unchanged.
    """
    if img_size <= 0:
        raise ValueError(f"image size must be positive, got {img_size}")
    if img_size != model.cfg.img_size:
        cfg = dataclasses.replace(model.cfg, img_size=img_size)  # refuses a size that is not a multiple of the patch
        model.set_input_size(img_size=(img_size, img_size))
        model.cfg = cfg
    return model


def load_uta_vit(path: str | os.PathLike, img_size: int | None = None, **overrides) -> UTAViT:
    """Load a UTA student checkpoint, at another input size if img_size is given (see resize_uta_vit).

    overrides replace config fields that do not change the weights (e.g. drop_path_rate).
    """
    cfg = dataclasses.replace(load_uta_vit_config(path), **overrides)
    model = UTAViT(cfg)
    load_strict(model, load_state_dict_file(path), str(path))
    return model if img_size is None else resize_uta_vit(model, img_size)
