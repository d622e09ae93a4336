"""Comparing float tensors that were summed in another order (accumulated micro-batches, ranks, fused kernels).

Such sums differ by the rounding of their largest terms, so an element that is near zero because large terms cancel
can differ by more than any elementwise tolerance allows, on one CPU's summation order and not another's (MKL on a
Xeon against OpenBLAS on an EPYC). The tolerance is therefore a share of each tensor's largest value.
"""

from __future__ import annotations

import torch


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The gradients a backward pass left, by parameter name."""
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_close_to_scale(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], rel: float) -> None:
    """The same names, and each tensor within `rel` x its largest magnitude (at least 1) of the expected one."""
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        scale = max(1.0, value.abs().max().item())
        difference = (value - got[name]).abs().max().item()
        assert difference <= rel * scale, f"{name}: largest difference {difference:.3g} > {rel:g} x {scale:.3g}"
