"""The UTA pre-training engine: one loop for a plain CPU/GPU process and for DeepSpeed ranks.

Each optimizer step draws `batch_size` images (split over ranks and gradient-accumulation micro-batches),
runs the frozen teacher on the full view, runs the student as the objective prescribes, and aligns them.
With `--masks_per_view M` one teacher forward (or one cached target) serves M student passes with different keep
sets (one batch of M x micro-batch rows), and the loss is their mean.
Checkpoints hold the student (safetensors) plus optimizer, scheduler, every rank's RNG state and the step, from
which the data position follows, so `--resume` continues exactly.

Randomness: the student is initialised alike on every rank (`seed`); model-side randomness (drop path) is then
seeded per rank (`seed + rank`, as MAE/EVA do), while crops, flips and masks depend only on (seed, epoch, index).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

from llava_uta.eval.zeroshot import ZeroShotProbe
from llava_uta.model.checkpoint import load_state_dict_file, load_strict, save_uta_vit
from llava_uta.model.model_source import with_weights_flag
from llava_uta.model.open_clip_loader import create_open_clip, open_clip_tokenizer
from llava_uta.model.uta_vit import UTAViT, build_uta_vit
from pretrain.data import EpochSampler, MaskedViews, image_source, train_transform
from pretrain.loop import (
    RunArguments,
    StepCheckpoints,
    StepTrainer,
    deepspeed_engine,
    distributed_setup,
    fp32_state_dict,
)
from pretrain.masking import MASK_PAIRINGS, MASKING_KINDS, KeepIndexGenerator, check_mask_pairing
from pretrain.objectives import OBJECTIVES, flops_per_token, get_objective
from pretrain.teacher import CLIPTeacher
from pretrain.teacher_cache import TeacherCache


@dataclass
class PretrainArguments(RunArguments):
    """Flags of `llava-uta-pretrain`; defaults follow the paper card (ImageNet-21K, UTA-B)."""

    data_path: str = field(metadata={"help": "ImageFolder root, a .tar shard, or a folder / glob of tar shards"})
    output_dir: str = field(metadata={"help": "checkpoints, logs and the final student go here"})
    teacher: str = field(default="open_clip:EVA01-g-14-plus", metadata={
        "help": "the frozen CLIP, an open_clip model source: open_clip:NAME@WEIGHTS (a local weights file, open_clip "
        "or EVA-CLIP layout, e.g. BAAI's EVA01_CLIP_g_14_plus .pt) or open_clip:local-dir:DIR; see "
        "docs/model-sources.md"})
    teacher_pretrained: str | None = field(default=None, metadata={
        "help": "deprecated, goes in the next release: give --teacher open_clip:NAME@FILE"})
    teacher_random_weights: bool = field(default=False, metadata={
        "help": "a --teacher named without weights gets random weights (benchmarks only; recorded in summary.json), "
        "instead of the error that names the missing file"})
    teacher_precision: str = field(default="fp32", metadata={"help": "fp32 | bf16 | fp16"})
    compile_teacher: bool = field(default=False, metadata={
        "help": "torch.compile the teacher's forward (its first batch of each shape compiles; pays at scale)"})
    model: str = field(default="uta_b14_224", metadata={"help": "student config name (UTA_VIT_CONFIGS)"})
    image_size: int | None = field(default=None, metadata={"help": "override the student's image size"})
    objective: str = field(default="uta", metadata={"help": f"one of {tuple(OBJECTIVES)}"})
    masking: str | None = field(default=None, metadata={
        "help": f"one of {MASKING_KINDS}; default: block for mim (EVA-02 masks the blocks), reversed_block otherwise"})
    min_block: int | None = field(default=None, metadata={
        "help": "smallest masking rectangle in patches; default: BEiT's 16 at 14x14 and up, the same share of "
                "a smaller grid (pretrain/masking.py)"})
    mask_ratio: float = field(default=0.4, metadata={"help": "0.4 for base, 0.5 for large (paper card)"})
    cls_weight: float | None = field(default=None, metadata={"help": "CLS share of the loss; default: plain mean"})
    masks_per_view: int = field(default=1, metadata={
        "help": "student passes per teacher forward: M keep sets of each view share its teacher targets, the loss "
                "is the mean of the M passes (uta and mim; the student's forward takes M x micro_batch_size rows)"})
    mask_pairing: str = field(default="independent", metadata={
        "help": f"one of {MASK_PAIRINGS}: M independent draws, or (M=2, mask_ratio 0.5) a draw and its complement, "
                "so the two passes cover every patch exactly once"})
    epochs: float = 150.0
    max_steps: int = field(default=0, metadata={"help": "optimizer steps; 0 = from epochs"})
    max_train_seconds: float = field(default=0.0, metadata={
        "help": "wall-clock budget of the training steps: stop once spent, the cosine decays over this time "
                "instead of over the steps (which become an upper bound); 0 = by steps"})
    batch_size: int = field(default=4096, metadata={"help": "global batch (gradient accumulation fills it)"})
    micro_batch_size: int = field(default=64, metadata={"help": "images per rank per forward"})
    lr: float = 1.5e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 1.0
    warmup_steps: int = field(default=0, metadata={"help": "overrides warmup_epochs when > 0"})
    weight_decay: float = 0.05
    adam_beta2: float = 0.98
    layer_decay: float | None = None
    drop_path: float = 0.0
    grad_clip: float = 3.0
    grad_checkpointing: bool = False
    bf16: bool = False
    zero_stage: int = field(default=1, metadata={"help": "DeepSpeed ZeRO stage (1 or 2) when run by deepspeed"})
    deepspeed: bool = field(default=False, metadata={"help": "use DeepSpeed even in a single process"})
    crop_min_scale: float = 0.2
    flip: bool = True
    peak_tflops: float | None = field(default=None, metadata={"help": "hardware peak, to report the fraction"})
    eval_points: int = field(default=0, metadata={
        "help": "zero-shot evals spread over the run: one each time another 1/N of the budget is spent (of "
                "--max_train_seconds if set, else of the steps), the last at the end; each log record holds the "
                "step, the training seconds and the student's TFLOP so far (a curve of top-1 against compute)"})
    teacher_cache: str | None = field(default=None, metadata={"help": "folder of precomputed teacher targets "
                                      "(built on first use); implies a fixed-view schedule"})
    cache_views: int = field(default=1, metadata={"help": "fixed views per image with --teacher_cache"})
    cache_encoding: str = field(default="fp16", metadata={"help": "teacher cache values: fp16, or fp8 (e4m3, "
                                                                   "scaled per token: half the disk)"})

    def __post_init__(self) -> None:
        if self.masking is None:
            self.masking = get_objective(self.objective).masking
        get_objective(self.objective).check_masks_per_view(self.masks_per_view)
        check_mask_pairing(self.mask_pairing, self.masks_per_view, mask_ratio=self.mask_ratio)


class Pretrainer(StepTrainer):
    totals = ("train_seconds", "student_flop", "evals_done")
    logged_lr_group = 0  # the first (under --layer_decay, the embeddings', at the lowest lr)
    steady_keys = ("images_per_s", "passes_per_s", "student_tflops", "teacher_share")

    def __init__(self, args: PretrainArguments):
        self.objective = get_objective(args.objective)
        self.args = args
        self.rank, self.world, self.device = distributed_setup(args.local_rank, args.deepspeed)
        self.use_deepspeed = self.world > 1 or args.deepspeed
        self.out = Path(args.output_dir)
        torch.manual_seed(args.seed)  # the same initial student on every rank

        source = with_weights_flag(args.teacher, args.teacher_pretrained, "--teacher", "--teacher_pretrained")
        clip = create_open_clip(source, random_weights=args.teacher_random_weights)
        self.probe = None
        if args.eval_data:  # class weights from the teacher's text tower, built once
            self.probe = ZeroShotProbe.build(args.eval_data, clip.visual.image_size[0], self.device,
                                             args.eval_classnames, args.eval_templates, workers=min(args.workers, 2))
            self.probe.set_text_tower(clip.to(self.device), open_clip_tokenizer(args.teacher))
            self.teacher_zeroshot = self.probe.evaluate(clip)
        self.teacher = CLIPTeacher.from_clip(clip, args.teacher_precision).to(self.device)
        if args.compile_teacher:
            self.teacher.compile_encoder()
        del clip  # the text tower is no longer needed
        overrides = {"img_size": args.image_size} if args.image_size else {}
        student = build_uta_vit(args.model, drop_path_rate=args.drop_path, use_mask_token=self.objective.mask_token,
                                out_dim=self.teacher.embed_dim, **overrides)
        self.grid = (student.cfg.grid_size, student.cfg.grid_size)
        self.teacher.input_size_for(self.grid)  # refuse early when the token grids cannot correspond
        if args.grad_checkpointing:
            student.set_grad_checkpointing(True)
        self.student: UTAViT = student.to(self.device)
        torch.manual_seed(args.seed + self.rank)  # drop path: each rank its own draws

        masks = KeepIndexGenerator(self.grid, args.mask_ratio, args.masking, args.min_block)
        views = train_transform(student.cfg.img_size, (args.crop_min_scale, 1.0), args.flip)
        self.dataset = MaskedViews(image_source(args.data_path), views, masks, args.seed,
                                   masks_per_view=args.masks_per_view, pairing=args.mask_pairing)
        if args.teacher_cache:
            self.dataset.views, self.dataset.targets = args.cache_views, self._teacher_cache()
        per_rank_batch = args.batch_size // self.world
        if args.batch_size % (self.world * args.micro_batch_size):
            raise ValueError(f"--batch_size {args.batch_size} must be a multiple of world size {self.world} "
                             f"x --micro_batch_size {args.micro_batch_size}")
        self.accum = per_rank_batch // args.micro_batch_size
        self.sampler = EpochSampler(len(self.dataset), args.seed, self.rank, self.world)
        self.steps_per_epoch = len(self.dataset) // self.world // args.micro_batch_size // self.accum
        if self.steps_per_epoch == 0:
            raise ValueError(f"{args.data_path}: {len(self.dataset)} images are fewer than one global batch")
        self.total_steps = args.max_steps or math.ceil(args.epochs * self.steps_per_epoch)
        self.warmup = warmup = args.warmup_steps or round(args.warmup_epochs * self.steps_per_epoch)

        self.optimizer = create_optimizer_v2(self.student, opt="adamw", lr=args.lr, weight_decay=args.weight_decay,
                                             betas=(0.9, args.adam_beta2), layer_decay=args.layer_decay)
        self.scheduler = CosineLRScheduler(self.optimizer, t_initial=max(1, self.total_steps - warmup),
                                           lr_min=args.min_lr, warmup_t=warmup, warmup_prefix=True,
                                           t_in_epochs=False)
        self.engine = deepspeed_engine(self.student, self.optimizer, args.micro_batch_size, self.accum, args.grad_clip,
                                       args.zero_stage, args.bf16) if self.use_deepspeed else None
        self.checkpoints = StepCheckpoints(self.out, self.rank, args.keep_last)
        self.flops_per_token = flops_per_token(student)
        self.step = 0
        self.train_seconds = 0.0  # spent in training steps (the budget of --max_train_seconds)
        self.student_flop = 0.0  # the student's matmul FLOPs so far, every rank (flops_per_token x tokens)
        self.evals_done = 0  # of --eval_points
        # the last step's measures, for its log record: the last micro-batch's loss terms, the teacher's seconds and
        # this rank's student tokens (all passes)
        self.loss_terms: dict[str, float] = {}
        self.teacher_seconds, self.tokens = 0.0, 0

    # ---- setup helpers

    def _teacher_cache(self) -> TeacherCache:
        """The cache of this teacher's targets for every (fixed view, image), built now if incomplete."""
        args = self.args
        cache = TeacherCache(args.teacher_cache, encoding=args.cache_encoding)
        description = cache.describe(
            teacher=args.teacher, teacher_pretrained=args.teacher_pretrained, precision=args.teacher_precision,
            data_path=str(Path(args.data_path).resolve()), num_images=len(self.dataset), views=args.cache_views,
            image_size=self.student.cfg.img_size, grid=list(self.grid), crop_min_scale=args.crop_min_scale,
            flip=args.flip, seed=args.seed)
        if not cache.is_complete(description):
            if (cache.root / "cache.json").is_file():
                raise ValueError(f"{cache.root} caches other targets (cache.json differs): use another folder")
            cache.build(self.dataset, self.teacher, self.grid, args.cache_views, description, self.device,
                        rank=self.rank, world=self.world)
        return cache

    # ---- one optimizer step

    def micro_step(self, images: torch.Tensor, keep: torch.Tensor, cached: torch.Tensor | None = None
                   ) -> tuple[float, dict, float]:
        """Forward + backward of one micro-batch; returns the loss, its stats and the teacher's seconds.

        `keep` is (B, K), or (B, M, K) for M passes that share the teacher's targets (computed once here)."""
        images, keep = images.to(self.device, non_blocking=True), keep.to(self.device, non_blocking=True)
        start = time.perf_counter()
        targets = self.teacher(images, self.grid) if cached is None else cached.to(self.device).float()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # kernels run asynchronously: time the teacher's, not their launch
        teacher_seconds = time.perf_counter() - start
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.bf16)
        model = self.unwrapped
        if self.engine and self.args.bf16:  # DeepSpeed holds the student in bf16
            images = images.to(torch.bfloat16)
        with autocast:
            loss, stats = self.objective.passes_loss(model, images, targets, keep, self.args.cls_weight)
        if self.engine:
            self.engine.backward(loss)
            self.engine.step()
        else:
            (loss / self.accum).backward()
        return loss.item(), stats, teacher_seconds

    def train_step(self, micro_batches: Iterable[tuple[torch.Tensor, ...]]) -> float:
        """Forward + backward of the step's micro-batches, one at a time; their mean loss."""
        losses, self.teacher_seconds, self.tokens = [], 0.0, 0
        for images, keep, *cached in micro_batches:
            loss, self.loss_terms, seconds = self.micro_step(images, keep, *cached)
            losses.append(loss)
            self.teacher_seconds += seconds
            passes = keep.shape[1] if keep.dim() == 3 else 1
            self.tokens += images.shape[0] * passes * self.objective.tokens_per_image(keep.shape[-1],
                                                                                      math.prod(self.grid))
        self.student_flop += self.flops_per_token * self.tokens * self.world
        return sum(losses) / len(losses)

    def optimizer_step(self) -> float:
        """Clip, step and zero (the plain path; DeepSpeed does this inside engine.step). Returns the grad norm."""
        if self.engine:
            norm = self.engine.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.args.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.item()

    # ---- checkpoints and output

    def save_weights(self, folder: Path) -> None:
        self.save_student(folder / "student.safetensors")

    def load_weights(self, folder: Path) -> None:
        load_strict(self.student, load_state_dict_file(folder / "student.safetensors"), str(folder))

    def save_student(self, path: Path) -> None:
        """Write the student with fp32 weights (rank 0); a collective under DeepSpeed --bf16, so every rank calls it."""
        state = fp32_state_dict(self.unwrapped, self.engine, self.args.bf16, self.rank)
        if state is not None:
            save_uta_vit(self.unwrapped, path, state)

    @property
    def unwrapped(self) -> UTAViT:
        return self.engine.module if self.engine else self.student

    # ---- the loop's hooks

    def step_stats(self) -> dict[str, float]:
        return self.loss_terms

    def throughput(self, seconds: float) -> dict[str, float]:
        """Per second of one step: images (teacher views), student passes (M per image), the student's tokens (all
        passes, every rank) and estimated TFLOP/s; and the teacher's share of the step's time (one forward per
        image)."""
        tokens = self.tokens * self.world
        tflops = self.flops_per_token * tokens / seconds / 1e12
        images_per_s = self.args.batch_size / seconds
        record = {"images_per_s": images_per_s, "passes_per_s": images_per_s * self.args.masks_per_view,
                  "tokens_per_s": tokens / seconds,
                  "student_tflops": tflops, "teacher_share": self.teacher_seconds / seconds, "seconds": seconds}
        if self.args.peak_tflops:
            record["peak_fraction"] = tflops / self.args.peak_tflops
        return record

    def schedule_position(self) -> float:
        """Where the lr schedule stands: the step, or with a time budget the share of it spent (after warm-up)."""
        budget = self.args.max_train_seconds
        if not budget or self.step < self.warmup:
            return self.step
        return self.warmup + (self.total_steps - self.warmup) * min(1.0, self.train_seconds / budget)

    def budget_spent(self) -> float:
        """The share of the run's budget spent: of --max_train_seconds if set, else of the steps."""
        budget = self.args.max_train_seconds
        return self.train_seconds / budget if budget else self.step / self.total_steps

    def eval_due(self) -> bool:
        """Every --eval_every steps, and when another of the --eval_points is reached, marking it taken (at most one
        per step; the last at the end)."""
        points = self.args.eval_points
        reached = points if self.finished() else min(points, math.floor(self.budget_spent() * points))
        point, self.evals_done = reached > self.evals_done, max(reached, self.evals_done)
        return point or super().eval_due()

    def eval_context(self) -> dict[str, float]:
        return {"train_seconds": self.train_seconds, "student_tflop": self.student_flop / 1e12}

    def finished(self) -> bool:
        budget = self.args.max_train_seconds
        return super().finished() or bool(budget and self.train_seconds >= budget)

    def zeroshot(self) -> dict[str, float]:
        """The student's zero-shot result now (class weights from the teacher's text tower); training mode after."""
        result = self.probe.evaluate(self.unwrapped)
        self.student.train()
        return result

    # ---- the run

    def train(self) -> dict:
        summary = {"args": asdict(self.args)}
        self.begin()
        last_eval = self.run_steps(self.student, self.args.objective, self.zeroshot if self.probe else None)
        summary |= self.run_summary(student_tflop=self.student_flop / 1e12)
        if self.probe:  # the final weights' result: the eval of the last step if there was one
            summary["zeroshot"] = last_eval[1] if last_eval[0] == self.step else self.zeroshot()
            summary["teacher_zeroshot"] = self.teacher_zeroshot
        return self.finish(summary)
