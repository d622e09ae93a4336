"""The UTA ViT configs (UTA_VIT_CONFIGS) registered as timm models; importing `llava_uta.model` registers them.

    model = timm.create_model("uta_b16_224")                                    # random weights
    model = timm.create_model("uta_b16_224", pretrained=True, pretrained_cfg_overlay=dict(file="student.safetensors"))
    model = timm.create_model("uta_l14_336", pretrained=True, img_size=448, pretrained_cfg_overlay=dict(file="uta.pt"))
    backbone = timm.create_model("uta_b16_224", features_only=True, out_indices=(3, 7, 11))  # (B, width, H/p, W/p)

Any UTAViTConfig field is a keyword (timm's `num_classes` is `out_dim`; `img_size` must be square). A weight file
is a UTA student (our keys; its NAME.json, if beside it, must describe the same model) or a released checkpoint
(`visual.*` converted and RoPE-checked by official.py; `text.*` and `logit_scale` are ignored). It is read by
`load_state_dict_file` and loaded strictly; a checkpoint of another input size is resized as `resize_uta_vit` does.

The models follow timm's contract, `model(x)` = head(pool(norm(tokens))), with `global_pool="token"` that is
`UTAViT.encode_image`; the keep-indices UTA forward remains `UTAViT.forward(model, x, keep_indices)`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.layers import to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, load_pretrained, register_model
from timm.models.eva import Eva
from torch import Tensor

from llava_uta.model.checkpoint import (
    CheckpointError,
    load_state_dict_file,
    load_strict,
    load_uta_vit_config,
    resize_uta_vit,
    student_config_path,
)
from llava_uta.model.official import convert_official_visual, split_official
from llava_uta.model.uta_vit import UTA_VIT_CONFIGS, UTAViT, UTAViTConfig

__all__ = ["TimmUTAViT", "checkpoint_filter_fn"]  # register_model appends the model names

ADAPTED_FIELDS = ("img_size", "in_chans", "out_dim", "drop_path_rate")  # may differ from a checkpoint's config
GLOBAL_POOLS = ("", "avg", "avgmax", "max", "token")


class TimmUTAViT(UTAViT):
    """A UTAViT with timm's model contract: forward(x) -> tensor, and timm's custom_load hook for weight files."""

    forward = Eva.forward  # forward_head(forward_features(x)); UTAViT.forward returns a UTAViTOutput

    def load_pretrained(self, checkpoint_path: str) -> None:
        """Read a weight file with load_state_dict_file, then run timm's filter / adapt / load steps on it."""
        cfg = {**self.pretrained_cfg, "state_dict": load_state_dict_file(checkpoint_path)}
        load_pretrained(self, cfg, num_classes=self.num_classes, in_chans=self.in_chans, filter_fn=checkpoint_filter_fn)


def _check_student_config(path: str, cfg: UTAViTConfig) -> None:
    """A student's NAME.json must describe the model up to the fields timm adapts (size, channels, head)."""
    saved = load_uta_vit_config(path)
    diff = {f.name: (getattr(saved, f.name), getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
            if f.name not in ADAPTED_FIELDS and getattr(saved, f.name) != getattr(cfg, f.name)}
    if diff:
        raise CheckpointError(f"{student_config_path(path)} describes another model, (checkpoint, model): {diff}")


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: UTAViT) -> dict[str, Tensor]:
    """A student or released state dict -> our keys at the model's input size, checked strictly (timm's filter hook).

    It is checked on the model itself, or, where the checkpoint has another input size (or the model another head or
    channel count, which timm adapts after this), on a model of the checkpoint's shape that is then resized.
    """
    file = model.pretrained_cfg.get("file")
    source = str(file or "the pretrained state_dict")
    released = any(k.startswith("visual.") for k in state_dict)
    if released:
        state_dict = split_official(state_dict, source)[0]
        source += " (visual.*)"
    elif file and student_config_path(file).is_file():
        _check_student_config(file, model.cfg)
    pos = state_dict.get("pos_embed")
    grid = math.isqrt(pos.shape[1] - 1) if pos is not None and pos.ndim == 3 else model.cfg.grid_size
    pcfg = model.pretrained_cfg
    src_cfg = dataclasses.replace(model.cfg, img_size=grid * model.cfg.patch_size, out_dim=pcfg["num_classes"],
                                  in_chans=pcfg["input_size"][0])
    src = model if src_cfg == model.cfg else UTAViT(src_cfg)
    if released:
        state_dict = convert_official_visual(state_dict, src, source)
    load_strict(src, state_dict, source)
    return state_dict if src is model else resize_uta_vit(src, model.cfg.img_size).state_dict()


def _build(variant: str, num_classes: int | None = None, global_pool: str = "token",
           img_size: int | tuple[int, int] | None = None, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None, **fields: Any) -> TimmUTAViT:
    """timm's model keywords -> a TimmUTAViT of the variant's config with those fields replaced."""
    if unknown := fields.keys() - {f.name for f in dataclasses.fields(UTAViTConfig)}:
        raise TypeError(f"{variant}: unsupported keyword(s) {sorted(unknown)}; UTA ViT takes UTAViTConfig fields, "
                        "num_classes (out_dim), global_pool, device, dtype")
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f"{variant}: global_pool {global_pool!r} is not one of {GLOBAL_POOLS}")
    if img_size is not None:
        height, width = to_2tuple(img_size)
        if height != width:
            raise ValueError(f"{variant}: the UTA ViT takes square images, got img_size {img_size}")
        fields["img_size"] = height
    if num_classes is not None:
        fields["out_dim"] = num_classes
    model = TimmUTAViT(dataclasses.replace(UTA_VIT_CONFIGS[variant], **fields), device=device, dtype=dtype)
    model.global_pool = global_pool  # pooling only: the final LayerNorm stays before it, as in UTA
    return model


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> TimmUTAViT:
    """build_model_with_cfg with UTA's filter and timm's feature getter (over forward_intermediates)."""
    depth = kwargs.get("depth", UTA_VIT_CONFIGS[variant].depth)
    out_indices = kwargs.pop("out_indices", min(3, depth))
    if pretrained:  # timm resets custom_load when a file is given at create time; keep files on load_pretrained
        kwargs["pretrained_cfg_overlay"] = {"custom_load": True, **(kwargs.get("pretrained_cfg_overlay") or {})}
    return build_model_with_cfg(
        partial(_build, variant), variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _cfg(cfg: UTAViTConfig) -> dict[str, Any]:
    """timm's pretrained cfg of a config: UTA's evaluation preprocessing, no weights (pass a file)."""
    return dict(
        input_size=(cfg.in_chans, cfg.img_size, cfg.img_size), fixed_input_size=True, num_classes=cfg.out_dim,
        interpolation="bicubic", crop_pct=1.0, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
        first_conv="patch_embed.proj", classifier="head", origin_url="https://github.com/jihaonew/UTA",
        paper_name="Enhancing Vision-Language Model with Unmasked Token Alignment",
    )


default_cfgs = generate_default_cfgs({name: _cfg(cfg) for name, cfg in UTA_VIT_CONFIGS.items()})


def _register(variant: str) -> Callable[..., TimmUTAViT]:
    """Register an entrypoint named after the variant (timm registers a function under its __name__)."""
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> TimmUTAViT:
        return _create(variant, pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = variant
    entrypoint.__doc__ = f"UTA ViT {variant}: {UTA_VIT_CONFIGS[variant]}."
    return register_model(entrypoint)


for _variant in UTA_VIT_CONFIGS:
    globals()[_variant] = _register(_variant)
