"""LLaVA training end to end on tiny parts: stage 1, stage 2, LoRA + merge, resume; DeepSpeed ZeRO-2 and ZeRO-3
(stages 1 and 2, relaunch from checkpoint-N) on 2 CPU ranks."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from llava_helpers import llava_args, tiny_tower_config
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlavaForConditionalGeneration, set_seed

from llava_uta.model.checkpoint import load_state_dict_file
from llava_uta.model.hf_vision import UTAVisionModel
from llava_uta.model.llava_builder import build_llava
from llava_uta.model.processors import clip_image_processor
from llava_uta.model.projector import load_llava_projector
from llava_uta.train.merge_lora import load_lora_model, merge_lora
from llava_uta.train.train import build_trainer, parse_args, train

ROOT = Path(__file__).resolve().parents[1]
LLAVA_KEYS = {
    "linear": {"model.mm_projector.weight", "model.mm_projector.bias"},
    "mlp2x_gelu": {f"model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")},
}


def _reference(parts, projector: str) -> LlavaForConditionalGeneration:
    """The model a run starts from: same build, same seed."""
    set_seed(42)
    tokenizer = AutoTokenizer.from_pretrained(parts["lm"])
    return build_llava(str(parts["lm"]), str(parts["tower"]), tokenizer, projector)


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.fixture(scope="module")
def parts(llava_parts) -> dict[str, Path]:
    return llava_parts


@pytest.fixture(scope="module")
def stage1(llava_runs) -> Path:
    return llava_runs["stage1"]


@pytest.mark.parametrize("projector", ["linear", "mlp2x_gelu"])
def test_stage1_trains_only_the_projector_and_writes_llava_keys(parts, tmp_path, projector):
    trainer = train(llava_args(parts, tmp_path, stage=1, projector=projector))
    trained, reference = trainer.model, _reference(parts, projector)
    reference_params = dict(reference.named_parameters())
    changed = {n for n, p in trained.named_parameters() if not torch.equal(p, reference_params[n])}
    assert changed and all(n.startswith("model.multi_modal_projector.linear_") for n in changed)
    if projector == "linear":
        assert not any("linear_2" in n for n in changed)  # stays the identity
    state = load_state_dict_file(tmp_path / "mm_projector.bin")
    assert set(state) == LLAVA_KEYS[projector]
    twin = load_file(tmp_path / "mm_projector.safetensors")
    assert all(torch.equal(state[k], twin[k]) for k in state)
    load_llava_projector(reference.model.multi_modal_projector, state, projector)
    features = torch.randn(3, 5, 32)
    with torch.no_grad():
        ours, reloaded = trained.model.multi_modal_projector(features), reference.model.multi_modal_projector(features)
    torch.testing.assert_close(ours, reloaded)
    with pytest.raises(ValueError, match="not a"):
        load_llava_projector(
            reference.model.multi_modal_projector, state, "linear" if projector != "linear" else "mlp2x_gelu"
        )


def test_stage2_learns_keeps_the_tower_and_reloads_in_a_fresh_process(parts, stage1, tmp_path):
    out = tmp_path / "stage2"
    extra = {"pretrain_mm_mlp_adapter": stage1 / "mm_projector.bin", "max_steps": 16, "group_by_modality_length": True}
    trainer = train(llava_args(parts, out, stage=2, **extra))
    losses = _losses(trainer)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.2
    reference = dict(_reference(parts, "mlp2x_gelu").named_parameters())
    for name, param in trainer.model.named_parameters():
        if name.startswith("model.vision_tower."):
            assert torch.equal(param, reference[name]), name
    batch = trainer.data_collator([trainer.train_dataset[i] for i in (0, 24, 1)])  # one text-only sample
    torch.save(dict(batch), tmp_path / "batch.pt")
    with torch.no_grad():
        expected = trainer.model.eval()(**batch).logits
    script = textwrap.dedent(f"""
        import torch, llava_uta.model
        from transformers import AutoProcessor, LlavaForConditionalGeneration
        model = LlavaForConditionalGeneration.from_pretrained({str(out)!r}).eval()
        processor = AutoProcessor.from_pretrained({str(out)!r})
        assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id
        with torch.no_grad():
            logits = model(**torch.load({str(tmp_path / "batch.pt")!r})).logits
        torch.save(logits, {str(tmp_path / "fresh.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    torch.testing.assert_close(torch.load(tmp_path / "fresh.pt"), expected, atol=1e-6, rtol=1e-6)


def _drop_path_tower(root: Path) -> Path:
    """A tiny tower folder configured with drop-path (a student's drop_path_rate)."""
    config = tiny_tower_config()
    config.drop_path_rate = 0.1
    tower_dir = root / "tower"
    UTAVisionModel(config).save_pretrained(tower_dir)
    clip_image_processor(32).save_pretrained(tower_dir)
    return tower_dir


def test_a_frozen_tower_with_drop_path_runs_in_eval_mode_in_every_training_step(parts, tmp_path):
    """The Trainer puts the whole model in train mode before its steps: a frozen tower configured with drop-path (a
    student's drop_path_rate) must still compute its features in eval mode, deterministically, in every step."""
    tower_dir = _drop_path_tower(tmp_path)
    trainer = build_trainer(*parse_args(llava_args({**parts, "tower": tower_dir}, tmp_path / "run", stage=2,
                                                   max_steps=3)))
    tower = trainer.model.model.vision_tower
    assert tower.vit.blocks[1].drop_path1.drop_prob > 0  # the tower does have drop-path to switch on
    modes = []
    tower.register_forward_hook(lambda module, args, out: modes.append([m.training for m in module.modules()]))
    trainer.train()
    assert len(modes) == 3 and not any(any(step) for step in modes)
    assert trainer.model.model.multi_modal_projector.training  # the rest of the model did train


def test_text_only_batches_still_run_the_projector(parts, stage1, tmp_path):
    trainer = train(llava_args(parts, tmp_path, stage=2, max_steps=1))
    model = trainer.model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in (24, 25)])
    assert "pixel_values" not in batch
    trainer.compute_loss(model, batch).backward()
    projector_grads = [p.grad for p in model.model.multi_modal_projector.parameters()]
    assert all(g is not None and not g.any() for g in projector_grads)  # in the graph, but contributes nothing
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_lora_save_load_merge_gives_the_unmerged_outputs(parts, stage1, tmp_path):
    out = tmp_path / "lora"
    extra = {
        "pretrain_mm_mlp_adapter": stage1 / "mm_projector.safetensors",
        "lora_enable": True,
        "lora_r": 4,
        "lora_alpha": 8,
        "mm_projector_lr": 1e-3,
        "learning_rate": 1e-2,
    }
    trainer = train(llava_args(parts, out, stage=2, **extra))
    assert {"adapter_model.safetensors", "adapter_config.json", "non_lora_trainables.safetensors"} <= set(
        os.listdir(out)
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in (0, 1, 30)])
    with torch.no_grad():
        trained = trainer.model.eval()(**batch).logits
        reloaded = load_lora_model(out).eval()(**batch).logits
        merge_lora(out, tmp_path / "merged")
        merged = LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()(**batch).logits
    torch.testing.assert_close(reloaded, trained, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(merged, trained, atol=1e-5, rtol=1e-5)
    base = _reference(parts, "mlp2x_gelu").eval()
    with torch.no_grad():
        assert not torch.allclose(base(**batch).logits, trained, atol=1e-3)  # the adapter did change the model


def _group_lr(trainer, param) -> float:
    return next(g["initial_lr"] for g in trainer.optimizer.param_groups if any(p is param for p in g["params"]))


@pytest.mark.parametrize("lora", [False, True])
def test_unfrozen_tower_trains_at_its_own_lr_and_is_saved(parts, stage1, tmp_path, lora):
    """--unfreeze_mm_vision_tower (LLaVA-NeXT): the tower trains at --mm_vision_tower_lr and the saved model (the
    full folder, or with LoRA the non-LoRA weights beside the adapter) holds the trained tower."""
    out = tmp_path / "stage2"
    extra = {"pretrain_mm_mlp_adapter": stage1 / "mm_projector.bin", "unfreeze_mm_vision_tower": True,
             "mm_vision_tower_lr": 3e-3, "mm_projector_lr": 2e-3, "learning_rate": 1e-3}
    if lora:
        extra |= {"lora_enable": True, "lora_r": 4, "lora_alpha": 8}
    trainer = train(llava_args(parts, out, stage=2, **extra))
    model = trainer.model
    llava = model.get_base_model() if lora else model
    reference = dict(_reference(parts, "mlp2x_gelu").named_parameters())
    tower = dict(llava.model.vision_tower.named_parameters())
    changed = [n for n, p in tower.items() if not torch.equal(p, reference[f"model.vision_tower.{n}"])]
    assert changed and all(p.requires_grad for p in tower.values())
    assert {_group_lr(trainer, p) for p in tower.values()} == {3e-3}
    assert {_group_lr(trainer, p) for p in llava.model.multi_modal_projector.parameters()} == {2e-3}
    assert _group_lr(trainer, model.lm_head.weight if not lora else next(
        p for n, p in model.named_parameters() if "lora_A" in n)) == 1e-3
    batch = trainer.data_collator([trainer.train_dataset[i] for i in (0, 1)])
    with torch.no_grad():
        trained = model.eval()(**batch).logits
        if lora:
            assert any(k.startswith("model.vision_tower.") for k in load_file(out / "non_lora_trainables.safetensors"))
            reloaded = load_lora_model(out).eval()(**batch).logits
        else:
            reloaded = LlavaForConditionalGeneration.from_pretrained(out).eval()(**batch).logits
    torch.testing.assert_close(reloaded, trained, atol=1e-6, rtol=1e-6)


def test_own_learning_rates_that_would_be_ignored_are_errors(tmp_path):
    """A DeepSpeed config with an optimizer section gets one flat parameter list from the Trainer: the projector's
    and tower's own learning rates would be silently ignored, so that pairing is an error naming the file; so is a
    tower learning rate for a frozen tower."""
    from llava_uta.train.train import parse_args

    base = ["--model_name_or_path", "lm", "--data_path", "d.json", "--output_dir", str(tmp_path)]
    offload = str(ROOT / "scripts" / "zero3_offload.json")
    for flag in ("--mm_projector_lr", "--mm_vision_tower_lr"):
        with pytest.raises(ValueError, match=rf"zero3_offload.json defines its own optimizer.*{flag}"):
            parse_args([*base, "--deepspeed", offload, flag, "1e-4"])
    for config in ("zero2.json", "zero3.json"):  # the Trainer builds the optimizer: the rates apply
        assert "optimizer" not in json.loads((ROOT / "scripts" / config).read_text())
    with pytest.raises(ValueError, match="the tower is frozen: add --unfreeze_mm_vision_tower True"):
        parse_args([*base, "--mm_vision_tower_lr", "1e-4"])


def test_resume_from_checkpoint_matches_an_uninterrupted_run(parts, tmp_path):
    full = train(llava_args(parts, tmp_path / "full", stage=2, save_strategy="steps", save_steps=2))
    assert {"checkpoint-2", "checkpoint-4"} <= set(os.listdir(tmp_path / "full"))
    resumed = train(
        llava_args(parts, tmp_path / "resumed", stage=2, resume_from_checkpoint=tmp_path / "full" / "checkpoint-2")
    )
    assert resumed.state.global_step == 4
    ours = dict(resumed.model.named_parameters())
    for name, param in full.model.named_parameters():
        torch.testing.assert_close(ours[name], param, atol=1e-6, rtol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deepspeed(target: list[str], args: list[str]) -> None:
    """Launch on 2 CPU ranks as the docs do; target: ["--module", "llava_uta.train"] or a script and its flags."""
    launcher = Path(sys.executable).parent / "deepspeed"
    port = _free_port()
    command = [str(launcher), "--num_gpus", "2", "--master_port", str(port), *target, *args]
    env = {**os.environ, "PATH": f"{launcher.parent}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # DeepSpeed's shared-memory all-reduce buffers (one per rank) must not outlive the run
    left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
    assert not left, f"the run left {[p.name for p in left]} in /dev/shm"


def _trainer_state(out: Path) -> tuple[int, list[float]]:
    state = json.loads((out / "trainer_state.json").read_text())
    return state["global_step"], [entry["loss"] for entry in state["log_history"] if "loss" in entry]


@pytest.mark.slow
@pytest.mark.deepspeed
def test_deepspeed_zero2_on_two_cpu_ranks(parts, stage1, tmp_path):
    """Two ranks really share the data: 32 samples / (4 per rank x 2 ranks) = 4 steps for one epoch; the tower
    trains there too (--unfreeze_mm_vision_tower, whose last block is unused at select layer -2)."""
    out = tmp_path / "ds"
    args = llava_args(
        parts, out, stage=2, pretrain_mm_mlp_adapter=stage1 / "mm_projector.bin", group_by_modality_length=True,
        unfreeze_mm_vision_tower=True, mm_vision_tower_lr=1e-3,
    )
    args = [a for a in args if not a.startswith("--max_steps")] + [
        "--num_train_epochs=1",
        "--deepspeed=scripts/zero2.json",
    ]
    _deepspeed(["--module", "llava_uta.train"], args)
    steps, losses = _trainer_state(out)
    assert steps == 4
    assert len(losses) == 4 and all(loss == loss for loss in losses)
    model = LlavaForConditionalGeneration.from_pretrained(out)
    assert model.config.mm_projector_type == "mlp2x_gelu"
    reference = _reference(parts, "mlp2x_gelu").state_dict()
    tower = {f"model.vision_tower.{k}": v for k, v in model.model.vision_tower.state_dict().items()}
    assert any(not torch.equal(v, reference[k]) for k, v in tower.items())


# one rank of a DeepSpeed run: the frozen tower's modes in every training forward, and the engine that ran them
FROZEN_TOWER_RANK = """
import argparse, json
import torch.distributed as dist
from llava_uta.distributed import end_process_group
from llava_uta.train.train import build_trainer, parse_args
parser = argparse.ArgumentParser()
parser.add_argument("--record_dir", required=True)
args, train_argv = parser.parse_known_args()  # the launcher's --local_rank goes on to the training arguments
trainer = build_trainer(*parse_args(train_argv))
modes = []
trainer.model.model.vision_tower.register_forward_hook(
    lambda module, args, out: modes.append([m.training for m in module.modules()]))
trainer.train()
record = {"modes": modes, "engine": type(trainer.model_wrapped).__name__,
          "projector_training": trainer.model.model.multi_modal_projector.training}
with open(f"{args.record_dir}/modes-{dist.get_rank()}.json", "w") as f:
    json.dump(record, f)
end_process_group()
"""


@pytest.mark.slow
@pytest.mark.deepspeed
def test_a_frozen_tower_stays_in_eval_mode_under_a_deepspeed_engine(parts, tmp_path):
    """The drop-path test above, on two CPU ranks with ZeRO-2: the engine's own train() must not wake the tower."""
    script = tmp_path / "rank.py"
    script.write_text(FROZEN_TOWER_RANK)
    args = llava_args({**parts, "tower": _drop_path_tower(tmp_path)}, tmp_path / "run", stage=2, max_steps=3,
                      deepspeed="scripts/zero2.json")
    _deepspeed([str(script), f"--record_dir={tmp_path}"], args)
    for rank in (0, 1):
        record = json.loads((tmp_path / f"modes-{rank}.json").read_text())
        assert record["engine"] == "DeepSpeedEngine" and record["projector_training"]
        assert len(record["modes"]) == 3 and not any(any(step) for step in record["modes"])


ZERO3 = "scripts/zero3.json"


def _train_and_record(out: Path, args: list[str]) -> Path:
    """Train on 2 ranks; out/record.safetensors: a batch and the logits the trained in-memory model gave on it."""
    _deepspeed(["tests/train_and_record.py", f"--record={out / 'record.safetensors'}"], args)
    return out


def _recorded_logits(out: Path, model) -> tuple[torch.Tensor, torch.Tensor]:
    """(the recorded logits of the trained in-memory model, the logits `model` gives on the recorded batch)."""
    record = load_file(out / "record.safetensors")
    expected = record.pop("logits")
    with torch.no_grad():
        return expected, model.eval()(**record).logits


def _zero3_stage2_args(parts, out: Path, stage1_out: Path) -> list[str]:
    """4 steps (one epoch on 2 ranks) from the ZeRO-3 stage-1 projector, checkpoint-2 and checkpoint-4 on the way."""
    adapter = stage1_out / "mm_projector.bin"
    extra = {"save_strategy": "steps", "save_steps": 2, "group_by_modality_length": True}
    return llava_args(parts, out, stage=2, deepspeed=ZERO3, pretrain_mm_mlp_adapter=adapter, **extra)


@pytest.fixture(scope="module")
def zero3_stage1(parts) -> Path:
    out = parts["root"] / "zero3_stage1"
    return _train_and_record(out, llava_args(parts, out, stage=1, deepspeed=ZERO3))


@pytest.fixture(scope="module")
def zero3_stage2(parts, zero3_stage1) -> Path:
    out = parts["root"] / "zero3_stage2"
    return _train_and_record(out, _zero3_stage2_args(parts, out, zero3_stage1))


@pytest.mark.slow
@pytest.mark.deepspeed
def test_deepspeed_zero3_stage1_saves_the_trained_projector(parts, zero3_stage1):
    """Under ZeRO-3 every weight is partitioned; mm_projector.bin must hold the full trained projector."""
    _, losses = _trainer_state(zero3_stage1)
    assert len(losses) == 4 and losses[-1] < losses[0]
    model = _reference(parts, "mlp2x_gelu")
    state = load_state_dict_file(zero3_stage1 / "mm_projector.bin")
    assert set(state) == LLAVA_KEYS["mlp2x_gelu"]
    load_llava_projector(model.model.multi_modal_projector, state, "mlp2x_gelu")
    expected, reloaded = _recorded_logits(zero3_stage1, model)  # the LM and the tower are the untouched originals
    torch.testing.assert_close(reloaded, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.deepspeed
def test_deepspeed_zero3_stage2_saves_full_weights(zero3_stage2):
    steps, losses = _trainer_state(zero3_stage2)
    assert steps == 4 and losses[-1] < losses[0] - 0.1
    model = LlavaForConditionalGeneration.from_pretrained(zero3_stage2)
    expected, reloaded = _recorded_logits(zero3_stage2, model)
    torch.testing.assert_close(reloaded, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.deepspeed
def test_deepspeed_zero3_relaunch_resumes_from_the_last_checkpoint(parts, zero3_stage1, zero3_stage2, tmp_path):
    """A run killed after checkpoint-2, relaunched unchanged, ends where the uninterrupted run ended."""
    out = tmp_path / "relaunched"
    shutil.copytree(zero3_stage2 / "checkpoint-2", out / "checkpoint-2")  # what the killed run left behind
    args = _zero3_stage2_args(parts, out, zero3_stage1)
    _deepspeed(["--module", "llava_uta.train"], args)
    (steps, losses), (_, full_losses) = _trainer_state(out), _trainer_state(zero3_stage2)
    assert steps == 4
    torch.testing.assert_close(losses[-2:], full_losses[-2:], atol=1e-5, rtol=1e-5)
    ours, full = load_file(out / "model.safetensors"), load_file(zero3_stage2 / "model.safetensors")
    assert set(ours) == set(full)
    for name, tensor in full.items():
        torch.testing.assert_close(ours[name], tensor, atol=1e-6, rtol=1e-5, msg=name)
