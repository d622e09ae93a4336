"""The training loop of this package's tools and what it rests on: ranks, DeepSpeed, step checkpoints, exact resume,
logs, preemption, the command line.

A checkpoint is a folder `checkpoints/step_N` written through a temporary sibling renamed into place (a crash
never leaves half a checkpoint), holding every rank's RNG state, the optimizer/scheduler state (DeepSpeed's own
files under a DeepSpeed engine) and the model weights, so that `--resume` continues bit-exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import HfArgumentParser

from llava_uta.distributed import end_process_group, init_distributed
from llava_uta.io_utils import partial_dir, replace_dir, write_json_atomic
from llava_uta.preemption import Preempted, PreemptionSignal, exit_preempted


@dataclass(kw_only=True)
class RunArguments:
    """The flags every training loop here takes: data workers, seed, checkpoints, logs, zero-shot evaluation."""

    workers: int = 8
    seed: int = 0
    save_every: int = field(default=1000, metadata={"help": "write a checkpoint every N optimizer steps"})
    keep_last: int = field(default=3, metadata={"help": "checkpoints kept"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint in output_dir"})
    log_every: int = 10
    eval_every: int = field(default=0, metadata={"help": "zero-shot eval every N steps (0: at the end only)"})
    eval_data: str | None = field(default=None, metadata={"help": "ImageFolder for zero-shot evaluation"})
    eval_classnames: str | None = field(default=None, metadata={"help": "JSON list of class names"})
    eval_templates: str | None = field(default=None, metadata={"help": "JSON list of prompt templates"})
    local_rank: int = -1


def distributed_setup(local_rank: int = -1, force_deepspeed: bool = False) -> tuple[int, int, torch.device]:
    """(rank, world size, device); starts the process group when a launcher set WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", max(local_rank, 0)))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if torch.cuda.is_available():
        torch.cuda.set_device(device)
    if world > 1 or force_deepspeed:
        init_distributed()
    return rank, world, device


def deepspeed_engine(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batch_size: int, accum: int,
                     grad_clip: float, zero_stage: int, bf16: bool):
    """A DeepSpeed engine around `model` and a ready optimizer (timm's), ZeRO stage 1 or 2."""
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def save_rng_state(path: Path) -> None:
    """Save this process's CPU RNG state and, on a GPU, its device's CUDA RNG state (drop path draws from these)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    torch.save(state, path)


def load_rng_state(path: Path) -> None:
    """Restore what `save_rng_state` wrote (the CUDA state where this process has a GPU)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no RNG state for this rank (was the checkpoint written by fewer ranks?)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not isinstance(state.get("cpu"), torch.Tensor):
        raise ValueError(f"{path}: expected a dict with the CPU RNG state under 'cpu' (and 'cuda' from a GPU)")
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def global_mean(values: list[float], world: int, device: torch.device) -> list[float]:
    """The means of per-rank values over all ranks, in one all-reduce."""
    if world == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return (tensor / world).tolist()


def fp32_state_dict(model: nn.Module, engine, bf16: bool, rank: int) -> dict[str, Tensor] | None:
    """The model's weights in fp32 on rank 0 (None on the others); a collective under DeepSpeed --bf16.

    DeepSpeed's bf16 mode casts the module to bf16 and keeps the fp32 master weights, partitioned over the ranks,
    in its optimizer: those are gathered and returned, not the bf16-rounded copies.
    """
    masters = {}
    if engine is not None and bf16:
        from deepspeed.utils import safe_get_full_fp32_param

        masters = {name: safe_get_full_fp32_param(p) for name, p in model.named_parameters() if p.requires_grad}
        if missing := [name for name, value in masters.items() if value is None]:
            raise RuntimeError(f"DeepSpeed holds no fp32 master weights for {missing[:8]}")
    if rank != 0:
        return None
    state = {k: v.detach() for k, v in model.state_dict().items()}
    state.update(masters)
    return {k: (v.float() if v.is_floating_point() else v).cpu().contiguous() for k, v in state.items()}


class StepCheckpoints:
    """The `checkpoints/step_N` folders of a run: atomic writes, the newest `keep_last` kept."""

    def __init__(self, out: Path, rank: int, keep_last: int):
        self.root, self.rank, self.keep_last = Path(out) / "checkpoints", rank, keep_last

    def folders(self) -> list[Path]:
        return sorted(self.root.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))

    def save(self, step: int, engine, optimizer, state: dict, write_weights: Callable[[Path], None]) -> Path:
        """Every rank calls this: RNG per rank, optimizer + `state` (DeepSpeed's files, or state.pt), then weights.

        `write_weights(folder)` is called on every rank (it may be a collective) and writes the model files.
        """
        final = self.root / f"step_{step:08d}"
        tmp = partial_dir(final, fresh=self.rank == 0)
        barrier()
        save_rng_state(tmp / f"rng_rank{self.rank}.pt")
        if engine is not None:
            engine.save_checkpoint(str(tmp), tag="deepspeed", client_state=state)
        elif self.rank == 0:
            torch.save({**state, "optimizer": optimizer.state_dict()}, tmp / "state.pt")
        write_weights(tmp)
        barrier()  # every rank's files are in place
        if self.rank == 0:
            replace_dir(tmp, final)
            for old in self.folders()[: -self.keep_last]:
                shutil.rmtree(old)
        barrier()
        return final

    def load(self, folder: Path, engine, optimizer, load_weights: Callable[[Path], None]) -> dict:
        """Restore optimizer, weights and this rank's RNG from `folder`; returns the `state` saved with them."""
        if engine is not None:
            _, state = engine.load_checkpoint(str(folder), tag="deepspeed")
        else:
            state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
            load_weights(folder)
            optimizer.load_state_dict(state.pop("optimizer"))
        load_rng_state(folder / f"rng_rank{self.rank}.pt")
        return state


class RunLogger:
    """Per-step JSONL log and TensorBoard scalars, written by rank 0; every record is kept for the summary."""

    def __init__(self, out: Path, active: bool):
        self.active = active
        self.records: list[dict] = []
        if active:
            from torch.utils.tensorboard import SummaryWriter

            self.jsonl = open(Path(out) / "log.jsonl", "a")  # noqa: SIM115 (closed in close())
            self.tb = SummaryWriter(str(Path(out) / "tensorboard"))

    def log(self, record: dict, every: int) -> None:
        """Keep `record` (it has a "step"); write it every `every` steps and at step 1."""
        self.records.append(record)
        step = record["step"]
        if self.active and (step % every == 0 or step == 1):
            self._write(record)
            for key, value in record.items():
                if key != "step":
                    self.tb.add_scalar(f"train/{key}", value, step)

    def log_eval(self, step: int, result: dict, **context: float) -> None:
        """Write an evaluation's `result`, with where the run stands (e.g. its training seconds) in `context`."""
        if self.active:
            self._write({"step": step, **context, "eval": result})
            for key, value in result.items():
                self.tb.add_scalar(f"eval/{key}", value, step)

    def _write(self, record: dict) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()

    def steady_mean(self, key: str) -> float:
        """The mean of `key` over the second half of the run (past warm-up and compilation)."""
        tail = self.records[len(self.records) // 2:] or self.records
        return sum(r[key] for r in tail) / len(tail)

    def close(self) -> None:
        if self.active:
            self.jsonl.close()
            self.tb.close()


class StepTrainer:
    """The optimizer-step loop of every training tool here: resumable epochs of micro-batches, logs, evaluations,
    checkpoints, preemption, and the run's start and end.

    A subclass sets `args` (RunArguments with batch_size and micro_batch_size), `rank`, `world`, `device`, `out`,
    `dataset` (with set_epoch), `sampler` (an EpochSampler), `optimizer`, `scheduler`, `checkpoints`, `accum`,
    `steps_per_epoch`, `total_steps`, `step` and `train_seconds` (and `engine` under DeepSpeed), and defines
    `train_step(micro_batches) -> this rank's loss` (the step's `accum` micro-batches, read lazily),
    `optimizer_step() -> grad norm`, `save_weights(folder)` (called on every rank), `load_weights(folder)`, and
    `train() -> summary`: `begin()`, `run_steps(...)`, its own final evaluations into `run_summary(...)`, then
    `finish(summary)`. It may override the hooks and class attributes.
    """

    engine = None  # a DeepSpeed engine, which then holds the optimizer state and the weights of a checkpoint
    totals: tuple[str, ...] = ("train_seconds",)  # the run's running totals a checkpoint keeps beside the step
    logged_lr_group = -1  # the param group whose lr is logged: the last (under layer decay, one at the full lr)
    steady_keys: tuple[str, ...] = ("images_per_s",)  # throughput figures the summary averages over the run

    def save_outputs(self) -> None:
        """The run's final files, written on every rank: its weights as a checkpoint holds them, unless overridden."""
        self.save_weights(self.out)

    def loader(self, epoch: int, start: int) -> DataLoader:
        """Epoch `epoch`'s micro-batches from this rank's sample `start` on (augmentations are seeded per sample)."""
        self.dataset.set_epoch(epoch)
        self.sampler.set_epoch(epoch, start)
        # its own generator: creating a loader must not advance the global RNG (drop path), or resume drifts
        generator = torch.Generator().manual_seed(self.args.seed + epoch)
        return DataLoader(self.dataset, batch_size=self.args.micro_batch_size, sampler=self.sampler,
                          num_workers=self.args.workers, drop_last=True, generator=generator,
                          pin_memory=self.device.type == "cuda")

    # ---- hooks

    def schedule_position(self) -> float:
        """Where the lr schedule stands before the next step."""
        return self.step

    def finished(self) -> bool:
        return self.step >= self.total_steps

    def step_stats(self) -> dict[str, float]:
        """The last step's loss terms, logged after its loss."""
        return {}

    def throughput(self, seconds: float) -> dict[str, float]:
        """The log's speed figures of a step that took `seconds`."""
        return {"images_per_s": self.args.batch_size / seconds, "seconds": seconds}

    def eval_due(self) -> bool:
        """Whether to evaluate after this step (called once a step)."""
        return bool(self.args.eval_every) and self.step % self.args.eval_every == 0

    def eval_context(self) -> dict[str, float]:
        """Where the run stands, logged with an evaluation."""
        return {}

    # ---- checkpoints

    def save_checkpoint(self) -> Path:
        state = {"step": self.step, **{name: getattr(self, name) for name in self.totals},
                 "scheduler": self.scheduler.state_dict()}
        return self.checkpoints.save(self.step, self.engine, self.optimizer, state, self.save_weights)

    def load_checkpoint(self, folder: Path) -> None:
        state = self.checkpoints.load(folder, self.engine, self.optimizer, self.load_weights)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        for name in self.totals:  # a total the checkpoint lacks (written before it was kept) stays at its start
            setattr(self, name, state.get(name, getattr(self, name)))

    # ---- the run

    def begin(self) -> bool:
        """Create the output folder and the run's `logger`; with --resume, load the newest checkpoint there. Whether
        one was loaded."""
        self.out.mkdir(parents=True, exist_ok=True)
        resumed = bool(self.args.resume and self.checkpoints.folders())
        if resumed:
            self.load_checkpoint(self.checkpoints.folders()[-1])
        self.logger = RunLogger(self.out, self.rank == 0)
        return resumed

    def run_steps(self, model: nn.Module, desc: str, evaluate: Callable[[], dict] | None) -> tuple[int, dict]:
        """`model` in training mode, optimizer steps until `finished()`: log each, `evaluate` when `eval_due()`,
        checkpoint every `save_every` and at the end; on SIGTERM / SIGUSR1, checkpoint after the current step and
        raise Preempted. Returns the last evaluation as (step, result), or (-1, {}) without one."""
        model.train()
        with PreemptionSignal() as preemption, tqdm(total=self.total_steps, initial=self.step,
                                                    disable=self.rank != 0, desc=desc) as progress:
            return self._steps(evaluate, progress, preemption)

    def _steps(self, evaluate: Callable[[], dict] | None, progress: tqdm, preemption: PreemptionSignal
               ) -> tuple[int, dict]:
        args, last_eval = self.args, (-1, {})
        while not self.finished():
            epoch, step_in_epoch = divmod(self.step, self.steps_per_epoch)
            batches = iter(self.loader(epoch, step_in_epoch * self.accum * args.micro_batch_size))
            for _ in range(step_in_epoch, self.steps_per_epoch):
                self.scheduler.step_update(self.schedule_position())
                start = time.perf_counter()
                loss = self.train_step(next(batches) for _ in range(self.accum))
                grad_norm = self.optimizer_step()
                self.step += 1
                # the ranks agree on the time budget
                elapsed, loss = global_mean([time.perf_counter() - start, loss], self.world, self.device)
                self.train_seconds += elapsed
                progress.update()
                seconds = time.perf_counter() - start
                self.logger.log({"step": self.step, "loss": loss, **self.step_stats(),
                                 "lr": self.optimizer.param_groups[self.logged_lr_group]["lr"], "grad_norm": grad_norm,
                                 **self.throughput(seconds)}, every=args.log_every)
                if self.eval_due() and evaluate is not None:
                    last_eval = self.step, evaluate()
                    self.logger.log_eval(self.step, last_eval[1], **self.eval_context())
                due = self.step % args.save_every == 0 or self.finished()
                checkpoint = self.save_checkpoint() if due else None
                if preemption.requested(self.device):
                    raise Preempted(self.step, str(checkpoint or self.save_checkpoint()))
                if self.finished():
                    break
        return last_eval

    def run_summary(self, **facts: object) -> dict:
        """The steps and training seconds, `facts`, then the final loss and the steady throughput (`steady_keys`)."""
        summary = {"steps": self.step, "train_seconds": self.train_seconds, **facts}
        if self.logger.records:
            summary["final_loss"] = self.logger.records[-1]["loss"]
            summary |= {key: self.logger.steady_mean(key) for key in self.steady_keys}
        return summary

    def finish(self, summary: dict) -> dict:
        """End the run: `save_outputs()` on every rank (it may be a collective), then summary.json (rank 0); the logs
        closed, every rank done. Returns `summary`."""
        self.save_outputs()
        if self.rank == 0:
            write_json_atomic(self.out / "summary.json", summary)
        self.logger.close()
        barrier()
        return summary


def training_cli(parser: HfArgumentParser, trainer: Callable[..., StepTrainer], argv: list[str] | None,
                 show: Callable[[dict], str] = str) -> None:
    """A training tool's command line: parse `argv` into the trainer's arguments, train, and print the summary but
    its args (rank 0, through `show`); a run stopped by SIGTERM / SIGUSR1 exits with status PREEMPTED_EXIT."""
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    run = trainer(args)
    try:
        summary = run.train()
    except Preempted as err:
        exit_preempted(err)
    if run.rank == 0:
        print(show({k: v for k, v in summary.items() if k != "args"}))
    end_process_group()
