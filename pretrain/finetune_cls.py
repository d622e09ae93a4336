"""`llava-uta-finetune-cls`: end-to-end image classification fine-tuning of a UTA ViT on an ImageFolder.

The protocol MAE, BEiT and EVA-02 report (ImageNet-1K top-1 after fine-tuning the whole tower), with EVA-02's
recipe as the default: AdamW (0.9, 0.999), weight decay 0.05, layer-wise lr decay, drop path, cosine schedule to 0
after a linear warm-up, label smoothing, RandAugment `rand-m9-mstd0.5-inc1` and a random-resized crop (scale 0.08-1),
evaluation at crop_pct 1.0, an EMA of the weights, mean-pooled patch tokens into a fresh linear head. EVA-02 turns
mixup, cutmix and random erasing off (0); the flags are here for other recipes. Every piece is timm's:
`create_transform`, `Mixup`, the loss functions, `create_optimizer_v2(layer_decay=...)`, `CosineLRScheduler`,
`ModelEmaV3`, and the model is the registered timm model of the UTA config (`llava_uta.model.timm_models`).

    llava-uta-finetune-cls --model uta_b14_224 --init runs/uta_b14/student.safetensors --image_size 448 \\
        --train_data /data/imagenet/train --val_data /data/imagenet/val --output_dir runs/uta_b14_in1k
    torchrun --nproc_per_node 8 -m pretrain.finetune_cls ...        # or: deepspeed --module pretrain.finetune_cls

--init is a `llava-uta-pretrain` student, a released UTA checkpoint (its `visual.*`) or a classifier this command wrote;
without it the tower starts from random weights (the floor a pre-training must beat). The classification head is
fresh unless --init holds one of the same shape (EVA-02's rule). Ranks are torch DistributedDataParallel; bf16 is
autocast over fp32 weights. Each sample's augmentation is a function of (seed, epoch, index) and each micro-batch's
mixup draw of (seed, step, rank, micro-batch), so a run is the same for any number of data workers and `--resume`
continues it exactly. Writes `model.safetensors` (+ `model.json`, a UTA ViT config whose `out_dim` is the number
of classes, so the file loads as a student or through timm), `ema.safetensors` with --model_ema, `classes.json`,
`summary.json`, `log.jsonl` and TensorBoard logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from transformers import HfArgumentParser

from llava_uta.data.image_folder import checked_image_folder
from llava_uta.io_utils import write_json_atomic
from llava_uta.model.checkpoint import load_state_dict_file, load_strict, resize_uta_vit, save_uta_vit
from llava_uta.model.official import load_any_uta_vit
from llava_uta.model.timm_models import GLOBAL_POOLS, TimmUTAViT
from llava_uta.model.uta_vit import UTA_VIT_CONFIGS
from pretrain.data import EpochSampler, SeededViews, sample_seed, seeded_rngs
from pretrain.loop import RunArguments, StepCheckpoints, StepTrainer, distributed_setup, fp32_state_dict, training_cli


@dataclass
class FinetuneClsArguments(RunArguments):
    """Flags of `llava-uta-finetune-cls`; defaults are EVA-02's ImageNet-1K recipe for the base model."""

    train_data: str = field(metadata={"help": "ImageFolder (ROOT/CLASS/IMAGE) to fine-tune on"})
    output_dir: str = field(metadata={"help": "checkpoints, logs and the fine-tuned model go here"})
    model: str | None = field(default=None, metadata={
        "help": f"UTA ViT config (timm model name), one of {sorted(UTA_VIT_CONFIGS)}; default: --init's config"})
    init: str | None = field(default=None, metadata={
        "help": "llava-uta-pretrain student (.safetensors + .json), released UTA checkpoint, or a classifier written "
                "by this command; none: random init"})
    val_data: str | None = field(default=None, metadata={"help": "ImageFolder with the train split's classes"})
    image_size: int | None = field(default=None, metadata={"help": "fine-tune at this input size (EVA-02: 448)"})
    global_pool: str = field(default="avg", metadata={"help": f"one of {GLOBAL_POOLS[1:]}: avg (EVA-02) or token"})
    epochs: float = 30.0
    max_steps: int = field(default=0, metadata={"help": "optimizer steps; 0 = from epochs"})
    warmup_epochs: float = 3.0
    warmup_steps: int = field(default=-1, metadata={"help": "overrides --warmup_epochs when >= 0"})
    batch_size: int = field(default=1024, metadata={"help": "global batch (all ranks, all micro-batches)"})
    micro_batch_size: int = field(default=32, metadata={"help": "images per rank per forward"})
    eval_batch_size: int = 64
    lr: float = field(default=1e-4, metadata={"help": "peak lr for the global batch (no scaling by batch size)"})
    min_lr: float = 0.0
    weight_decay: float = 0.05
    layer_decay: float = field(default=0.7, metadata={"help": "layer-wise lr decay: 0.7 base, 0.8 large (EVA-02)"})
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = field(default=0.0, metadata={"help": "clip the global grad norm (0: off)"})
    drop_path: float = field(default=0.1, metadata={"help": "0.1 base, 0.15 large (EVA-02)"})
    smoothing: float = field(default=0.1, metadata={"help": "label smoothing: 0.1 base, 0.2 large (EVA-02)"})
    auto_augment: str | None = field(default="rand-m9-mstd0.5-inc1", metadata={"help": "timm auto-augment policy; "
                                                                                   "'none' to turn it off"})
    scale_min: float = field(default=0.08, metadata={"help": "random-resized-crop scale lower bound"})
    color_jitter: float = field(default=0.4, metadata={"help": "timm applies it only without a RandAugment policy"})
    reprob: float = field(default=0.0, metadata={"help": "random erasing probability"})
    mixup: float = field(default=0.0, metadata={"help": "mixup alpha (0: off, as EVA-02)"})
    cutmix: float = field(default=0.0, metadata={"help": "cutmix alpha (0: off, as EVA-02)"})
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    crop_pct: float = field(default=1.0, metadata={"help": "evaluation resize/crop ratio"})
    model_ema: bool = field(default=False, metadata={"help": "keep an EMA of the weights (EVA-02 does) and "
                                                             "evaluate it too"})
    model_ema_decay: float = 0.9999
    bf16: bool = False

    def __post_init__(self) -> None:
        if self.model is None and self.init is None:
            raise ValueError("give --model (a UTA ViT config) for a random-init run, or --init")
        if self.model is not None and self.model not in UTA_VIT_CONFIGS:
            raise ValueError(f"--model {self.model!r} is not a UTA ViT config; choose one of {sorted(UTA_VIT_CONFIGS)}")
        if self.global_pool not in GLOBAL_POOLS[1:]:
            raise ValueError(f"--global_pool must be one of {GLOBAL_POOLS[1:]}, got {self.global_pool!r}")
        if self.auto_augment in ("none", ""):
            self.auto_augment = None
        if (self.mixup > 0 or self.cutmix > 0) and self.micro_batch_size % 2:
            raise ValueError(f"mixup/cutmix pair images within a micro-batch: --micro_batch_size "
                             f"{self.micro_batch_size} must be even")


def build_classifier(args: FinetuneClsArguments, num_classes: int) -> TimmUTAViT:
    """The UTA ViT of --model / --init with a `num_classes` head, drop path and input size from the flags.

    Everything but the head is loaded strictly from --init (resized to --image_size); the head too when its shape
    matches, otherwise it keeps timm's fresh initialisation (EVA-02's rule).
    """
    source = load_any_uta_vit(args.init) if args.init else None
    base = source.cfg if source is not None else UTA_VIT_CONFIGS[args.model]
    if source is not None and args.model is not None:
        expected = dataclasses.replace(UTA_VIT_CONFIGS[args.model], img_size=base.img_size, out_dim=base.out_dim,
                                       drop_path_rate=base.drop_path_rate)
        if expected != base:
            raise ValueError(f"{args.init} is not a {args.model}: its config is {base}")
    cfg = dataclasses.replace(base, out_dim=num_classes, drop_path_rate=args.drop_path,
                              img_size=args.image_size or base.img_size)
    model = TimmUTAViT(cfg)
    model.global_pool = args.global_pool
    if source is not None:
        if cfg.img_size != base.img_size:
            resize_uta_vit(source, cfg.img_size)
        state = source.state_dict()
        if state["head.weight"].shape != model.head.weight.shape:
            state = {**state, "head.weight": model.head.weight.data, "head.bias": model.head.bias.data}
        load_strict(model, state, str(args.init))
    return model


class ClassificationFinetuner(StepTrainer):
    def __init__(self, args: FinetuneClsArguments):
        self.args = args
        self.rank, self.world, self.device = distributed_setup(args.local_rank)
        self.out = Path(args.output_dir)
        torch.manual_seed(args.seed)  # the fresh head: the same on every rank

        train_folder = checked_image_folder(args.train_data)
        self.classes = train_folder.classes
        model = build_classifier(args, len(self.classes))
        self.model = model.to(self.device)
        torch.manual_seed(args.seed + self.rank)  # drop path: each rank its own draws

        img_size, norm = model.cfg.img_size, dict(mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)  # UTA's (CLIP's)
        train_transform = create_transform(
            img_size, is_training=True, scale=(args.scale_min, 1.0), color_jitter=args.color_jitter,
            auto_augment=args.auto_augment, interpolation="bicubic", re_prob=args.reprob, **norm)
        self.eval_transform = create_transform(img_size, is_training=False, crop_pct=args.crop_pct,
                                               interpolation="bicubic", **norm)
        self.dataset = SeededViews(train_folder, train_transform, args.seed)  # (augmented image, class index)
        self.val_folder = None
        if args.val_data:
            self.val_folder = checked_image_folder(args.val_data, self.eval_transform, train_folder.class_to_idx)

        if args.batch_size % (self.world * args.micro_batch_size):
            raise ValueError(f"--batch_size {args.batch_size} must be a multiple of world size {self.world} "
                             f"x --micro_batch_size {args.micro_batch_size}")
        self.accum = args.batch_size // self.world // args.micro_batch_size
        self.sampler = EpochSampler(len(self.dataset), args.seed, self.rank, self.world)
        self.steps_per_epoch = len(self.dataset) // args.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{args.train_data}: {len(self.dataset)} images are fewer than one global batch "
                             f"({args.batch_size})")
        self.total_steps = args.max_steps or math.ceil(args.epochs * self.steps_per_epoch)
        warmup = args.warmup_steps if args.warmup_steps >= 0 else round(args.warmup_epochs * self.steps_per_epoch)
        warmup = min(warmup, self.total_steps - 1)

        self.optimizer = create_optimizer_v2(model, "adamw", lr=args.lr, weight_decay=args.weight_decay,
                                             layer_decay=args.layer_decay, betas=(args.beta1, args.beta2),
                                             eps=args.eps)
        self.scheduler = CosineLRScheduler(self.optimizer, t_initial=max(1, self.total_steps - warmup),
                                           lr_min=args.min_lr, warmup_t=warmup, warmup_prefix=True,
                                           t_in_epochs=False)
        self.mixup = None
        if args.mixup > 0 or args.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                               switch_prob=args.mixup_switch_prob, label_smoothing=args.smoothing,
                               num_classes=len(self.classes))
            self.loss_fn = SoftTargetCrossEntropy()  # the smoothing is in Mixup's soft targets
        elif args.smoothing > 0:
            self.loss_fn = LabelSmoothingCrossEntropy(args.smoothing)
        else:
            self.loss_fn = nn.CrossEntropyLoss()
        self.ema = ModelEmaV3(self.model, decay=args.model_ema_decay) if args.model_ema else None
        self.ddp = None
        if self.world > 1:
            device_ids = [self.device] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=device_ids)
        self.checkpoints = StepCheckpoints(self.out, self.rank, args.keep_last)
        self.step = 0
        self.train_seconds = 0.0

    # ---- one optimizer step

    def train_step(self, micro_batches: Iterable[tuple[Tensor, Tensor]]) -> float:
        """Summed gradients of the mean loss over the global batch (DDP reduces after the last micro-batch)."""
        micro_batches = list(micro_batches)
        total = 0.0
        for j, (images, targets) in enumerate(micro_batches):
            images, targets = images.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
            if self.mixup is not None:
                with seeded_rngs(sample_seed(self.args.seed, self.step, self.rank * self.accum + j)):
                    images, targets = self.mixup(images, targets)
            model = self.ddp or self.model
            last = j == len(micro_batches) - 1
            with self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext():
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
                    logits = model(images)
                loss = self.loss_fn(logits.float(), targets)
                (loss / len(micro_batches)).backward()
            total += loss.item() / len(micro_batches)
        return total

    def optimizer_step(self) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.grad_clip or math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)
        return norm.item()

    # ---- evaluation

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Top-1 / top-5 (top-k for fewer than 5 classes) on --val_data, each rank a stride of it, counts summed."""
        was_training = model.training
        model.eval()
        indices = list(range(self.rank, len(self.val_folder), self.world))
        loader = DataLoader(torch.utils.data.Subset(self.val_folder, indices), batch_size=self.args.eval_batch_size,
                            num_workers=min(self.args.workers, 2))
        k = min(5, len(self.classes))
        counts = torch.zeros(3, dtype=torch.float64, device=self.device)  # top-1 hits, top-k hits, images
        for images, targets in loader:
            images, targets = images.to(self.device), targets.to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
                logits = model(images).float()
            top = logits.topk(k, dim=-1).indices
            counts[0] += (top[:, 0] == targets).sum()
            counts[1] += (top == targets[:, None]).any(dim=-1).sum()
            counts[2] += len(targets)
        if self.world > 1:
            dist.all_reduce(counts)
        model.train(was_training)
        return {"top1": (counts[0] / counts[2]).item(), f"top{k}": (counts[1] / counts[2]).item()}

    def evaluate_all(self) -> dict[str, float]:
        result = self.evaluate(self.model)
        if self.ema is not None:
            result |= {f"ema_{key}": value for key, value in self.evaluate(self.ema.module).items()}
        return result

    # ---- checkpoints and output

    def save_weights(self, folder: Path) -> None:
        if self.rank != 0:
            return
        save_uta_vit(self.model, folder / "model.safetensors", fp32_state_dict(self.model, None, False, 0))
        if self.ema is not None:
            save_uta_vit(self.ema.module, folder / "ema.safetensors", fp32_state_dict(self.ema.module, None, False, 0))

    def load_weights(self, folder: Path) -> None:
        load_strict(self.model, load_state_dict_file(folder / "model.safetensors"), str(folder))
        if self.ema is not None:
            load_strict(self.ema.module, load_state_dict_file(folder / "ema.safetensors"), str(folder))

    def save_outputs(self) -> None:
        super().save_outputs()
        if self.rank == 0:
            write_json_atomic(self.out / "classes.json", self.classes)

    # ---- the run

    def train(self) -> dict:
        summary = {"args": asdict(self.args), "num_classes": len(self.classes), "train_images": len(self.dataset)}
        self.begin()
        self.run_steps(self.model, "fine-tune", self.evaluate_all if self.val_folder is not None else None)
        summary |= self.run_summary(output=str(self.out / "model.safetensors"))
        if self.val_folder is not None:
            summary["val"] = self.evaluate_all()
            self.logger.log_eval(self.step, summary["val"])
        return self.finish(summary)


def build_parser() -> HfArgumentParser:
    return HfArgumentParser(FinetuneClsArguments)


def main(argv: list[str] | None = None) -> None:
    training_cli(build_parser(), ClassificationFinetuner, argv)


if __name__ == "__main__":
    main()
