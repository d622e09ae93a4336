"""Image-text models for zero-shot evaluation, from three sources.

uta + a released checkpoint          its own vision and text towers, open_clip's default BPE tokenizer
uta + a student checkpoint           (NAME.safetensors + NAME.json, from pre-training) paired with the text
                                     tower and tokenizer of a CLIP given as openclip:NAME (the teacher)
openclip:NAME [+ weights file]       any open_clip model, e.g. the teacher itself
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
from llava_uta.model.official import UTACLIP, load_official_checkpoint
from llava_uta.model.openclip_loader import create_openclip, openclip_tokenizer


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


def load_openclip(spec: str, weights: str | os.PathLike | None) -> ZeroShotModel:
    """openclip:NAME (weights from a local file, open_clip or EVA-CLIP layout) or openclip:local-dir:PATH."""
    name = spec.removeprefix("openclip:")
    model = create_openclip(name, weights)
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    return ZeroShotModel(
        model.eval(),
        openclip_tokenizer(name),
        size if isinstance(size, int) else size[0],
        tuple(cfg.get("mean", OPENAI_DATASET_MEAN)),
        tuple(cfg.get("std", OPENAI_DATASET_STD)),
    )


def load_uta(
    checkpoint: str | os.PathLike, text_model: str | None = None, text_weights: str | os.PathLike | None = None
) -> ZeroShotModel:
    """A released UTA checkpoint, or a student checkpoint paired with the text tower of `text_model`."""
    if not student_config_path(checkpoint).is_file():
        clip = load_official_checkpoint(checkpoint)
        tokenizer = SimpleTokenizer(context_length=clip.text.context_length)
        return ZeroShotModel(clip, tokenizer, clip.visual.cfg.img_size)
    if text_model is None:
        raise ValueError(f"{checkpoint} is a UTA student (vision only): give --text-model openclip:NAME for its text")
    student = load_uta_vit(checkpoint)
    teacher = load_openclip(text_model, text_weights)
    text = OpenCLIPText(teacher.model)
    with torch.no_grad():
        text_dim = text(teacher.tokenizer(["a photo"])).shape[-1]
    if text_dim != student.cfg.out_dim:
        raise ValueError(f"student embeds into {student.cfg.out_dim} dims but {text_model} text into {text_dim}")
    return ZeroShotModel(UTACLIP(student, text).eval(), teacher.tokenizer, student.cfg.img_size)


def load_zeroshot_model(
    model: str,
    checkpoint: str | os.PathLike | None = None,
    text_model: str | None = None,
    text_weights: str | os.PathLike | None = None,
) -> ZeroShotModel:
    """model is "uta" (checkpoint: released or student) or "openclip:NAME" (checkpoint: its weights, optional)."""
    if model.startswith("openclip:"):
        return load_openclip(model, checkpoint)
    if model == "uta":
        if checkpoint is None:
            raise ValueError("--model uta needs --checkpoint (a released UTA checkpoint or a student .safetensors)")
        return load_uta(checkpoint, text_model, text_weights)
    raise ValueError(f"unknown model source {model!r}: use 'uta' or 'openclip:NAME'")
