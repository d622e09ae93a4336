"""The end of a distributed run: every rank leaves the process group in order, before the interpreter exits.

Why the order matters (gloo, i.e. CPU ranks): a collective is run by one of gloo's worker threads, which lets go of
the collective's tensors only after marking it complete, so possibly after `work.wait()` has returned. A
tensor that carries Python attributes (DeepSpeed's ZeRO parameters and buffers do) keeps its Python object alive
while C++ holds it, and that last release then takes the GIL from the worker thread. If the main thread has already
begun finalizing the interpreter, CPython ends the worker thread inside torch's (noexcept) tensor destructor and the
process aborts: "terminate called without an active exception", SIGABRT, after all outputs were written (the
DeepSpeed launcher then exits with 250). `torch.distributed.destroy_process_group()` alone does not prevent it: the
groups and their worker threads stay alive as long as anything (DeepSpeed's engine, its ZeRO parameters) refers to
them, i.e. until the interpreter exits.
"""

from __future__ import annotations

import sys

import torch.distributed as dist


def end_process_group() -> None:
    """Wait for every rank, then destroy the process group (through DeepSpeed when DeepSpeed started it).

    The barrier returns once every earlier collective of every rank has completed; while this thread waits for it,
    with the GIL released, the worker threads release those collectives' tensors (the barrier call itself first
    waits for a release in progress: gloo releases under the work-queue lock that every new collective takes). No
    rank leaves while another still communicates with it. Nothing to do in a process without a group.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    ds_comm = sys.modules.get("deepspeed.comm")
    if ds_comm is not None and ds_comm.is_initialized():
        ds_comm.destroy_process_group()  # also drops DeepSpeed's own references to its groups
    else:
        dist.destroy_process_group()
