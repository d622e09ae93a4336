"""The UTA vision transformer (student of Unmasked Token Alignment, Liu et al., TMLR 2024).

An EVA-02-style plain ViT, as released with UTA (docs/uta.md#student-architecture):
pre-LN blocks; separate q/k/v projections with q and v bias (no k bias); 2-D RoPE on the patch tokens
(not on CLS), built for a 16x16 reference grid and interpolated to the actual grid, interleaved pairs,
first half of each head rotated by the row index and the second half by the column index; a learned
absolute position embedding as well; SwiGLU MLP with a LayerNorm on its hidden (no LayerNorm inside
attention); final LayerNorm; a linear head into the CLIP joint space. LayerNorm eps is 1e-6.

timm's `Eva` expresses exactly this (tests/test_official_checkpoint.py checks it against an independent
reference forward, tests/test_uta_vit.py the RoPE table entry by entry),
so `UTAViT` subclasses it and adds the UTA forward: only CLS + the kept patch tokens enter the blocks,
with the absolute position embedding added before the tokens are dropped and the RoPE rows gathered at
the kept positions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.eva import Eva
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class UTAViTConfig:
    img_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 2.6667  # SwiGLU hidden = int(width * mlp_ratio), as in the official code
    out_dim: int = 1024  # width of the CLIP joint space the head projects into
    rope_ref_grid: int = 16  # RoPE positions are scaled onto this grid (official pt_seq_len)
    drop_path_rate: float = 0.0
    in_chans: int = 3
    use_mask_token: bool = False  # a learned [MASK] embedding, for the masked-image-modelling baseline

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.num_heads or (self.width // self.num_heads) % 4:
            raise ValueError(f"width {self.width} / num_heads {self.num_heads} must give a head_dim divisible by 4")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)


UTA_VIT_CONFIGS: dict[str, UTAViTConfig] = {
    # the released models (official eva_base_p16, eva_large_p14_336, eva_giant_p14_336)
    "uta_b16_224": UTAViTConfig(),
    "uta_l14_336": UTAViTConfig(img_size=336, patch_size=14, width=1024, depth=24, num_heads=16),
    "uta_g14_336": UTAViTConfig(
        img_size=336, patch_size=14, width=1408, depth=40, num_heads=16, mlp_ratio=4.3637 * 2 / 3
    ),
    # the pre-training shape: 224 px with patch 14 is the 16x16 RoPE reference grid
    "uta_b14_224": UTAViTConfig(patch_size=14),
    "uta_l14_224": UTAViTConfig(patch_size=14, width=1024, depth=24, num_heads=16),
    # CPU-sized models for the embedded default and the tests
    "uta_tiny_p8_64": UTAViTConfig(img_size=64, patch_size=8, width=128, depth=4, num_heads=4, out_dim=128),
    "uta_test_p8_32": UTAViTConfig(img_size=32, patch_size=8, width=32, depth=2, num_heads=2, out_dim=32),
}


@dataclass
class UTAViTOutput:
    features: Tensor  # (B, 1+K, out_dim): head(norm(tokens)), CLS first
    hidden_states: tuple[Tensor, ...]  # (B, 1+K, width) each: the input of block 0, then each block's output


class UTAViT(Eva):
    """UTA ViT: timm's Eva configured as the official model, with a keep-indices (masked) forward."""

    def __init__(self, cfg: UTAViTConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__(
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            in_chans=cfg.in_chans,
            num_classes=cfg.out_dim,
            global_pool="token",
            embed_dim=cfg.width,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            qkv_bias=True,
            qkv_fused=False,
            mlp_ratio=cfg.mlp_ratio,
            swiglu_mlp=True,
            scale_mlp=True,
            scale_attn_inner=False,
            drop_path_rate=cfg.drop_path_rate,
            use_rot_pos_emb=True,
            ref_feat_shape=(cfg.rope_ref_grid, cfg.rope_ref_grid),
            device=device,
            dtype=dtype,
        )
        self.cfg = cfg
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.width, device=device, dtype=dtype)) \
            if cfg.use_mask_token else None
        if self.mask_token is not None:
            nn.init.trunc_normal_(self.mask_token, std=0.02)
        for blk in self.blocks:
            blk.attn.fused_attn = True  # always F.scaled_dot_product_attention, whatever TIMM_FUSED_ATTN says

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"} | ({"mask_token"} if self.mask_token is not None else set())

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layers for layer-wise lr decay, as BEiT/EVA-02: embeddings + [MASK] first, blocks, then norm + head.

        timm's Eva matcher puts the final norm with the last block and the unmatched [MASK] token at the top.
        """
        return dict(stem=r"^(?:cls_token|pos_embed|patch_embed|mask_token)",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^(?:norm|head)\.", (self.cfg.depth,))])

    def rope_embed(self, keep_indices: Tensor | None = None) -> Tensor:
        """RoPE sin|cos rows: (N, 2*head_dim) for the full grid, (B, 1, K, 2*head_dim) at the kept patches."""
        rope = self.rope.get_embed()
        if keep_indices is None:
            return rope
        return rope[keep_indices].unsqueeze(1)  # the singleton broadcasts over heads

    def embed(
        self, pixel_values: Tensor, keep_indices: Tensor | None = None, bool_masked_pos: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Patch-embed, prepend CLS, add the absolute position embedding, then keep CLS + the kept patches.

        bool_masked_pos (B, N), for the MIM baseline: those patches are replaced by the [MASK] embedding.
        """
        x = self.patch_embed(pixel_values)  # (B, N, D)
        if bool_masked_pos is not None:
            if self.mask_token is None:
                raise ValueError("bool_masked_pos needs a model built with use_mask_token=True")
            x = torch.where(bool_masked_pos.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        if keep_indices is None:
            return x, self.rope_embed()
        if keep_indices.dim() != 2 or keep_indices.shape[0] != x.shape[0] or keep_indices.is_floating_point():
            raise ValueError(f"keep_indices must be an integer (B, K) tensor, got {tuple(keep_indices.shape)}")
        patches = x[:, 1:].gather(1, keep_indices.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return torch.cat([x[:, :1], patches], dim=1), self.rope_embed(keep_indices)

    def forward_blocks(
        self, pixel_values: Tensor, keep_indices: Tensor | None = None, bool_masked_pos: Tensor | None = None
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Last block's tokens (no final norm) and all hidden states, block-0 input first."""
        x, rope = self.embed(pixel_values, keep_indices, bool_masked_pos)
        hidden_states = [x]
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, rope, use_reentrant=False)
            else:
                x = blk(x, rope=rope)
            hidden_states.append(x)
        return x, tuple(hidden_states)

    def forward(
        self, pixel_values: Tensor, keep_indices: Tensor | None = None, bool_masked_pos: Tensor | None = None
    ) -> UTAViTOutput:
        """Per-token CLIP-space features of CLS + the kept patches (all patches if keep_indices is None).

        keep_indices: (B, K) indices into the row-major patch grid (0..N-1), the same K for every sample.
        bool_masked_pos: (B, N) bool, MIM baseline only (see `embed`).
        """
        x, hidden_states = self.forward_blocks(pixel_values, keep_indices, bool_masked_pos)
        return UTAViTOutput(features=self.head(self.norm(x)), hidden_states=hidden_states)

    def encode_image(self, pixel_values: Tensor, normalize: bool = False) -> Tensor:
        """The CLIP image embedding: head(norm(CLS)), (B, out_dim)."""
        x, _ = self.forward_blocks(pixel_values)
        features = self.head(self.norm(x[:, 0]))
        return F.normalize(features, dim=-1) if normalize else features


def build_uta_vit(name: str, **overrides) -> UTAViT:
    """Build a named config (see UTA_VIT_CONFIGS); any UTAViTConfig field can be overridden."""
    if name not in UTA_VIT_CONFIGS:
        raise KeyError(f"unknown UTA ViT config {name!r}; known: {', '.join(UTA_VIT_CONFIGS)}")
    return UTAViT(dataclasses.replace(UTA_VIT_CONFIGS[name], **overrides))
