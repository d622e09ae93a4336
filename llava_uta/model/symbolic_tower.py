"""The symbolic tower: a diagnostic vision tower whose tokens are a ShapesWorld scene's facts, one token per grid cell.

It reads the code images of a symbolic world (`llava-uta-shapes --symbolic`: each cell shows its object's colour,
shape and size as white squares of a code pattern) back into one-hot vectors without error (its one weight, a fixed
identity readout, gives transformers a parameter). LLaVA trained on it through the usual stages answers from
perfectly readable per-cell facts: if it still cannot name a shape, the loss is in the LLaVA recipe, not in a tower's
features.

    llava-uta-shapes --symbolic --out playground/data/shapes-symbolic
    llava-uta-convert --symbolic playground/data/shapes-symbolic runs/shapes/towers/symbolic

Its hidden states follow the tower contract of transformers' Llava (CLS first, then the cells, row-major); every layer
returns the same tokens, so any `--mm_vision_select_layer` reads them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling

from llava_uta.model.processors import clip_image_processor


class SymbolicVisionConfig(PretrainedConfig):
    model_type = "shapes_symbolic"
    base_config_key = "vision_config"

    def __init__(
        self,
        image_size: int = 64,
        grid: int = 2,
        code_side: int = 4,
        facts: list[str] | None = None,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        **kwargs,
    ):
        self.image_size, self.grid, self.code_side = image_size, grid, code_side
        self.facts = list(facts or [])
        self.image_mean, self.image_std = list(image_mean or [0.0] * 3), list(image_std or [1.0] * 3)
        self.hidden_size = len(self.facts)  # one feature per fact: the token is the cell's one-hot facts
        self.patch_size = image_size // grid  # one token per cell (LlavaProcessor counts tokens from it)
        self.num_hidden_layers = 1
        super().__init__(**kwargs)


class SymbolicVisionModel(PreTrainedModel):
    config_class = SymbolicVisionConfig
    main_input_name = "pixel_values"
    base_model_prefix = "symbolic"
    input_modalities = ("image",)
    _supports_sdpa = True

    def __init__(self, config: SymbolicVisionConfig):
        super().__init__(config)
        self.patch_size = config.patch_size
        self.register_buffer("mean", torch.tensor(config.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.image_std).view(1, 3, 1, 1), persistent=False)
        self.readout = nn.Linear(config.code_side**2, config.hidden_size, bias=False)  # the identity on the facts
        self.post_init()

    def _init_weights(self, module) -> None:
        if module is self:
            init.copy_(self.mean, torch.tensor(self.config.image_mean).view(1, 3, 1, 1))
            init.copy_(self.std, torch.tensor(self.config.image_std).view(1, 3, 1, 1))
            init.eye_(self.readout.weight)

    def cell_facts(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) normalised code images -> (B, grid^2, facts) in {0, 1}, cells row-major."""
        c = self.config
        brightness = (pixel_values.float() * self.std + self.mean).mean(1)  # back to [0, 1]
        n = c.grid * c.code_side  # code squares per side; each is read at its centre pixel
        centres = ((torch.arange(n, device=brightness.device) + 0.5) * brightness.shape[-1] / n).long()
        squares = brightness[:, centres][:, :, centres] > 0.5
        b = squares.shape[0]
        cells = squares.reshape(b, c.grid, c.code_side, c.grid, c.code_side).permute(0, 1, 3, 2, 4)
        return self.readout(cells.reshape(b, c.grid * c.grid, c.code_side**2).to(self.readout.weight.dtype))

    def forward(self, pixel_values: Tensor, output_hidden_states=None, return_dict=None,
                **kwargs) -> BaseModelOutputWithPooling:
        facts = self.cell_facts(pixel_values)
        tokens = torch.cat([facts.new_zeros(facts.shape[0], 1, facts.shape[2]), facts], 1).to(pixel_values.dtype)
        return BaseModelOutputWithPooling(last_hidden_state=tokens, pooler_output=tokens[:, 0],
                                          hidden_states=(tokens,) * (self.config.num_hidden_layers + 1))


def symbolic_tower(world: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the symbolic tower folder for a symbolic ShapesWorld (image size, grid and code from its manifest)."""
    manifest = json.loads((Path(world) / "manifest.json").read_text())
    code, cfg = manifest.get("symbolic_code"), manifest["config"]
    if not code:
        raise ValueError(f"{world}/manifest.json has no symbolic_code: not a symbolic world (llava-uta-shapes "
                         "--symbolic makes one)")
    processor = clip_image_processor(cfg["image_size"])
    config = SymbolicVisionConfig(image_size=cfg["image_size"], grid=cfg["grid"], code_side=code["code_side"],
                                  facts=code["facts"], image_mean=processor.image_mean, image_std=processor.image_std)
    out_dir = Path(out_dir)
    SymbolicVisionModel(config).save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


AutoConfig.register(SymbolicVisionConfig.model_type, SymbolicVisionConfig, exist_ok=True)
AutoModel.register(SymbolicVisionConfig, SymbolicVisionModel, exist_ok=True)
