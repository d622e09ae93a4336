"""LLaVA's training flags as dataclasses for HfArgumentParser, plus `--skip_bad_samples`.

The names, defaults and meanings are LLaVA's (docs/llava.md#training-flags).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={"help": "causal LM folder (e.g. Vicuna-7B) or GGUF file, or a Llava folder"}
    )
    version: str = field(
        default="v1", metadata={"help": "conversation template: plain, v1, chatml, llava_llama_2, ..."}
    )
    vision_tower: str | None = field(default=None, metadata={"help": "tower folder from llava-uta-convert"})
    mm_projector_type: str = field(
        default="linear", metadata={"help": "linear, mlp2x_gelu, or pixel_shuffleF_mlp2x_gelu (F x F tokens merged)"}
    )
    mm_vision_select_layer: int = field(default=-2, metadata={"help": "tower hidden state fed to the projector"})
    mm_vision_select_feature: str = field(default="patch", metadata={"help": "patch (drop CLS) or cls_patch"})
    mm_grid_tags: bool = field(default=False, metadata={
        "help": "a <row_r_col_c> text tag before each image token, as Idefics3 / SmolVLM (saved with the model)"})
    pretrain_mm_mlp_adapter: str | None = field(default=None, metadata={"help": "stage-1 mm_projector.bin"})
    tune_mm_mlp_adapter: bool = field(default=False, metadata={"help": "stage 1: train the projector only"})
    freeze_backbone: bool = field(default=False, metadata={"help": "freeze the LLM"})
    unfreeze_mm_vision_tower: bool = field(
        default=False, metadata={"help": "train the vision tower too (LLaVA-NeXT); see --mm_vision_tower_lr"}
    )


@dataclass
class DataArguments:
    data_path: str = field(metadata={"help": "LLaVA conversation JSON"})
    image_folder: str | None = field(default=None, metadata={"help": "root the samples' image paths are under"})
    image_aspect_ratio: str = field(default="square", metadata={"help": "square or pad"})
    lazy_preprocess: bool = field(default=True, metadata={"help": "accepted for LLaVA scripts; always lazy"})
    is_multimodal: bool = field(
        default=True, metadata={"help": "accepted for LLaVA scripts; samples with an image are"}
    )
    skip_bad_samples: bool = field(default=False, metadata={"help": "skip and log unusable samples, not fail"})
    check_data: bool = field(default=True, metadata={
        "help": "before the first step, check every sample's turns and every image's header, and stop with a "
        "report of what is wrong where (with --skip_bad_samples: report and go on)"})


def deepspeed_config(deepspeed: str | dict | None) -> dict:
    """The --deepspeed config as a dict (a JSON file or an inline dict; {} without DeepSpeed)."""
    if isinstance(deepspeed, dict):
        return deepspeed
    return json.loads(Path(deepspeed).read_text()) if deepspeed and Path(deepspeed).is_file() else {}


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    model_max_length: int = field(default=512, metadata={"help": "tokens per sample, image tokens included"})
    group_by_modality_length: bool = field(default=False, metadata={"help": "batches of one modality, by length"})
    mm_projector_lr: float | None = field(default=None, metadata={"help": "learning rate of the projector"})
    mm_vision_tower_lr: float | None = field(
        default=None, metadata={"help": "learning rate of an unfrozen vision tower (default: --learning_rate)"}
    )
    lora_enable: bool = False
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_bias: str = "none"
    bits: int = field(default=16, metadata={"help": "only 16 (no quantized training)"})
    remove_unused_columns: bool = False

    def __post_init__(self) -> None:
        if self.bits != 16:
            raise ValueError(f"--bits {self.bits}: only 16-bit training is supported")
        own_lrs = [f"--{k}" for k in ("mm_projector_lr", "mm_vision_tower_lr") if getattr(self, k) is not None]
        if own_lrs and "optimizer" in deepspeed_config(self.deepspeed):
            # the Trainer then hands DeepSpeed one flat parameter list: every part would train at --learning_rate
            raise ValueError(f"--deepspeed {self.deepspeed} defines its own optimizer, which gives every parameter one "
                             f"learning rate, so {' and '.join(own_lrs)} would be ignored: remove the config's "
                             "\"optimizer\" section (the Trainer then builds AdamW with those rates and DeepSpeed "
                             "runs it) or drop the flag")
        if not torch.cuda.is_available():
            # else DeepSpeed ranks on a CPU machine each train alone (docs/environment.md#deepspeed-on-cpu)
            self.use_cpu = True
        super().__post_init__()
