"""The released UTA checkpoints (github.com/jihaonew/UTA): layout, conversion and strict loading.

A released checkpoint is one flat state dict (docs/uta.md#released-checkpoints):
  visual.*     the EVA-style vision tower; its RoPE tables are stored as buffers, once at `visual.rope.*`
               and again in every block at `visual.blocks.{i}.attn.rope.*`
  text.*       an open_clip-style text tower (width 1024, 24 layers, 16 heads, GELU, vocab 49408, ctx 77)
  logit_scale  the learned CLIP temperature (unused by the zero-shot protocol, which scales logits by 100)
Everything is shape-inferred from the weights, so the three released sizes and any tiny test model load the
same way. Loading is strict: every tensor is used, the RoPE tables are checked against recomputed ones.
"""

from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from open_clip.transformer import TextTransformer
from torch import Tensor, nn

from llava_uta.model.checkpoint import (
    CheckpointError,
    load_state_dict_file,
    load_strict,
    load_uta_vit,
    resize_uta_vit,
    safetensors_metadata,
    save_state_dict_file,
    student_config_path,
)
from llava_uta.model.uta_vit import UTAViT, UTAViTConfig

# official vision key fragment -> ours (timm Eva names); all other names are identical
VISUAL_RENAMES = (
    (".attn.q_bias", ".attn.q_proj.bias"),
    (".attn.v_bias", ".attn.v_proj.bias"),
    (".mlp.w1.", ".mlp.fc1_g."),  # gate: SiLU(w1 x) * (w2 x)
    (".mlp.w2.", ".mlp.fc1_x."),
    (".mlp.ffn_ln.", ".mlp.norm."),
    (".mlp.w3.", ".mlp.fc2."),
)
ROPE_KEY = re.compile(r"^(blocks\.\d+\.attn\.)?rope\.freqs_(cos|sin)$")
TEXT_HEAD_DIM = 64  # heads are not visible in the weights; every open_clip / official text tower uses 64


class UTACLIP(nn.Module):
    """A UTA image tower paired with a CLIP text tower (the released checkpoints' `visual`, `text`, `logit_scale`)."""

    def __init__(self, visual: UTAViT, text: nn.Module, logit_scale: float = math.log(1 / 0.07)):
        super().__init__()
        self.visual = visual
        self.text = text  # any module mapping (B, L) token ids to (B, embed_dim) text embeddings
        self.logit_scale = nn.Parameter(torch.tensor(logit_scale))

    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        return self.visual.encode_image(images, normalize=normalize)

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        features = self.text(tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(normalised image features, normalised text features, logit scale), like open_clip's CLIP."""
        return self.encode_image(images, True), self.encode_text(tokens, True), self.logit_scale.exp()


def _require(sd: dict[str, Tensor], key: str, source: str) -> Tensor:
    if key not in sd:
        raise CheckpointError(f"{source}: missing {key!r}; not an official UTA checkpoint (keys: {sorted(sd)[:8]} ...)")
    return sd[key]


def _num_layers(sd: dict[str, Tensor], pattern: str) -> int:
    return len({m.group(1) for k in sd if (m := re.match(pattern, k))})


def official_vision_config(visual: dict[str, Tensor], source: str = "checkpoint") -> UTAViTConfig:
    """Infer the UTAViTConfig of an official `visual.*` state dict (prefix stripped) from its shapes."""
    width = _require(visual, "cls_token", source).shape[-1]
    patch_size = _require(visual, "patch_embed.proj.weight", source).shape[-1]
    grid = math.isqrt(_require(visual, "pos_embed", source).shape[1] - 1)
    head_dim = _require(visual, "rope.freqs_cos", source).shape[-1]
    hidden = _require(visual, "blocks.0.mlp.w1.weight", source).shape[0]
    mlp_ratio = hidden / width
    if int(width * mlp_ratio) != hidden:  # guard against float rounding below the integer
        mlp_ratio = (hidden + 0.5) / width
    return UTAViTConfig(
        img_size=grid * patch_size,
        patch_size=patch_size,
        width=width,
        depth=_num_layers(visual, r"^blocks\.(\d+)\."),
        num_heads=width // head_dim,
        mlp_ratio=mlp_ratio,
        out_dim=_require(visual, "head.weight", source).shape[0],
        in_chans=visual["patch_embed.proj.weight"].shape[1],
    )


def convert_official_visual(visual: dict[str, Tensor], model: UTAViT, source: str = "checkpoint") -> dict[str, Tensor]:
    """Rename official vision keys to ours, after checking the stored RoPE tables against the model's."""
    sin, cos = model.rope.get_embed().chunk(2, dim=-1)
    rope_ref = {"cos": cos, "sin": sin}
    converted = {}
    for key, value in visual.items():
        if m := ROPE_KEY.match(key):
            ref = rope_ref[m.group(2)]
            if value.shape != ref.shape or not torch.allclose(value.float(), ref, atol=2e-3):
                raise CheckpointError(
                    f"{source}: RoPE table visual.{key} {tuple(value.shape)} differs from the one recomputed for "
                    f"{model.cfg.grid_size}x{model.cfg.grid_size} patches on a {model.cfg.rope_ref_grid}-grid "
                    f"reference {tuple(ref.shape)}"
                )
            continue
        for old, new in VISUAL_RENAMES:
            key = key.replace(old, new)
        converted[key] = value
    expected_rope = 2 * (model.cfg.depth + 1)
    if (found := sum(bool(ROPE_KEY.match(k)) for k in visual)) != expected_rope:
        raise CheckpointError(
            f"{source}: expected {expected_rope} visual RoPE tables (shared + per block), found {found}"
        )
    return converted


def official_text_tower(
    text: dict[str, Tensor], heads: int | None = None, source: str = "checkpoint"
) -> TextTransformer:
    """An open_clip TextTransformer shaped like an official `text.*` state dict (prefix stripped)."""
    vocab_size, width = _require(text, "token_embedding.weight", source).shape
    return TextTransformer(
        context_length=_require(text, "positional_embedding", source).shape[0],
        vocab_size=vocab_size,
        width=width,
        heads=heads or width // TEXT_HEAD_DIM,
        layers=_num_layers(text, r"^transformer\.resblocks\.(\d+)\."),
        mlp_ratio=_require(text, "transformer.resblocks.0.mlp.c_fc.weight", source).shape[0] / width,
        output_dim=_require(text, "text_projection", source).shape[1],
        act_layer=nn.GELU,
    )


def split_official(state_dict: dict[str, Tensor], source: str) -> tuple[dict, dict, Tensor]:
    """Split a released checkpoint into (visual, text, logit_scale), rejecting anything else."""
    visual = {k.removeprefix("visual."): v for k, v in state_dict.items() if k.startswith("visual.")}
    text = {k.removeprefix("text."): v for k, v in state_dict.items() if k.startswith("text.")}
    extra = sorted(k for k in state_dict if not k.startswith(("visual.", "text.")) and k != "logit_scale")
    if extra:
        raise CheckpointError(f"{source}: unexpected keys outside visual.*, text.*, logit_scale: {extra[:12]}")
    if not visual or not text:
        raise CheckpointError(
            f"{source}: an official UTA checkpoint holds visual.*, text.* and logit_scale; "
            f"found {len(visual)} visual and {len(text)} text tensors (first keys: {sorted(state_dict)[:6]})"
        )
    return visual, text, _require(state_dict, "logit_scale", source)


def build_official_visual(visual: dict[str, Tensor], source: str) -> UTAViT:
    """A UTAViT strictly loaded from an official `visual.*` state dict (prefix stripped)."""
    model = UTAViT(official_vision_config(visual, source))
    load_strict(model, convert_official_visual(visual, model, source), f"{source} (visual.*)")
    return model


def load_official_visual(path: str | os.PathLike, img_size: int | None = None) -> UTAViT:
    """Only the vision tower of a released checkpoint, in eval mode; at another input size if img_size is given."""
    visual, _, _ = split_official(load_state_dict_file(path), str(path))
    model = build_official_visual(visual, str(path)).eval()
    return model if img_size is None else resize_uta_vit(model, img_size)


def load_official_checkpoint(path: str | os.PathLike, text_heads: int | None = None) -> UTACLIP:
    """A released UTA checkpoint as a UTACLIP (vision + text + logit_scale), loaded strictly, in eval mode.

    The text tower's head count is not in the weights: `text_heads`, else the `text_heads` entry of a .safetensors
    file's metadata (what `save_official` writes), else one head per 64 channels as in every released model.
    """
    source = str(path)
    visual_sd, text_sd, logit_scale = split_official(load_state_dict_file(path), source)
    text_heads = text_heads or int(safetensors_metadata(path).get("text_heads", 0)) or None
    visual = build_official_visual(visual_sd, source)
    text = official_text_tower(text_sd, text_heads, source)
    load_strict(text, text_sd, f"{source} (text.*)")
    return UTACLIP(visual, text, logit_scale=float(logit_scale)).eval()


def export_official(visual: UTAViT, clip_text: nn.Module | None = None, logit_scale: float = math.log(1 / 0.07)
                    ) -> dict[str, Tensor]:
    """The released key layout for a UTAViT (e.g. a pre-training student), with RoPE tables in every block.

    `clip_text` (an open_clip CLIP, e.g. the teacher) supplies `text.*`; without it only `visual.*` is written.
    """
    state = {k: v for k, v in visual.state_dict().items() if k != "mask_token"}  # the MIM baseline's [MASK]
    for old, new in VISUAL_RENAMES:
        state = {k.replace(new, old): v for k, v in state.items()}
    sin, cos = visual.rope.get_embed().chunk(2, dim=-1)
    for prefix in ["", *(f"blocks.{i}.attn." for i in range(visual.cfg.depth))]:
        state[f"{prefix}rope.freqs_cos"], state[f"{prefix}rope.freqs_sin"] = cos.clone(), sin.clone()
    out = {f"visual.{k}": v.detach().cpu().contiguous() for k, v in state.items()}
    if clip_text is not None:
        out.update({f"text.{k}": v.detach().cpu().contiguous() for k, v in clip_text.state_dict().items()
                    if not k.startswith("visual.") and k not in ("logit_scale", "logit_bias")})
    out["logit_scale"] = torch.tensor(logit_scale)
    return out


def save_official(clip: UTACLIP, path: str | os.PathLike) -> None:
    """Write a UTACLIP in the released key layout as .safetensors, atomically, its text head count in the metadata."""
    state = export_official(clip.visual, clip.text, float(clip.logit_scale))
    save_state_dict_file(state, path, metadata={"format": "pt", "text_heads": str(clip.text.heads)})


def open_clip_text_tower(clip: nn.Module, tokenizer: Callable[[list[str]], Tensor], source: str) -> TextTransformer:
    """The text tower of an open_clip CLIP as the standalone TextTransformer of the released layout (`text.*`).

    The released layout holds a plain GELU TextTransformer; a tower it cannot express (QuickGELU, a Hugging Face
    text model, another pooling) is refused by checking that both compute the same embeddings.
    """
    if isinstance(getattr(clip, "text", None), TextTransformer):
        text = copy.deepcopy(clip.text)
    else:
        state = {k: v for k, v in clip.state_dict().items()
                 if not k.startswith("visual.") and k not in ("logit_scale", "logit_bias")}
        if "token_embedding.weight" not in state:
            raise CheckpointError(f"{source}: no open_clip text tower (token_embedding) to fine-tune")
        text = official_text_tower(state, clip.transformer.resblocks[0].attn.num_heads, source)
        load_strict(text, state, f"{source} (text tower)")
    tokens = tokenizer(["a photo of a red square", "two circles"])
    with torch.no_grad():
        same = torch.allclose(text.eval()(tokens), clip.eval().encode_text(tokens), atol=1e-5)
    if not same:
        raise CheckpointError(f"{source}: its text tower is not the plain GELU open_clip TextTransformer that the "
                              "released layout holds (QuickGELU, a Hugging Face text model or other pooling?)")
    return text


def load_any_uta_vit(path: str | os.PathLike, kind: str = "auto", img_size: int | None = None) -> UTAViT:
    """A student checkpoint (PATH.json beside it) or a released checkpoint's vision tower, at img_size if given."""
    if kind == "auto":
        kind = "student" if student_config_path(path).is_file() else "official"
    return load_uta_vit(path, img_size) if kind == "student" else load_official_visual(path, img_size)
