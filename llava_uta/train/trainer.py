"""transformers' Trainer with LLaVA's additions: modality-grouped batches, a projector learning rate, and a
vision pass on image-less batches.

Resuming without DeepSpeed also goes through `from_pretrained` here: transformers 5.x saves Llava checkpoints
under its legacy key names, which the Trainer's plain `load_state_dict` would silently skip; with LoRA the
projector (not part of the adapter) is saved into and restored from each checkpoint as well.

The vision pass matters with DeepSpeed: every rank must run the tower and the projector on every step (ZeRO-3
gathers their weights collectively and ZeRO/DDP reduce their gradients), so a batch without images adds
0 x (the projected features of one blank image) to its loss, as LLaVA does with its zero image tensor.
"""

from __future__ import annotations

import os

import torch
from peft import PeftModel
from torch.utils.data import Sampler
from transformers import Trainer, TrainerCallback

from llava_uta.model.checkpoint import load_state_dict_file, save_state_dict_file
from llava_uta.model.llava_builder import NON_LORA_FILE
from llava_uta.model.projector import gathered


def base_llava(model):
    """The Llava model itself, under a peft wrapper or not."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def non_lora_state(model) -> dict[str, torch.Tensor]:
    """The weights a LoRA adapter does not hold, under their names in the Llava model: the projector, and the vision
    tower when it trains (--unfreeze_mm_vision_tower). Gathered under ZeRO-3: call on every rank."""
    llava = base_llava(model).model
    parts = {"multi_modal_projector": llava.multi_modal_projector}
    if any(p.requires_grad for p in llava.vision_tower.parameters()):
        parts["vision_tower"] = llava.vision_tower
    state = {}
    for prefix, module in parts.items():
        with gathered(module.parameters()):
            state |= {f"model.{prefix}.{k}": v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return state


class SaveNonLoraCallback(TrainerCallback):
    """With LoRA, put the projector (and an unfrozen tower), trained but not in the adapter, into every checkpoint-N
    folder."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        state_dict = non_lora_state(self.trainer.accelerator.unwrap_model(self.trainer.model))
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            save_state_dict_file(state_dict, os.path.join(folder, NON_LORA_FILE))


def modality_grouped_indices(lengths: list[int], megabatch: int, generator: torch.Generator) -> list[int]:
    """Shuffled indices in chunks of `megabatch` that hold one modality each (sign of the length), each chunk
    sorted longest first; the incomplete chunks of both modalities go last, together."""
    chunks, leftovers = [], []
    for want_image in (True, False):
        ids = [i for i, length in enumerate(lengths) if (length > 0) == want_image]
        ids = [ids[j] for j in torch.randperm(len(ids), generator=generator).tolist()]
        groups = [ids[k : k + megabatch] for k in range(0, len(ids), megabatch)]
        if groups and len(groups[-1]) < megabatch:
            leftovers += groups.pop()
        chunks += groups
    order = torch.randperm(len(chunks), generator=generator).tolist()
    by_length = lambda chunk: sorted(chunk, key=lambda i: abs(lengths[i]), reverse=True)
    return [i for k in order for i in by_length(chunks[k])] + by_length(leftovers)


class ModalityLengthGroupedSampler(Sampler):
    def __init__(self, lengths: list[int], megabatch: int, seed: int = 0):
        self.lengths, self.megabatch, self.seed, self.epoch = lengths, megabatch, seed, 0

    def __len__(self) -> int:
        return len(self.lengths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(modality_grouped_indices(self.lengths, self.megabatch, generator))


class LLaVATrainer(Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if isinstance(self.model, PeftModel):
            self.add_callback(SaveNonLoraCallback(self))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.model if model is None else model
        non_lora = os.path.join(resume_from_checkpoint, NON_LORA_FILE)
        if isinstance(model, PeftModel):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            if os.path.isfile(non_lora):
                base_llava(model).load_state_dict(load_state_dict_file(non_lora), strict=False)
            return
        loaded = type(model).from_pretrained(resume_from_checkpoint, dtype=model.dtype)
        model.load_state_dict(loaded.state_dict(), strict=True)

    def _get_train_sampler(self, train_dataset=None) -> Sampler | None:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.args.group_by_modality_length:
            return super()._get_train_sampler(dataset)
        # one optimizer step over all ranks takes one megabatch, so every rank sees the same modality
        megabatch = self.args.train_batch_size * self.args.world_size * self.args.gradient_accumulation_steps
        return ModalityLengthGroupedSampler(dataset.modality_lengths, megabatch, self.args.seed)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """With --mm_projector_lr / --mm_vision_tower_lr, the projector's / the tower's parameters get their own
        learning rate."""
        lrs = {"multi_modal_projector": self.args.mm_projector_lr, "vision_tower": self.args.mm_vision_tower_lr}
        if all(lr is None for lr in lrs.values()) or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups: dict[tuple[float | None, bool], list[torch.nn.Parameter]] = {}
        for name, param in opt_model.named_parameters():
            if param.requires_grad:
                lr = next((lr for part, lr in lrs.items() if f"{part}." in name), None)
                groups.setdefault((lr, name in decay), []).append(param)
        param_groups = [
            {
                "params": params,
                "weight_decay": self.args.weight_decay if decays else 0.0,
                **({"lr": lr} if lr is not None else {}),
            }
            for (lr, decays), params in groups.items()
        ]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if "pixel_values" not in inputs and model.training:
            loss = loss + 0.0 * self.blank_image_features(model)
        return (loss, outputs) if return_outputs else loss

    def blank_image_features(self, model) -> torch.Tensor:
        """Sum of the projected features of one all-zero image."""
        llava = self.accelerator.unwrap_model(model)
        vision = llava.config.vision_config
        weight = next(llava.get_input_embeddings().parameters())
        shape = (1, getattr(vision, "num_channels", 3), vision.image_size, vision.image_size)
        features = llava.get_image_features(pixel_values=torch.zeros(shape, device=weight.device, dtype=weight.dtype))
        return sum(f.sum() for f in features.pooler_output)
