"""SIGTERM / SIGUSR1 mid-run: the step finishes, a checkpoint is written, the tool exits with status 75, and a rerun
resumes exactly. In-process (the signal raised from inside a step) in the fast tier; real signals to a child
process in the slow tier."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from llava_helpers import llava_args
from run_helpers import cli_flags, engine_args

from llava_uta.model.checkpoint import load_state_dict_file
from llava_uta.preemption import PREEMPTED_EXIT, Preempted
from llava_uta.train.train import train
from pretrain.engine import Pretrainer

REPO = Path(__file__).resolve().parents[1]


def signal_after_step(cls, method: str, at_step: int, sig: int, monkeypatch) -> None:
    """Make `cls.method` (an optimizer step) deliver `sig` to this process once step `at_step` is done."""
    original = getattr(cls, method)

    def step(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if getattr(self, "step", None) == at_step - 1:  # the loop counts the step right after this call
            signal.raise_signal(sig)
        return out

    monkeypatch.setattr(cls, method, step)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signalled_pretraining_run_checkpoints_its_step_and_resumes_exactly(sig, tiny_world, teacher_dir, tmp_path,
                                                                                monkeypatch):
    Pretrainer(engine_args(tiny_world, teacher_dir, tmp_path / "straight", max_steps=6, save_every=100)).train()
    handler = signal.getsignal(sig)
    with monkeypatch.context() as patch:
        signal_after_step(Pretrainer, "optimizer_step", 3, sig, patch)
        with pytest.raises(Preempted, match="after step 3") as stopped:
            Pretrainer(engine_args(tiny_world, teacher_dir, tmp_path / "run", max_steps=6, save_every=100)).train()
    assert Path(stopped.value.checkpoint).name == "step_00000003" and Path(stopped.value.checkpoint).is_dir()
    assert not (tmp_path / "run" / "student.safetensors").exists()
    assert signal.getsignal(sig) == handler  # the process's own handler is back once training ends
    resumed = Pretrainer(engine_args(tiny_world, teacher_dir, tmp_path / "run", max_steps=6, save_every=100,
                                     resume=True)).train()
    assert resumed["steps"] == 6
    expected = load_state_dict_file(tmp_path / "straight" / "student.safetensors")
    got = load_state_dict_file(tmp_path / "run" / "student.safetensors")
    assert all(torch.equal(value, got[key]) for key, value in expected.items())


def test_a_signalled_llava_run_saves_a_checkpoint_and_resumes_exactly(llava_parts, tmp_path, monkeypatch):
    from transformers import Trainer

    full = train(llava_args(llava_parts, tmp_path / "full", stage=2))
    original = Trainer.training_step
    calls = []

    def step(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGTERM)
        return out

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "training_step", step)
        with pytest.raises(Preempted, match="after step 2"):
            train(llava_args(llava_parts, tmp_path / "run", stage=2))
    assert (tmp_path / "run" / "checkpoint-2" / "trainer_state.json").is_file()
    assert not (tmp_path / "run" / "model.safetensors").exists()  # no final output: the run is not done
    resumed = train(llava_args(llava_parts, tmp_path / "run", stage=2))  # the newest complete checkpoint
    assert resumed.state.global_step == 4
    ours = dict(resumed.model.named_parameters())
    for name, param in full.model.named_parameters():
        torch.testing.assert_close(ours[name], param, atol=1e-6, rtol=1e-5)


def _run_until_signalled(command: list[str], ready: Path, sig: int, timeout: float = 300) -> int:
    """Start `command`, send `sig` once `ready` exists, return its exit status."""
    proc = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not ready.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    return proc.wait(timeout=timeout)


@pytest.mark.slow
def test_uta_pretrain_exits_75_on_sigterm_and_resumes_exactly(tiny_world, teacher_dir, tmp_path):
    Pretrainer(engine_args(tiny_world, teacher_dir, tmp_path / "straight", max_steps=40, save_every=2)).train()
    args = engine_args(tiny_world, teacher_dir, tmp_path / "run", max_steps=40, save_every=2)
    status = _run_until_signalled([sys.executable, "-m", "pretrain.train", *cli_flags(args)],
                                  tmp_path / "run" / "checkpoints" / "step_00000002", signal.SIGTERM)
    assert status == PREEMPTED_EXIT and not (tmp_path / "run" / "student.safetensors").exists()
    args.resume = True
    Pretrainer(args).train()
    expected = load_state_dict_file(tmp_path / "straight" / "student.safetensors")
    got = load_state_dict_file(tmp_path / "run" / "student.safetensors")
    assert all(torch.equal(value, got[key]) for key, value in expected.items())


@pytest.mark.slow
def test_llava_uta_train_exits_75_on_sigusr1_with_a_checkpoint(llava_parts, tmp_path):
    args = llava_args(llava_parts, tmp_path / "run", stage=2, max_steps=200, save_strategy="steps", save_steps=1)
    status = _run_until_signalled([sys.executable, "-m", "llava_uta.train", *args],
                                  tmp_path / "run" / "checkpoint-1" / "trainer_state.json", signal.SIGUSR1)
    assert status == PREEMPTED_EXIT
    steps = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "run").glob("checkpoint-*"))
    assert steps and steps[-1] < 200 and (tmp_path / "run" / f"checkpoint-{steps[-1]}" / "trainer_state.json").is_file()
    assert not (tmp_path / "run" / "model.safetensors").exists()
