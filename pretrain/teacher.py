"""The frozen CLIP teacher: per-token targets in the CLIP joint space from any open_clip vision tower.

Targets for an image with an N-patch grid are a (B, 1 + N, E) tensor:
- index 0 (CLS): the final image embedding, exactly what zero-shot classification uses;
- 1..N (patches): the final-layer patch tokens after the tower's final norm, projected by the same
  image head (open_clip projects only the pooled token, so the head is applied to each token here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from torch import nn

from llava_uta.model.model_source import ModelSource
from llava_uta.model.open_clip_loader import create_open_clip

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_of(precision: str) -> torch.dtype:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


class CLIPTeacher(nn.Module):
    """A frozen open_clip vision tower (eval mode, no gradients) that returns per-token CLIP targets."""

    def __init__(self, visual: nn.Module, dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(visual, VisionTransformer | TimmModel):
            raise TypeError(f"teacher vision tower must be an open_clip VisionTransformer or TimmModel, "
                            f"got {type(visual).__name__}")
        self.visual = visual.to(dtype).eval().requires_grad_(False)
        self.dtype = dtype
        self.image_size = tuple(visual.image_size)
        self.patch_size = self._patch_size(visual)
        self.grid = (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])
        self.embed_dim = self(torch.zeros(1, 3, *self.image_size)).shape[-1]

    @staticmethod
    def _patch_size(visual: nn.Module) -> tuple[int, int]:
        if isinstance(visual, VisionTransformer):
            return tuple(visual.patch_size)
        return tuple(visual.trunk.patch_embed.patch_size)

    @classmethod
    def from_clip(cls, clip: nn.Module, precision: str = "fp32") -> CLIPTeacher:
        return cls(clip.visual, dtype_of(precision))

    @classmethod
    def from_pretrained(cls, source: str | ModelSource, precision: str = "fp32",
                        random_weights: bool = False) -> CLIPTeacher:
        """An open_clip model source: open_clip:NAME@WEIGHTS (open_clip or EVA-CLIP layout) or
        open_clip:local-dir:DIR (`random_weights`: a NAME alone, on purpose; timing only)."""
        dtype = dtype_of(precision)  # refuse a bad flag before loading a large model
        return cls(create_open_clip(source, random_weights=random_weights).visual, dtype)

    def train(self, mode: bool = True) -> CLIPTeacher:
        return super().train(False)  # always frozen

    def input_size_for(self, student_grid: tuple[int, int]) -> tuple[int, int]:
        """The teacher input size whose token grid equals the student's, or a clear error."""
        if tuple(student_grid) == self.grid:
            return self.image_size
        wanted = (student_grid[0] * self.patch_size[0], student_grid[1] * self.patch_size[1])
        dynamic = isinstance(self.visual, TimmModel) and getattr(self.visual.trunk, "dynamic_img_size", False)
        if not dynamic:
            raise ValueError(
                f"teacher token grid {self.grid[0]}x{self.grid[1]} ({self.image_size[0]} px / patch "
                f"{self.patch_size[0]}) differs from the student's {student_grid[0]}x{student_grid[1]}, and this "
                f"teacher cannot take {wanted[0]} px inputs: choose a student image size of "
                f"{self.grid[0]} x its patch size so that the grids match")
        return wanted

    def _project(self, tokens: torch.Tensor) -> torch.Tensor:
        """Apply the image head (what the pooled token goes through) to every normalised token."""
        if isinstance(self.visual, VisionTransformer):
            return tokens @ self.visual.proj if self.visual.proj is not None else tokens
        trunk = self.visual.trunk
        tokens = trunk.head(getattr(trunk, "fc_norm", nn.Identity())(tokens))
        return self.visual.head(tokens)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, student_grid: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, 1 + N, E) fp32 targets: CLS embedding, then patch tokens."""
        size = self.input_size_for(student_grid) if student_grid is not None else self.image_size
        if tuple(images.shape[-2:]) != tuple(size):
            images = F.interpolate(images, size=size, mode="bicubic", align_corners=False)
        return self.encode(images.to(self.dtype))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images already at the input size and in the teacher's dtype -> (B, 1 + N, E) fp32 targets."""
        out = self.visual.forward_intermediates(
            images, indices=1, output_fmt="NLC", output_extra_tokens=True,
            normalize_intermediates=True, intermediates_only=False)
        patches = self._project(out["image_intermediates"][-1])
        cls = out["image_features"].unsqueeze(1)
        return torch.cat([cls, patches], dim=1).float()

    def compile_encoder(self) -> None:
        """Run `encode` through torch.compile (inductor): the frozen tower is one fixed graph per input shape.

        The first call of each batch shape compiles (seconds to minutes); the targets equal the eager ones up to
        the rounding of fused kernels (tested)."""
        self.encode = torch.compile(self.encode, dynamic=False)
