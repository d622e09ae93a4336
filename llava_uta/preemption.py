"""Preemption: SIGTERM and SIGUSR1 stop a training run at the end of its step, after a checkpoint, not mid-step.

Clusters end jobs with a signal and a grace period (SLURM's `--signal=USR1@120` or the SIGTERM before a kill,
Kubernetes' termination, preemptible VMs). A training loop here notes the signal, finishes the optimizer step it is
in, writes a checkpoint (atomically, as every checkpoint), and raises `Preempted`; the tool's command line then exits
with status PREEMPTED_EXIT (75, EX_TEMPFAIL: "try again"), and a rerun with the same flags resumes exactly from that
checkpoint. Ranks agree: one rank's signal stops every rank at the same step.
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

PREEMPTED_EXIT = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """A training loop stopped on a signal after writing the checkpoint of step `step`."""

    def __init__(self, step: int, checkpoint: str):
        super().__init__(f"stopped by a signal after step {step}: checkpoint {checkpoint} written; rerun the same "
                         "command to resume from it")
        self.step, self.checkpoint = step, checkpoint


class PreemptionSignal:
    """Notes SIGTERM / SIGUSR1 while installed (a context manager) instead of letting them end the process."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> PreemptionSignal:
        if threading.current_thread() is threading.main_thread():  # Python only delivers signals there
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _note(self, signum: int, frame) -> None:
        self.received = signum

    def requested(self, device: torch.device | str = "cpu") -> bool:
        """Whether any rank received a signal (every rank calls this at the same step)."""
        flag = self.received is not None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            tensor = torch.tensor([float(flag)], device=device)
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
            flag = bool(tensor.item())
        return flag


def exit_preempted(err: Preempted) -> None:
    """End a preempted tool: say where it stopped, leave the process group in order, exit with PREEMPTED_EXIT."""
    from llava_uta.distributed import end_process_group

    print(f"preempted: {err}", flush=True)
    end_process_group(PREEMPTED_EXIT)
