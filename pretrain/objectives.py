"""What the student sees and what it is aligned to, for UTA and the baselines it is compared with.

Every objective is a negative cosine similarity between student head outputs and the frozen teacher's
targets at the same token positions (EVA-02's `-cos(student, teacher).mean()`); they differ in the input:

- `uta`: the student sees CLS + the K kept patches only (no [MASK] tokens) and is aligned on all of them;
- `mim`: EVA-02 masked image modelling: every position enters, the masked ones as a learned [MASK]
  embedding, and the student predicts the teacher's tokens at the masked positions;
- `fd`: feature distillation: the full image, every token aligned, no masking;
- `cls`: the full image, only the CLS token aligned.

With M keep sets per view (`--masks_per_view`, keep indices (B, M, K)) the student makes M passes over the same
images against the same teacher targets; they run as one batch of M x B rows, pass-major, and since every pass
aligns as many tokens the one mean over them is the mean of the M passes' losses. `uta` and `mim` take M > 1 (a
`mim` pass is a full-length forward with its own [MASK] set); `fd` and `cls` have no masks and refuse it.

`cls_weight` sets the CLS term's share of the loss. None keeps the plain mean over all aligned tokens
(CLS weighs 1/(1+K) in UTA); `mim` aligns no CLS unless a weight is given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from llava_uta.model.uta_vit import UTAViT


def gather_patches(tokens: Tensor, indices: Tensor) -> Tensor:
    """(B, 1+N, E) tokens, CLS first, and (B, K) patch indices -> the (B, K, E) patch tokens at those indices."""
    return tokens[:, 1:].gather(1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def masked_indices(keep_indices: Tensor, num_patches: int) -> tuple[Tensor, Tensor]:
    """The complement of the kept set: (B, N-K) sorted indices and the (B, N) bool mask of dropped patches."""
    masked = torch.ones(keep_indices.shape[0], num_patches, dtype=torch.bool, device=keep_indices.device)
    masked.scatter_(1, keep_indices, False)
    return masked.nonzero()[:, 1].view(keep_indices.shape[0], -1), masked


def cosine_alignment(
    cls_pred: Tensor | None, cls_target: Tensor | None, patch_pred: Tensor | None, patch_target: Tensor | None,
    cls_weight: float | None,
) -> tuple[Tensor, dict[str, float]]:
    """-cos over CLS (B, E) and patch (B, T, E) pairs; returns the loss and the separate CLS / patch cosines."""
    stats = {}
    cos_cls = F.cosine_similarity(cls_pred.float(), cls_target.float(), dim=-1) if cls_pred is not None else None
    cos_patch = F.cosine_similarity(patch_pred.float(), patch_target.float(), dim=-1) \
        if patch_pred is not None else None
    if cos_cls is not None:
        stats["cos_cls"] = cos_cls.mean().item()
    if cos_patch is not None:
        stats["cos_patch"] = cos_patch.mean().item()
    if cls_weight is None or cos_cls is None or cos_patch is None:
        columns = [c for c in (None if cos_cls is None else cos_cls[:, None], cos_patch) if c is not None]
        loss = -torch.cat(columns, dim=1).mean()  # one mean over all aligned tokens
    else:
        loss = -(cls_weight * cos_cls.mean() + (1 - cls_weight) * cos_patch.mean())
    return loss, stats


def _uta_loss(student: UTAViT, images: Tensor, targets: Tensor, keep: Tensor | None, cls_weight: float | None):
    pred = student(images, keep_indices=keep).features
    return cosine_alignment(pred[:, 0], targets[:, 0], pred[:, 1:], gather_patches(targets, keep), cls_weight)


def _mim_loss(student: UTAViT, images: Tensor, targets: Tensor, keep: Tensor | None, cls_weight: float | None):
    masked_idx, masked = masked_indices(keep, targets.shape[1] - 1)
    pred = student(images, bool_masked_pos=masked).features
    patch_pred, patch_target = gather_patches(pred, masked_idx), gather_patches(targets, masked_idx)
    if not cls_weight:
        return cosine_alignment(None, None, patch_pred, patch_target, None)
    return cosine_alignment(pred[:, 0], targets[:, 0], patch_pred, patch_target, cls_weight)


def _fd_loss(student: UTAViT, images: Tensor, targets: Tensor, keep: Tensor | None, cls_weight: float | None):
    pred = student(images).features
    return cosine_alignment(pred[:, 0], targets[:, 0], pred[:, 1:], targets[:, 1:], cls_weight)


def _cls_loss(student: UTAViT, images: Tensor, targets: Tensor, keep: Tensor | None, cls_weight: float | None):
    return cosine_alignment(student.encode_image(images), targets[:, 0], None, None, None)


@dataclass(frozen=True)
class Objective:
    """One objective and everything the rest of pre-training needs to know about it (the one place to look)."""

    name: str
    loss: Callable[[UTAViT, Tensor, Tensor, Tensor | None, float | None], tuple[Tensor, dict[str, float]]]
    kept_only: bool = False  # only CLS + the kept patches enter the student (UTA); else every position
    mask_token: bool = False  # masked positions enter as a learned [MASK] embedding (MIM)
    masking: str = "reversed_block"  # the default masking kind (MIM masks the blocks, as EVA-02 does)
    uses_masks: bool = True  # the loss depends on the keep sets, so several per view make sense (not fd, cls)

    def tokens_per_image(self, num_keep: int, num_patches: int) -> int:
        """Tokens the student's blocks process per image and pass (CLS included)."""
        return 1 + (num_keep if self.kept_only else num_patches)

    def check_masks_per_view(self, masks_per_view: int) -> None:
        if masks_per_view > 1 and not self.uses_masks:
            raise ValueError(f"--objective {self.name} uses no masks: --masks_per_view {masks_per_view} would "
                             f"repeat the same pass; use 1 (only uta and mim take several keep sets per view)")

    def passes_loss(self, student: UTAViT, images: Tensor, targets: Tensor, keep: Tensor | None,
                    cls_weight: float | None = None) -> tuple[Tensor, dict[str, float]]:
        """The loss of one pass (keep (B, K)) or the mean loss of M passes (keep (B, M, K)) on the same targets."""
        if keep is not None and keep.dim() == 3:
            passes = keep.shape[1]
            if passes > 1:
                self.check_masks_per_view(passes)
                images, targets = images.repeat(passes, 1, 1, 1), targets.repeat(passes, 1, 1)
            keep = keep.transpose(0, 1).reshape(-1, keep.shape[-1])  # pass-major: rows m*B .. m*B + B-1
        return self.loss(student, images, targets, keep, cls_weight)


OBJECTIVES = {o.name: o for o in (
    Objective("uta", _uta_loss, kept_only=True),
    Objective("mim", _mim_loss, mask_token=True, masking="block"),
    Objective("fd", _fd_loss, uses_masks=False),
    Objective("cls", _cls_loss, uses_masks=False),
)}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"--objective must be one of {tuple(OBJECTIVES)}, got {name!r}")
    return OBJECTIVES[name]


def objective_loss(
    objective: str, student: UTAViT, images: Tensor, targets: Tensor, keep_indices: Tensor | None,
    cls_weight: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Run the student as `objective` prescribes and align it to `targets` (B, 1+N, E) from the teacher.

    `keep_indices` (B, K) for one pass, or (B, M, K) for M passes on the same targets (their mean loss)."""
    return get_objective(objective).passes_loss(student, images, targets, keep_indices, cls_weight)


def flops_per_token(student: UTAViT) -> int:
    """Matmul FLOPs per token of a training step, forward + backward: 6 x the parameters that touch every token."""
    skipped = ("pos_embed", "cls_token", "mask_token")
    return 6 * sum(p.numel() for n, p in student.named_parameters() if n not in skipped)
