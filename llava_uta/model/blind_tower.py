"""The blind baseline's vision tower: a copy of a tower folder that cannot see.

LLaVA trained on this tower follows the exact recipe of the real one (same architecture, number of image tokens,
projector, data, steps), but the tower's patch embedding is zeroed, so every image gives the same visual tokens
(position embeddings and biases only). Its config says `image_withheld`, and training never unfreezes a withheld
tower's patch embedding (--unfreeze_mm_vision_tower trains the rest), so it stays blind. Whatever such a model scores
comes from the question and the language prior; a real tower helps only by its margin over it.

    llava-uta-convert --blind runs/shapes/towers/uta runs/shapes/towers/blind
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoImageProcessor

from llava_uta.model.llava_builder import load_vision_tower


def blind_tower(tower_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write `tower_dir` to `out_dir` with its patch embedding (the tower's one Conv2d) set to zero and its config
    marked `image_withheld`."""
    tower = load_vision_tower(tower_dir)
    convs = [m for m in tower.modules() if isinstance(m, torch.nn.Conv2d)]
    if len(convs) != 1:
        raise ValueError(f"{tower_dir}: expected a ViT tower with one Conv2d patch embedding, found {len(convs)}")
    with torch.no_grad():
        convs[0].weight.zero_()
        if convs[0].bias is not None:
            convs[0].bias.zero_()
    tower.config.image_withheld = True
    out_dir = Path(out_dir)
    tower.save_pretrained(out_dir)
    AutoImageProcessor.from_pretrained(tower_dir).save_pretrained(out_dir)
    return out_dir
