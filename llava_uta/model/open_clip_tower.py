"""An open_clip ViT CLIP (e.g. the teacher) as a transformers CLIP vision tower folder for Llava.

    llava-uta-convert --from-open-clip open_clip:local-dir:runs/teacher towers/teacher

The folder holds a `CLIPVisionModelWithProjection` (model type `clip_vision_model`: the vision half of an OpenAI
CLIP plus its image projection) and a `CLIPImageProcessor` with the model's open_clip preprocessing. Llava loads it
as a `CLIPVisionModel`, as it loads an openai/clip-vit folder (the projection is not used there). Only open_clip's
standard `VisionTransformer` maps onto that architecture; other vision towers are refused, naming what does not fit.
"""

from __future__ import annotations

import os
from pathlib import Path

import open_clip
import torch
from open_clip.transform import PreprocessCfg, merge_preprocess_dict
from open_clip.transformer import QuickGELU, ResidualAttentionBlock, VisionTransformer
from torch import nn
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection
from transformers.image_utils import PILImageResampling

from llava_uta.model.model_source import ModelSource, parse_model_source
from llava_uta.model.open_clip_loader import create_open_clip
from llava_uta.model.processors import clip_image_processor

RESAMPLING = {"bicubic": PILImageResampling.BICUBIC, "bilinear": PILImageResampling.BILINEAR}


def activation_name(act: nn.Module) -> str | None:
    """transformers' name for an open_clip MLP activation (None if it has none)."""
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_pytorch_tanh"}[act.approximate]
    return None


def unsupported_features(visual: nn.Module) -> list[str]:
    """What keeps an open_clip vision tower from being a transformers CLIP vision model (empty if nothing)."""
    if not isinstance(visual, VisionTransformer):
        return [f"its vision tower is a {type(visual).__name__} (e.g. a timm trunk or a ModifiedResNet), "
                "not open_clip's standard VisionTransformer"]
    problems = []
    if visual.attn_pool is not None:
        problems.append("attentional pooling (attentional_pool)")
    if visual.pool_type != "tok":
        problems.append(f"pool_type {visual.pool_type!r} (only 'tok', the class token, is supported)")
    if not isinstance(visual.ln_pre, nn.LayerNorm):
        problems.append("no LayerNorm before the transformer (no_ln_pre)")
    if visual.proj is None:
        problems.append("no image projection (proj)")
    if visual.image_size[0] != visual.image_size[1] or visual.patch_size[0] != visual.patch_size[1]:
        problems.append(f"non-square image {visual.image_size} or patch {visual.patch_size}")
    blocks = visual.transformer.resblocks
    if any(type(b) is not ResidualAttentionBlock for b in blocks):
        problems.append("custom attention blocks (block_type, qk_norm, scaled_cosine_attn or scale_*)")
    else:
        if any(not isinstance(m, nn.Identity) for b in blocks for m in (b.ls_1, b.ls_2)):
            problems.append("layer scale (ls_init_value)")
        if activation_name(blocks[0].mlp.gelu) is None:
            problems.append(f"MLP activation {type(blocks[0].mlp.gelu).__name__} (GELU or QuickGELU is supported)")
    if not all(m.elementwise_affine for m in visual.modules() if isinstance(m, nn.LayerNorm)):
        problems.append("LayerNorms without affine weights (norm_kwargs)")
    return problems


def clip_vision_config(visual: VisionTransformer) -> CLIPVisionConfig:
    block = visual.transformer.resblocks[0]
    return CLIPVisionConfig(
        hidden_size=visual.conv1.out_channels,
        intermediate_size=block.mlp.c_fc.out_features,
        projection_dim=visual.proj.shape[1],
        num_hidden_layers=len(visual.transformer.resblocks),
        num_attention_heads=block.attn.num_heads,
        num_channels=visual.conv1.in_channels,
        image_size=visual.image_size[0],
        patch_size=visual.patch_size[0],
        hidden_act=activation_name(block.mlp.gelu),
        layer_norm_eps=visual.ln_pre.eps,
    )


def _linear(prefix: str, weight: torch.Tensor, bias: torch.Tensor) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": weight, f"{prefix}.bias": bias}


def clip_vision_state_dict(visual: VisionTransformer) -> dict[str, torch.Tensor]:
    """open_clip VisionTransformer weights under CLIPVisionModelWithProjection's names."""
    sd = {
        "vision_model.embeddings.class_embedding": visual.class_embedding,
        "vision_model.embeddings.patch_embedding.weight": visual.conv1.weight,
        "vision_model.embeddings.position_embedding.weight": visual.positional_embedding,
        **_linear("vision_model.pre_layrnorm", visual.ln_pre.weight, visual.ln_pre.bias),
        **_linear("vision_model.post_layernorm", visual.ln_post.weight, visual.ln_post.bias),
        "visual_projection.weight": visual.proj.T,
    }
    for i, block in enumerate(visual.transformer.resblocks):
        layer = f"vision_model.encoder.layers.{i}"
        attn = block.attn
        for name, weight, bias in zip("qkv", attn.in_proj_weight.chunk(3), attn.in_proj_bias.chunk(3), strict=True):
            sd |= _linear(f"{layer}.self_attn.{name}_proj", weight, bias)
        sd |= _linear(f"{layer}.self_attn.out_proj", attn.out_proj.weight, attn.out_proj.bias)
        sd |= _linear(f"{layer}.layer_norm1", block.ln_1.weight, block.ln_1.bias)
        sd |= _linear(f"{layer}.layer_norm2", block.ln_2.weight, block.ln_2.bias)
        sd |= _linear(f"{layer}.mlp.fc1", block.mlp.c_fc.weight, block.mlp.c_fc.bias)
        sd |= _linear(f"{layer}.mlp.fc2", block.mlp.c_proj.weight, block.mlp.c_proj.bias)
    return {k: v.detach().float().contiguous() for k, v in sd.items()}


def to_clip_vision_model(visual: nn.Module, name: str = "the open_clip model") -> CLIPVisionModelWithProjection:
    """The transformers twin of an open_clip VisionTransformer (same hidden states, same image embedding)."""
    problems = unsupported_features(visual)
    if problems:
        raise ValueError(f"{name} cannot be converted to a transformers CLIP vision tower: " + "; ".join(problems))
    model = CLIPVisionModelWithProjection(clip_vision_config(visual))
    model.load_state_dict(clip_vision_state_dict(visual), strict=True)
    return model.eval()


def open_clip_image_processor(clip: nn.Module, name: str = "the open_clip model") -> CLIPImageProcessor:
    """open_clip's evaluation preprocessing (short-side resize, centre crop, its mean/std) as a CLIPImageProcessor."""
    cfg = PreprocessCfg(**merge_preprocess_dict(PreprocessCfg(), open_clip.get_model_preprocess_cfg(clip)))
    size = (cfg.size, cfg.size) if isinstance(cfg.size, int) else tuple(cfg.size)
    problems = []
    if size[0] != size[1]:
        problems.append(f"non-square input size {size}")
    if cfg.resize_mode != "shortest":
        problems.append(f"resize_mode {cfg.resize_mode!r} (only 'shortest' + centre crop is supported)")
    if cfg.interpolation not in RESAMPLING:
        problems.append(f"interpolation {cfg.interpolation!r} (one of {sorted(RESAMPLING)} is supported)")
    if problems:
        raise ValueError(f"{name}: its preprocessing has no CLIPImageProcessor equivalent: " + "; ".join(problems))
    return clip_image_processor(size[0], cfg.mean, cfg.std, RESAMPLING[cfg.interpolation])


def convert_open_clip(source: str | ModelSource, out_dir: str | os.PathLike) -> Path:
    """Write the vision tower folder of an open_clip model source (open_clip:local-dir:DIR, open_clip:NAME@WEIGHTS)."""
    source = parse_model_source(source, ("open_clip",))
    clip = create_open_clip(source)
    model = to_clip_vision_model(clip.visual, str(source))
    processor = open_clip_image_processor(clip, str(source))
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
