"""`llava-uta-finetune-clip`: contrastive fine-tuning, the paper's second stage, from a UTA ViT to a CLIP model.

The image tower is a UTA ViT (a `llava-uta-pretrain` student or a released checkpoint), the text tower a CLIP text
encoder (the `text.*` of a released checkpoint, or any open_clip model's, e.g. the teacher's); both are trained with
the CLIP loss at a fixed temperature (T = 0.01, `--logit_scale 100`), with LAMB and layer-wise lr decay on the image
tower, as in the paper. The output `uta_clip.safetensors` is in the released key layout (`visual.*`, `text.*`,
`logit_scale`), so `llava-uta-zeroshot --model uta:FILE` and `llava-uta-convert` take it as a released checkpoint.

    llava-uta-finetune-clip --train_data /data/datacomp/shards --init runs/uta_b14/student.safetensors \\
        --text_model open_clip:EVA01-g-14-plus@/ckpt/eva01_g14_plus.bin --output_dir runs/uta_b14_clip
    torchrun --nproc_per_node 8 -m pretrain.finetune_clip ...          # or: deepspeed --module pretrain.finetune_clip

Ranks are torch DistributedDataParallel, not DeepSpeed ZeRO: LAMB's trust ratio is per weight tensor, and ZeRO (and
DeepSpeed's bf16 optimizer) hand the optimizer flattened partitions, which would silently change the update. bf16 is
autocast over fp32 weights, as in open_clip. The contrastive batch is the global batch: every rank's features are
gathered (open_clip's ClipLoss, `local_loss`, `gather_with_grad`). Gradient accumulation keeps that loss exact by
feature caching (open_clip's `--accum-freq`): a no-grad pass computes every micro-batch's features, then each
micro-batch is run again with gradients and its fresh features replace its cached ones in the full-batch loss; drop
path draws the same masks in both passes (the RNG state is replayed), so the summed gradients equal the full batch's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from open_clip import image_transform
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.loss import ClipLoss
from open_clip.tokenizer import SimpleTokenizer
from safetensors.torch import save_file
from timm.optim import create_optimizer_v2, param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch.nn.parallel import DistributedDataParallel
from transformers import HfArgumentParser

from llava_uta.eval.zeroshot import ZeroShotProbe
from llava_uta.model.checkpoint import (
    load_state_dict_file,
    load_strict,
    load_uta_vit,
    resize_uta_vit,
    student_config_path,
)
from llava_uta.model.model_source import with_weights_flag
from llava_uta.model.official import (
    UTACLIP,
    load_official_checkpoint,
    open_clip_text_tower,
    save_official,
)
from llava_uta.model.open_clip_loader import create_open_clip, open_clip_tokenizer
from llava_uta.model.uta_vit import UTAViT
from pretrain.caption_data import CaptionViews, caption_source
from pretrain.data import EpochSampler
from pretrain.loop import RunArguments, StepCheckpoints, StepTrainer, distributed_setup, fp32_state_dict, training_cli

OPTIMIZERS = ("lamb", "adamw")


@dataclass
class FinetuneArguments(RunArguments):
    """Flags of `llava-uta-finetune-clip`; defaults follow the paper card (UTA-B on DataComp-1B)."""

    train_data: str = field(metadata={"help": "open_clip CSV (filepath,title) or webdataset tar shards (.jpg/.png + "
                                              ".txt): a .tar, a folder of them, or a glob"})
    output_dir: str = field(metadata={"help": "checkpoints, logs and uta_clip.safetensors go here"})
    init: str = field(metadata={"help": "the image tower: a llava-uta-pretrain student (.safetensors + .json) or a "
                                        "released UTA checkpoint (visual.*, text.*, logit_scale)"})
    text_model: str | None = field(default=None, metadata={
        "help": "the open_clip model source whose text tower is fine-tuned (e.g. the teacher: open_clip:NAME@WEIGHTS "
                "or open_clip:local-dir:DIR; see docs/model-sources.md); "
                "default: the text.* of a released --init"})
    text_pretrained: str | None = field(default=None, metadata={
        "help": "deprecated, goes in the next release: give --text_model open_clip:NAME@FILE"})
    text_random_weights: bool = field(default=False, metadata={
        "help": "a --text_model named without weights gets random weights (tests and timing only; recorded in "
        "summary.json's args)"})
    image_size: int | None = field(default=None, metadata={"help": "train the image tower at this input size"})
    logit_scale: float = field(default=100.0, metadata={"help": "fixed (not learned) logit scale, 1/T: 100 is T=0.01"})
    lock_image: bool = field(default=False, metadata={"help": "freeze the image tower (LiT-style)"})
    lock_text: bool = field(default=False, metadata={"help": "freeze the text tower"})
    lock_text_unlocked_layers: int = field(default=0, metadata={"help": "with --lock_text: train the last N layers"})
    csv_separator: str = ","
    csv_img_key: str = "filepath"
    csv_caption_key: str = "title"
    epochs: float = 1.0
    max_steps: int = field(default=0, metadata={"help": "optimizer steps; 0 = from epochs"})
    batch_size: int = field(default=49152, metadata={"help": "global contrastive batch (all ranks, all micro-batches)"})
    micro_batch_size: int = field(default=64, metadata={"help": "images per rank per forward"})
    optimizer: str = field(default="lamb", metadata={"help": f"one of {OPTIMIZERS}"})
    lr: float = field(default=2e-4, metadata={"help": "peak lr: 2e-4 base, 4e-4 large (paper card)"})
    min_lr: float = 0.0
    warmup_steps: int = 2000
    weight_decay: float = 0.05
    layer_decay: float | None = field(default=0.75, metadata={"help": "image tower: 0.75 base, 0.85 large"})
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: float = field(default=0.0, metadata={"help": "clip the global grad norm (0: off; timm's LAMB also "
                                                            "clips to 1.0 inside)"})
    drop_path: float = 0.0
    grad_checkpointing: bool = False
    bf16: bool = False

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.lock_image and self.lock_text and not self.lock_text_unlocked_layers:
            raise ValueError("--lock_image and --lock_text together leave nothing to train")
        if self.logit_scale <= 0:
            raise ValueError(f"--logit_scale must be positive (1/temperature), got {self.logit_scale}")


def with_drop_path(visual: UTAViT, rate: float) -> UTAViT:
    """The same weights in a tower built with drop-path `rate`."""
    if rate == visual.cfg.drop_path_rate:
        return visual
    rebuilt = UTAViT(dataclasses.replace(visual.cfg, drop_path_rate=rate))
    rebuilt.load_state_dict(visual.state_dict())
    return rebuilt


def build_clip(args: FinetuneArguments) -> tuple[UTACLIP, Callable[[list[str]], torch.Tensor]]:
    """The UTACLIP to fine-tune (image tower from --init, text tower from --text_model or --init) and its tokenizer."""
    if student_config_path(args.init).is_file():
        visual, text, tokenizer = load_uta_vit(args.init), None, None
    else:
        released = load_official_checkpoint(args.init)
        visual, text = released.visual, released.text
        tokenizer = SimpleTokenizer(context_length=text.context_length)
    if args.text_model:
        tokenizer = open_clip_tokenizer(args.text_model)
        source = with_weights_flag(args.text_model, args.text_pretrained, "--text_model", "--text_pretrained")
        clip = create_open_clip(source, random_weights=args.text_random_weights)
        text = open_clip_text_tower(clip, tokenizer, args.text_model)
    if text is None:
        raise ValueError(f"{args.init} is a UTA student (an image tower only): give --text_model (e.g. the teacher)")
    visual = with_drop_path(visual, args.drop_path)
    if args.image_size:
        resize_uta_vit(visual, args.image_size)
    with torch.no_grad():
        text_dim = text(tokenizer(["a photo"])).shape[-1]
    if text_dim != visual.cfg.out_dim:
        raise ValueError(f"{args.init} embeds images into {visual.cfg.out_dim} dims but the text tower "
                         f"({args.text_model or args.init}) embeds text into {text_dim}")
    model = UTACLIP(visual, text, logit_scale=math.log(args.logit_scale))
    model.logit_scale.requires_grad_(False)  # the paper's fixed temperature
    if args.lock_image:
        model.visual.requires_grad_(False)
    if args.lock_text:
        model.text.lock(args.lock_text_unlocked_layers)
    return model, tokenizer


def param_groups(model: UTACLIP, args: FinetuneArguments) -> list[dict]:
    """timm's groups: layer-wise lr decay (BEiT/EVA) on the image tower, plain weight-decay groups on the text tower.

    No weight decay on 1-D weights, biases and each tower's `no_weight_decay()` names; frozen weights are left out.
    """
    visual, text = model.visual, model.text
    if args.layer_decay:
        groups = param_groups_layer_decay(visual, args.weight_decay, visual.no_weight_decay(),
                                          layer_decay=args.layer_decay)
    else:
        groups = param_groups_weight_decay(visual, args.weight_decay, no_weight_decay_list=visual.no_weight_decay())
    return groups + param_groups_weight_decay(text, args.weight_decay, no_weight_decay_list=text.no_weight_decay())


def rng_state() -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None


def set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])


class CLIPFinetuner(StepTrainer):
    def __init__(self, args: FinetuneArguments):
        self.args = args
        self.rank, self.world, self.device = distributed_setup(args.local_rank)
        self.out = Path(args.output_dir)
        torch.manual_seed(args.seed)
        model, self.tokenizer = build_clip(args)
        if args.grad_checkpointing:
            model.visual.set_grad_checkpointing(True)
            model.text.set_grad_checkpointing(True)
        self.model = model.to(self.device)
        torch.manual_seed(args.seed + self.rank)  # drop path: each rank its own draws

        if args.batch_size % (self.world * args.micro_batch_size):
            raise ValueError(f"--batch_size {args.batch_size} must be a multiple of world size {self.world} "
                             f"x --micro_batch_size {args.micro_batch_size}")
        self.accum = args.batch_size // self.world // args.micro_batch_size
        transform = image_transform(model.visual.cfg.img_size, is_train=True, mean=OPENAI_DATASET_MEAN,
                                    std=OPENAI_DATASET_STD)
        source = caption_source(args.train_data, args.csv_separator, args.csv_img_key, args.csv_caption_key)
        self.dataset = CaptionViews(source, transform, self.tokenizer, args.seed)
        self.sampler = EpochSampler(len(self.dataset), args.seed, self.rank, self.world)
        self.steps_per_epoch = len(self.dataset) // args.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{args.train_data}: {len(self.dataset)} pairs are fewer than one global batch "
                             f"({args.batch_size})")
        self.total_steps = args.max_steps or math.ceil(args.epochs * self.steps_per_epoch)

        self.optimizer = create_optimizer_v2(param_groups(model, args), opt=args.optimizer, lr=args.lr,
                                             weight_decay=args.weight_decay, betas=(args.beta1, args.beta2),
                                             eps=args.eps)
        warmup = min(args.warmup_steps, self.total_steps - 1)
        self.scheduler = CosineLRScheduler(self.optimizer, t_initial=max(1, self.total_steps - warmup),
                                           lr_min=args.min_lr, warmup_t=warmup, warmup_prefix=True,
                                           t_in_epochs=False)
        self.ddp = None
        if self.world > 1:
            device_ids = [self.device] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=device_ids)
        self.loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=self.rank,
                                world_size=self.world)
        self.checkpoints = StepCheckpoints(self.out, self.rank, args.keep_last)
        self.probe = None
        if args.eval_data:
            self.probe = ZeroShotProbe.build(args.eval_data, model.visual.cfg.img_size, self.device,
                                             args.eval_classnames, args.eval_templates, workers=min(args.workers, 2))
        self.step = 0
        self.train_seconds = 0.0  # spent in optimizer steps, over every (resumed) part of the run

    # ---- one optimizer step

    def features(self, images: torch.Tensor, tokens: torch.Tensor, with_grad: bool) -> tuple[torch.Tensor, ...]:
        """Normalised fp32 image and text features of a micro-batch (through DDP when gradients flow)."""
        model = self.ddp if with_grad and self.ddp is not None else self.model
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
            image_features, text_features, _ = model(images, tokens)
        return image_features.float(), text_features.float()

    def loss(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """The CLIP loss of this rank's rows against the whole gathered batch (mean over ranks = global loss)."""
        return self.loss_fn(image_features, text_features, self.model.logit_scale.exp())

    def train_step(self, micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Gradients of the global-batch loss, by feature caching when there are several micro-batches."""
        micro_batches = [(i.to(self.device, non_blocking=True), t.to(self.device, non_blocking=True))
                         for i, t in micro_batches]
        if len(micro_batches) == 1:
            loss = self.loss(*self.features(*micro_batches[0], with_grad=True))
            loss.backward()
            return loss.item()
        states, cached = [], []
        with torch.no_grad():
            for images, tokens in micro_batches:
                states.append(rng_state())
                cached.append(self.features(images, tokens, with_grad=False))
            loss_value = self.loss(torch.cat([c[0] for c in cached]), torch.cat([c[1] for c in cached])).item()
        for j, (images, tokens) in enumerate(micro_batches):
            set_rng_state(states[j])  # the same drop-path draws as in the cached pass
            last = j == len(micro_batches) - 1
            # DDP all-reduces the summed gradients once, after the last micro-batch
            with self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext():
                fresh = self.features(images, tokens, with_grad=True)
                image_features = torch.cat([c[0] for c in cached[:j]] + [fresh[0]] + [c[0] for c in cached[j + 1:]])
                text_features = torch.cat([c[1] for c in cached[:j]] + [fresh[1]] + [c[1] for c in cached[j + 1:]])
                self.loss(image_features, text_features).backward()
        return loss_value

    def optimizer_step(self) -> float:
        """Clip (if asked), step and zero; returns the global grad norm."""
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(trainable, self.args.grad_clip or math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.item()

    # ---- checkpoints and output

    def save_weights(self, folder: Path) -> None:
        if self.rank == 0:
            save_file(fp32_state_dict(self.model, None, False, 0), folder / "model.safetensors",
                      metadata={"format": "pt"})

    def load_weights(self, folder: Path) -> None:
        load_strict(self.model, load_state_dict_file(folder / "model.safetensors"), str(folder))

    def save_outputs(self) -> None:
        if self.rank == 0:
            save_official(self.model, self.out / "uta_clip.safetensors")

    def zeroshot(self) -> dict[str, float]:
        """Zero-shot top-1/top-5 with the model's current text tower (rebuilt class weights unless it is frozen)."""
        if self.probe.classifier is None or any(p.requires_grad for p in self.model.text.parameters()):
            self.probe.set_text_tower(self.model, self.tokenizer)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
            result = self.probe.evaluate(self.model)
        self.model.train()
        return result

    # ---- the run

    def train(self) -> dict:
        summary = {"args": asdict(self.args)}
        if not self.begin() and self.probe:
            summary["zeroshot_before"] = self.zeroshot()
        self.run_steps(self.model, "contrastive", self.zeroshot if self.probe else None)
        summary |= self.run_summary(output=str(self.out / "uta_clip.safetensors"))
        if self.probe:
            summary["zeroshot"] = self.zeroshot()
        return self.finish(summary)


def build_parser() -> HfArgumentParser:
    return HfArgumentParser(FinetuneArguments)


def main(argv: list[str] | None = None) -> None:
    training_cli(build_parser(), CLIPFinetuner, argv)


if __name__ == "__main__":
    main()
