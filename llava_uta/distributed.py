"""The process group of a distributed run: how every tool here starts it, and how every rank leaves it in order.

The backend is NCCL on GPUs and gloo on CPU ranks (DeepSpeed's CPU accelerator falls back to gloo without oneCCL).

Leaving: why the order matters (gloo, i.e. CPU ranks): a collective is run by one of gloo's worker threads, which
lets go of the collective's tensors only after marking it complete, so possibly after `work.wait()` has returned. A
tensor that carries Python attributes (DeepSpeed's ZeRO parameters and buffers do) keeps its Python object alive
while C++ holds it, and that last release then takes the GIL from the worker thread. If the main thread has already
begun finalizing the interpreter, CPython ends the worker thread inside torch's (noexcept) tensor destructor and the
process aborts: "terminate called without an active exception", SIGABRT, after all outputs were written (the
DeepSpeed launcher then exits with 250). `torch.distributed.destroy_process_group()` alone does not prevent it: the
groups and their worker threads stay alive as long as anything (DeepSpeed's engine, its ZeRO parameters) refers to
them, i.e. until the interpreter exits; a barrier before it narrows the window but does not close it (the barrier's
own work object keeps the earlier collectives alive and is released by a worker thread after the barrier returns).
So a launched rank ends its process without finalization once its outputs are written (`end_process_group`).

Shared memory (CPU ranks): when every rank runs on one machine, DeepSpeed's CPU accelerator gives each rank a named
shared-memory all-reduce buffer (`/dev/shm/deepspeed_allreduce_buffer_UID_ADDR_PORT_RANK`, 66 MiB each), maps every
other rank's buffer while the backend starts, and never unlinks the names: every run would leave one buffer per rank
in RAM until reboot (hundreds of runs filled a 24 GiB machine's memory). Once every rank has passed a barrier, all
buffers are mapped, so each rank unlinks its own name right away; the mappings stay valid until the process ends.
"""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def init_distributed() -> None:
    """Start DeepSpeed's process group (from the launcher's RANK / WORLD_SIZE / MASTER_* variables)."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    if not torch.cuda.is_available():
        dist.barrier()  # every rank has mapped every rank's buffer: the names are no longer needed
        shm_buffer_path(dist.get_rank()).unlink(missing_ok=True)


def shm_buffer_path(rank: int) -> Path:
    """Where DeepSpeed's CPU shared-memory all-reduce keeps `rank`'s buffer in this run (see the module doc)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def end_process_group(status: int = 0) -> None:
    """Wait for every rank, destroy the process group, finish what the program registered to finish at exit, then
    end this rank's process (exit code `status`).

    The barrier returns once every earlier collective of every rank has completed, so no rank leaves while another
    still communicates with it. The atexit handlers then run while the interpreter is whole (a W&B or MLflow run
    opened through `--report_to` is finished, the logging handlers are flushed and closed), the standard streams are
    flushed, and the process ends with `os._exit`: without interpreter finalization, the one moment at which a gloo
    worker thread still releasing the last collectives' tensors aborts the process (the barrier's own work object
    holds them and is destroyed by a worker after the barrier returns). Only a process with a group ends here (a
    launched rank, at the end of a tool's `main`); without a group, a non-zero `status` exits with it (sys.exit),
    and status 0 does nothing, so an in-process caller of a tool goes on.
    """
    if not (dist.is_available() and dist.is_initialized()):
        if status:
            sys.exit(status)
        return
    dist.barrier()
    ds_comm = sys.modules.get("deepspeed.comm")
    if ds_comm is not None and ds_comm.is_initialized():
        ds_comm.destroy_process_group()  # also drops DeepSpeed's own references to its groups
    else:
        dist.destroy_process_group()
    atexit._run_exitfuncs()  # what normal exit runs before finalization: logging.shutdown, W&B / MLflow finishers, ...
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
