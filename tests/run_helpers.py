"""Pre-training runs for the tests: the engine's arguments, as a dataclass and as CLI flags, and running a training CLI
in a child process that is killed mid-run (the exact-resume tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pretrain.engine import PretrainArguments

REPO = Path(__file__).resolve().parents[1]


def engine_args(world: Path, teacher: Path, out: Path, **overrides) -> PretrainArguments:
    """A few steps of uta_test_p8_32 on a tiny world's pre-training images (overrides replace any field)."""
    args = dict(data_path=str(world / "pretrain/train"), output_dir=str(out), teacher=f"open_clip:local-dir:{teacher}",
                model="uta_test_p8_32", mask_ratio=0.5, max_steps=4, batch_size=16, micro_batch_size=8, lr=1e-3,
                warmup_steps=1, workers=0, save_every=100, log_every=1, drop_path=0.1, crop_min_scale=0.5)
    args.update(overrides)
    return PretrainArguments(**args)


def cli_flags(args: PretrainArguments) -> list[str]:
    """The llava-uta-pretrain flags of the fields engine_args sets."""
    flags = []
    for key in ("data_path", "output_dir", "teacher", "model", "mask_ratio", "max_steps", "batch_size",
                "micro_batch_size", "lr", "warmup_steps", "workers", "save_every", "log_every", "drop_path",
                "crop_min_scale"):
        flags += [f"--{key}", str(getattr(args, key))]
    return flags


def kill_when_written(module: str, flags: list[str], path: Path, timeout: float = 300) -> None:
    """Run `python -m module flags`, SIGKILL it as soon as `path` exists (or it ends, or `timeout` passes)."""
    proc = subprocess.Popen([sys.executable, "-m", module, *flags], env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
