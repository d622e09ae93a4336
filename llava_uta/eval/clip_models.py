"""Image-text models for zero-shot evaluation, from model sources (docs/model-sources.md).

uta:FILE (or FILE), a released checkpoint   its own vision and text towers, open_clip's default BPE tokenizer
uta:FILE (or FILE), a student checkpoint    (NAME.safetensors + NAME.json, from pre-training) paired with the text
                                            tower and tokenizer of an open_clip model (the teacher)
open_clip:NAME@WEIGHTS, open_clip:local-dir:DIR (or DIR)   any open_clip model, e.g. the teacher itself
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.tokenizer import SimpleTokenizer
from torch import Tensor, nn

from llava_uta.model.checkpoint import load_uta_vit, student_config_path
from llava_uta.model.model_source import ModelSource, parse_model_source
from llava_uta.model.official import UTACLIP, load_official_checkpoint
from llava_uta.model.open_clip_loader import create_open_clip, open_clip_tokenizer


@dataclass
class ZeroShotModel:
    model: nn.Module  # has encode_image(images, normalize=...) and encode_text(tokens, normalize=...)
    tokenizer: Callable[[list[str]], Tensor]
    image_size: int
    mean: tuple[float, ...] = OPENAI_DATASET_MEAN
    std: tuple[float, ...] = OPENAI_DATASET_STD


class OpenCLIPText(nn.Module):
    """The text tower of an open_clip model as a tokens -> embeddings module (its image tower is dropped)."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        clip.visual = nn.Identity()
        self.clip = clip

    def forward(self, tokens: Tensor) -> Tensor:
        return self.clip.encode_text(tokens)


def load_open_clip(source: str | ModelSource) -> ZeroShotModel:
    """open_clip:NAME@WEIGHTS (a local file, open_clip or EVA-CLIP layout) or open_clip:local-dir:DIR."""
    source = parse_model_source(source, ("open_clip",))
    model = create_open_clip(source)
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    return ZeroShotModel(
        model.eval(),
        open_clip_tokenizer(source),
        size if isinstance(size, int) else size[0],
        tuple(cfg.get("mean", OPENAI_DATASET_MEAN)),
        tuple(cfg.get("std", OPENAI_DATASET_STD)),
    )


def load_uta(checkpoint: str | os.PathLike, text_model: str | ModelSource | None = None) -> ZeroShotModel:
    """A released UTA checkpoint, or a student checkpoint paired with the text tower of `text_model`."""
    if not student_config_path(checkpoint).is_file():
        clip = load_official_checkpoint(checkpoint)
        tokenizer = SimpleTokenizer(context_length=clip.text.context_length)
        return ZeroShotModel(clip, tokenizer, clip.visual.cfg.img_size)
    if text_model is None:
        raise ValueError(
            f"{checkpoint} is a UTA student (vision only): give --text-model, an open_clip model, for its text tower"
        )
    student = load_uta_vit(checkpoint)
    teacher = load_open_clip(text_model)
    text = OpenCLIPText(teacher.model)
    with torch.no_grad():
        text_dim = text(teacher.tokenizer(["a photo"])).shape[-1]
    if text_dim != student.cfg.out_dim:
        raise ValueError(f"student embeds into {student.cfg.out_dim} dims but {text_model} text into {text_dim}")
    return ZeroShotModel(UTACLIP(student, text).eval(), teacher.tokenizer, student.cfg.img_size)


def load_zeroshot_model(model: str | ModelSource, text_model: str | ModelSource | None = None) -> ZeroShotModel:
    """A UTA checkpoint (released, or a student with the open_clip `text_model`) or an open_clip model."""
    source = parse_model_source(model, ("uta", "open_clip"))
    if source.random_init:
        raise ValueError(f"model source {model!r}: zero-shot evaluation needs trained weights, not random:")
    if source.kind == "open_clip":
        return load_open_clip(source)
    return load_uta(source.target, text_model)
