"""The end of a distributed run (llava_uta.distributed): ranks leave their gloo process group without aborting."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llava_uta.distributed import end_process_group

REPO = Path(__file__).resolve().parents[1]

# One rank as DeepSpeed leaves it at the end of training: it keeps a reference to its group (DeepSpeed's engine and
# ZeRO parameters do), and gloo's worker threads still hold the last collectives' tensors, which carry Python
# attributes as ZeRO's do. (The handles are dropped unwaited here, which makes the teardown race of a real run
# likely instead of rare.)
RANK_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    from llava_uta.distributed import end_process_group

    dist.init_process_group("gloo")
    kept = dist.group.WORLD
    for i in range(16):
        part = torch.full((1 << 16,), float(dist.get_rank()))
        full = torch.empty((1 << 16) * dist.get_world_size())
        part.ds_id = full.ds_id = i
        dist.all_gather_into_tensor(full, part, async_op=True)
    del part, full
    if sys.argv[1] == "end_process_group":
        end_process_group()
    else:
        dist.destroy_process_group()
""")


def _launch_two_ranks(script: Path, teardown: str) -> list[tuple[int, str]]:
    """(exit code, output) of each of two gloo ranks running `script teardown`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        procs.append(subprocess.Popen([sys.executable, str(script), teardown], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return [(p.wait(timeout=300), p.stdout.read()) for p in procs]


# One rank that writes output right before it leaves: a log record to a file, unflushed stdout, and an atexit handler
# (how W&B and MLflow finish a run opened through --report_to).
LAST_WORDS_SCRIPT = textwrap.dedent("""
    import atexit, logging, sys
    from pathlib import Path
    import torch.distributed as dist
    from llava_uta.distributed import end_process_group

    out = Path(sys.argv[1])
    logging.basicConfig(filename=out / "run.log", level=logging.INFO)
    dist.init_process_group("gloo")
    atexit.register(lambda: (out / "finished").write_text("run finished"))
    logging.getLogger("run").info("last record")
    print("last line, unflushed", end="")
    end_process_group(3)
    print("never printed")
""")


def test_a_rank_leaving_keeps_its_last_output_and_runs_the_exit_handlers(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(LAST_WORDS_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "last line, unflushed"
    assert "last record" in (tmp_path / "run.log").read_text()
    assert (tmp_path / "finished").read_text() == "run finished"


def test_end_process_group_without_a_group_does_nothing():
    end_process_group()  # a single process (the quickstart runs the trainers in-process): no group, no error


@pytest.mark.slow
def test_ranks_exit_cleanly_with_collectives_still_being_released(tmp_path):
    """With destroy_process_group alone, about half of such rank pairs abort at exit: a gloo worker thread releasing
    a tensor asks for the GIL while the interpreter finalizes, and CPython ends the thread inside a noexcept C++
    destructor ("terminate called without an active exception", SIGABRT)."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    for launch in range(4):
        for rank, (code, output) in enumerate(_launch_two_ranks(script, "end_process_group")):
            assert code == 0 and "terminate called" not in output, f"launch {launch} rank {rank}: {code}\n{output}"
