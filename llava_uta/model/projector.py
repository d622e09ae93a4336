"""LLaVA's projector types on transformers' LlavaMultiModalProjector, and LLaVA's `mm_projector.bin` format.

transformers' projector is always linear_1 -> act -> linear_2 (`projector_hidden_act`, bias from
`multimodal_projector_bias`). `mlp2x_gelu` (LLaVA-1.5) is exactly that with exact GELU: LLaVA's
`mm_projector.0` / `.2` are `linear_1` / `linear_2`. `linear` (original LLaVA) is expressed with
`projector_hidden_act="linear"` (identity) and `linear_2` fixed to the identity matrix with zero bias and never
trained, so a saved model needs no custom code to load. On export the two layers are folded into one
(W2 @ W1, W2 @ b1 + b2), which is exact even if linear_2 was changed.

`pixel_shuffleF_mlp2x_gelu` (Idefics3, SmolVLM and nanoVLM's connector) merges each F x F block of neighbouring patch
tokens into one token (their features concatenated, space-to-depth) before the same MLP: F^2 times fewer image tokens
for the LM. transformers' Llava cannot hold that projector, so a model with it is a `LlavaMergeForConditionalGeneration`
(`merge_llava`); its `mm_projector.bin` has mlp2x_gelu's keys, with F^2 times the input width.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations import is_deepspeed_zero3_enabled

PROJECTOR_ACTIVATIONS = {"linear": "linear", "mlp2x_gelu": "gelu"}
MERGE_PROJECTOR = re.compile(r"pixel_shuffle([2-9]|[1-9][0-9]+)_mlp2x_gelu")  # F >= 2 (F = 1 is mlp2x_gelu)
LLAVA_PREFIX = "model.mm_projector."


@contextlib.contextmanager
def gathered(params: Iterable[nn.Parameter], modify: bool = False) -> Iterator[None]:
    """Full parameters inside the block under DeepSpeed ZeRO-3 (rank 0's changes kept if `modify`); else a no-op."""
    params = list(params)
    if not is_deepspeed_zero3_enabled():
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
        yield


def check_projector_type(projector_type: str) -> str:
    if projector_type not in PROJECTOR_ACTIVATIONS and not MERGE_PROJECTOR.fullmatch(projector_type):
        raise ValueError(f"mm_projector_type must be one of {sorted(PROJECTOR_ACTIVATIONS)} or "
                         "pixel_shuffleF_mlp2x_gelu (F x F patch tokens merged into one, e.g. "
                         f"pixel_shuffle2_mlp2x_gelu), got {projector_type!r}")
    return projector_type


def merge_factor(projector_type: str) -> int:
    """F of a pixel_shuffleF projector (F x F patch tokens per image token); 1 for linear and mlp2x_gelu."""
    match = MERGE_PROJECTOR.fullmatch(check_projector_type(projector_type))
    return int(match.group(1)) if match else 1


def projector_activation(projector_type: str) -> str:
    return "gelu" if MERGE_PROJECTOR.fullmatch(check_projector_type(projector_type)) else \
        PROJECTOR_ACTIVATIONS[projector_type]


def pixel_shuffle(tokens: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, H*W, D) patch tokens of a square grid, row-major -> (B, H*W / F^2, F^2 * D): token (i, j) of the
    (H/F) x (W/F) grid, row-major, is the concatenation of patches (F*i + a, F*j + b) for a, then b, in 0..F-1."""
    batch, n, dim = tokens.shape
    side = int(n**0.5)
    if side * side != n or side % factor:
        raise ValueError(f"pixel shuffle by {factor} needs a square grid with a side divisible by {factor}, "
                         f"got {n} tokens")
    grid = tokens.reshape(batch, side // factor, factor, side // factor, factor, dim)
    return grid.permute(0, 1, 3, 2, 4, 5).reshape(batch, n // factor**2, factor * factor * dim)


class TokenMergeProjector(nn.Module):
    """pixel_shuffleF_mlp2x_gelu: F x F neighbouring patch tokens concatenated, then LLaVA-1.5's two-layer MLP.

    `config` is the Llava config: vision_config.hidden_size in, text_config.hidden_size out, `mm_projector_type`.
    """

    def __init__(self, config):
        super().__init__()
        self.factor = merge_factor(config.mm_projector_type)
        width, out = config.vision_config.hidden_size * self.factor**2, config.text_config.hidden_size
        self.linear_1 = nn.Linear(width, out, bias=config.multimodal_projector_bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(out, out, bias=config.multimodal_projector_bias)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(pixel_shuffle(image_features, self.factor))))


def init_linear_projector(projector: nn.Module) -> None:
    """Fix linear_2 to the identity so that linear_1 alone is the `linear` projector."""
    with gathered(projector.linear_2.parameters(), modify=True), torch.no_grad():
        nn.init.eye_(projector.linear_2.weight)
        if projector.linear_2.bias is not None:
            projector.linear_2.bias.zero_()


def trainable_projector_parameters(projector: nn.Module, projector_type: str) -> list[nn.Parameter]:
    """The projector weights a training run updates (linear_2 stays the identity for `linear`)."""
    layers = [projector.linear_1] if projector_type == "linear" else [projector.linear_1, projector.linear_2]
    return [p for layer in layers for p in layer.parameters()]


def projector_to_llava(projector: nn.Module, projector_type: str) -> dict[str, torch.Tensor]:
    """The projector under LLaVA's key names (e.g. model.mm_projector.0.weight), on the CPU in float32."""
    with gathered(projector.parameters()):
        params = {k: v.detach().float().cpu().clone() for k, v in projector.state_dict().items()}
    if projector_type != "linear":
        return {LLAVA_PREFIX + k.replace("linear_1.", "0.").replace("linear_2.", "2."): v for k, v in params.items()}
    w1, w2 = params["linear_1.weight"], params["linear_2.weight"]
    state = {LLAVA_PREFIX + "weight": w2 @ w1}
    if "linear_1.bias" in params:
        state[LLAVA_PREFIX + "bias"] = w2 @ params["linear_1.bias"] + params["linear_2.bias"]
    return state


def load_llava_projector(projector: nn.Module, state: dict[str, torch.Tensor], projector_type: str) -> None:
    """Load LLaVA `mm_projector` weights (keys may carry any prefix before `mm_projector.`) into the projector."""
    weights = {k.split("mm_projector.", 1)[1]: v for k, v in state.items() if "mm_projector." in k}
    if projector_type != "linear":
        layer = {"0": "linear_1", "2": "linear_2"}
        ours = {layer.get(k.split(".")[0], "?") + k[k.index(".") :]: v for k, v in weights.items() if "." in k}
    else:
        ours = {"linear_1." + k: v for k, v in weights.items()}
    expected = {k for k in projector.state_dict() if projector_type != "linear" or k.startswith("linear_1.")}
    if set(ours) != expected:
        found = sorted(weights) or sorted(state)[:8]
        raise ValueError(f"not a {projector_type} mm_projector: found keys {found}, expected {sorted(expected)}")
    with gathered(projector.parameters(), modify=True), torch.no_grad():
        targets = projector.state_dict()
        for key, value in ours.items():
            if targets[key].shape != value.shape:
                raise ValueError(f"mm_projector {key}: shape {tuple(value.shape)} != model {tuple(targets[key].shape)}")
            targets[key].copy_(value)
    if projector_type == "linear":
        init_linear_projector(projector)

