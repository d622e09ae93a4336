"""What the student sees and what it is aligned to, for UTA and the baselines it is compared with.

Every objective is a negative cosine similarity between student head outputs and the frozen teacher's
targets at the same token positions (EVA-02's `-cos(student, teacher).mean()`); they differ in the input:

- `uta`: the student sees CLS + the K kept patches only (no [MASK] tokens) and is aligned on all of them;
- `mim`: EVA-02 masked image modelling: every position enters, the masked ones as a learned [MASK]
  embedding, and the student predicts the teacher's tokens at the masked positions;
- `fd`: feature distillation: the full image, every token aligned, no masking;
- `cls`: the full image, only the CLS token aligned.

`cls_weight` sets the CLS term's share of the loss. None keeps the plain mean over all aligned tokens
(CLS weighs 1/(1+K) in UTA); `mim` aligns no CLS unless a weight is given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from llava_uta.model.uta_vit import UTAViT

OBJECTIVES = ("uta", "mim", "fd", "cls")


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


def objective_loss(
    objective: str, student: UTAViT, images: Tensor, targets: Tensor, keep_indices: Tensor | None,
    cls_weight: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Run the student as `objective` prescribes and align it to `targets` (B, 1+N, E) from the teacher."""
    if objective == "uta":
        pred = student(images, keep_indices=keep_indices).features
        return cosine_alignment(pred[:, 0], targets[:, 0], pred[:, 1:], gather_patches(targets, keep_indices),
                                cls_weight)
    if objective == "mim":
        masked_idx, masked = masked_indices(keep_indices, targets.shape[1] - 1)
        pred = student(images, bool_masked_pos=masked).features
        patch_pred, patch_target = gather_patches(pred, masked_idx), gather_patches(targets, masked_idx)
        if not cls_weight:
            return cosine_alignment(None, None, patch_pred, patch_target, None)
        return cosine_alignment(pred[:, 0], targets[:, 0], patch_pred, patch_target, cls_weight)
    if objective == "fd":
        pred = student(images).features
        return cosine_alignment(pred[:, 0], targets[:, 0], pred[:, 1:], targets[:, 1:], cls_weight)
    if objective == "cls":
        return cosine_alignment(student.encode_image(images), targets[:, 0], None, None, None)
    raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
