"""Running a training CLI in a child process and killing it mid-run, for the exact-resume tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def kill_when_written(module: str, flags: list[str], path: Path, timeout: float = 300) -> None:
    """Run `python -m module flags`, SIGKILL it as soon as `path` exists (or it ends, or `timeout` passes)."""
    proc = subprocess.Popen([sys.executable, "-m", module, *flags], env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
