"""Train LLaVA with the UTA vision tower: stage 1 (projector), stage 2 (projector + LLM), or stage 2 with LoRA.

    deepspeed -m llava_uta.train --deepspeed scripts/zero2.json --model_name_or_path vicuna-7b \\
        --vision_tower towers/uta-l14-336 --version plain --tune_mm_mlp_adapter True ...   # stage 1
    ... --version v1 --pretrain_mm_mlp_adapter stage1/mm_projector.bin ...                    # stage 2

Stage 1 writes `mm_projector.bin` (LLaVA's key names) and `mm_projector.safetensors`; stage 2 a
`save_pretrained` folder (model, tokenizer, image processor) that `LlavaForConditionalGeneration.from_pretrained`
loads after `import llava_uta.model`; LoRA the adapter plus `non_lora_trainables.safetensors` (merge with
`llava-uta-merge-lora`). Training resumes from the newest `checkpoint-N` in the output folder.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoProcessor,
    HfArgumentParser,
    LlavaForConditionalGeneration,
    TrainerCallback,
    set_seed,
)

from llava_uta.data.check import check_llava_data
from llava_uta.data.llava_dataset import DataCollatorForSupervisedDataset, LazySupervisedDataset
from llava_uta.distributed import end_process_group, init_distributed
from llava_uta.model.checkpoint import load_state_dict_file, save_state_dict_file
from llava_uta.model.language_model import is_gguf, load_tokenizer
from llava_uta.model.llava_builder import NON_LORA_FILE, build_llava
from llava_uta.model.merge_llava import LLAVA_MODEL_TYPES
from llava_uta.model.processors import image_text, make_processor
from llava_uta.model.projector import load_llava_projector, projector_to_llava, trainable_projector_parameters
from llava_uta.preemption import Preempted, PreemptionSignal, exit_preempted
from llava_uta.train.args import DataArguments, ModelArguments, TrainingArguments
from llava_uta.train.trainer import LLaVATrainer, base_llava, non_lora_state

logger = logging.getLogger(__name__)


def load_model(model_args: ModelArguments, training_args: TrainingArguments):
    """(model, tokenizer, tower image processor): a Llava folder as is, or an LM (folder or GGUF file) + tower assembled
    by build_llava."""
    dtype = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else None
    path = model_args.model_name_or_path
    tokenizer = load_tokenizer(path, model_max_length=training_args.model_max_length, padding_side="right")
    if not is_gguf(path) and AutoConfig.from_pretrained(path).model_type in LLAVA_MODEL_TYPES:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
        model.model.vision_tower.requires_grad_(False)
        return model, tokenizer, AutoProcessor.from_pretrained(path).image_processor
    if model_args.vision_tower is None:
        raise ValueError("--vision_tower is required unless --model_name_or_path is a Llava folder")
    model = build_llava(
        path,
        model_args.vision_tower,
        tokenizer,
        model_args.mm_projector_type,
        model_args.mm_vision_select_layer,
        model_args.mm_vision_select_feature,
        dtype,
        model_args.mm_grid_tags,
    )
    return model, tokenizer, AutoImageProcessor.from_pretrained(model_args.vision_tower)


def projector_type_of(model) -> str:
    return getattr(base_llava(model).config, "mm_projector_type", "mlp2x_gelu")  # llava-hf folders: LLaVA-1.5 MLP


def lora_target_regex(model: LlavaForConditionalGeneration) -> str:
    """Every linear layer of the language model (not the tower, the projector or lm_head)."""
    names = sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.model.language_model.named_modules() if isinstance(m, nn.Linear)}
    )
    return rf"model\.language_model\..*\.({'|'.join(names)})"


def prepare_model(model, model_args: ModelArguments, training_args: TrainingArguments):
    """Set what trains: projector always; the LLM unless stage 1 / --freeze_backbone / LoRA; the tower only with
    --unfreeze_mm_vision_tower (a blind tower's patch embedding never)."""
    projector_type = projector_type_of(model)
    if model_args.pretrain_mm_mlp_adapter:
        load_llava_projector(
            model.model.multi_modal_projector, load_state_dict_file(model_args.pretrain_mm_mlp_adapter), projector_type
        )
    model.requires_grad_(False)
    if training_args.lora_enable:
        lora = LoraConfig(
            r=training_args.lora_r,
            lora_alpha=training_args.lora_alpha,
            lora_dropout=training_args.lora_dropout,
            bias=training_args.lora_bias,
            target_modules=lora_target_regex(model),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    elif not (model_args.tune_mm_mlp_adapter or model_args.freeze_backbone):
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    for param in trainable_projector_parameters(base_llava(model).model.multi_modal_projector, projector_type):
        param.requires_grad_(True)
    if model_args.unfreeze_mm_vision_tower:
        tower = base_llava(model).model.vision_tower
        tower.requires_grad_(True)
        if getattr(tower.config, "image_withheld", False):  # the blind baseline's zeroed patch embedding stays zero
            tower.get_input_embeddings().requires_grad_(False)
    if training_args.gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def save_outputs(
    trainer: LLaVATrainer, model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments
) -> None:
    out = Path(training_args.output_dir)
    model = base_llava(trainer.accelerator.unwrap_model(trainer.model))
    model.config.conv_mode = model_args.version  # the serving loader's default conversation template
    model.config.train_data_path = str(Path(data_args.data_path).resolve())  # what it learned from (web examples)
    model.config.train_image_folder = str(Path(data_args.image_folder).resolve()) if data_args.image_folder else None
    if model_args.tune_mm_mlp_adapter:
        state = projector_to_llava(model.model.multi_modal_projector, projector_type_of(model))
        if trainer.is_world_process_zero():
            save_state_dict_file(state, out / "mm_projector.bin")
            save_state_dict_file(state, out / "mm_projector.safetensors")
            model.config.save_pretrained(out)
        return
    trainer.save_model(str(out))
    if training_args.lora_enable:
        state = non_lora_state(model)
        if trainer.is_world_process_zero():
            save_state_dict_file(state, out / NON_LORA_FILE)
            model.config.save_pretrained(out)


def resume_point(training_args: TrainingArguments) -> str | None:
    """--resume_from_checkpoint, else the newest complete checkpoint-N of the output folder (the Trainer writes
    trainer_state.json last: a folder without it was cut off mid-save)."""
    if training_args.resume_from_checkpoint:
        return training_args.resume_from_checkpoint
    complete = [p for p in Path(training_args.output_dir).glob("checkpoint-*")
                if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
    if not complete:
        return None
    newest = max(complete, key=lambda p: int(p.name.split("-")[-1]))
    logger.warning("resuming from %s", newest)
    return str(newest)


class PreemptionCallback(TrainerCallback):
    """On SIGTERM / SIGUSR1 (noted by `preemption`): save a checkpoint-N after the current step and stop training."""

    def __init__(self, preemption: PreemptionSignal):
        self.preemption, self.stopped = preemption, False

    def on_step_end(self, args, state, control, **kwargs):
        if self.preemption.requested(args.device):
            control.should_save = control.should_training_stop = self.stopped = True
        return control


def build_parser() -> HfArgumentParser:
    return HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    model_args, data_args, training_args = build_parser().parse_args_into_dataclasses(args=argv)
    if training_args.mm_vision_tower_lr is not None and not model_args.unfreeze_mm_vision_tower:
        raise ValueError("--mm_vision_tower_lr is set but the tower is frozen: add --unfreeze_mm_vision_tower True")
    return model_args, data_args, training_args


def check_data(model_args: ModelArguments, data_args: DataArguments) -> None:
    """The whole training JSON checked before anything loads (llava_uta.data.check): an error listing the problems,
    or with --skip_bad_samples a warning (the bad samples are then skipped as they come)."""
    report = check_llava_data(data_args.data_path, data_args.image_folder, model_args.version)
    if report.ok:
        logger.info(report.summary())
    elif data_args.skip_bad_samples:
        logger.warning("%s\n--skip_bad_samples: these samples will be skipped", report.summary())
    else:
        raise ValueError(f"bad training data (fix it, or pass --skip_bad_samples to skip it, or --check_data False "
                         f"to find it during training):\n{report.summary()}")


def build_trainer(
    model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments
) -> LLaVATrainer:
    """The model, its data and the trainer of a run (seeded with --seed), ready for `trainer.train()`."""
    set_seed(training_args.seed)
    if data_args.check_data:
        check_data(model_args, data_args)
    if training_args.deepspeed:  # join DeepSpeed's process group before loading: ZeRO-3 partitions weights on load
        init_distributed()
    model, tokenizer, tower_processor = load_model(model_args, training_args)
    model = prepare_model(model, model_args, training_args)
    processor = make_processor(model, tokenizer, tower_processor, data_args.image_aspect_ratio)
    dataset = LazySupervisedDataset(
        data_args.data_path,
        tokenizer,
        processor.image_processor,
        model_args.version,
        image_token_id=model.config.image_token_id,
        image_text=image_text(processor),
        model_max_length=training_args.model_max_length,
        image_folder=data_args.image_folder,
        skip_bad_samples=data_args.skip_bad_samples,
    )
    return LLaVATrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=DataCollatorForSupervisedDataset(tokenizer.pad_token_id),
        processing_class=processor,
    )


def train(argv: list[str] | None = None) -> LLaVATrainer:
    """A whole run; Preempted (after its checkpoint-N) when a signal stopped it (llava_uta.preemption)."""
    model_args, data_args, training_args = parse_args(argv)
    trainer = build_trainer(model_args, data_args, training_args)
    with PreemptionSignal() as preemption:
        stop = PreemptionCallback(preemption)
        trainer.add_callback(stop)
        trainer.train(resume_from_checkpoint=resume_point(training_args))
    if stop.stopped:
        step = trainer.state.global_step
        raise Preempted(step, str(Path(training_args.output_dir) / f"checkpoint-{step}"))
    trainer.save_state()
    save_outputs(trainer, model_args, data_args, training_args)
    return trainer


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        train(argv)
    except Preempted as err:
        exit_preempted(err)
    end_process_group()


if __name__ == "__main__":
    main()
