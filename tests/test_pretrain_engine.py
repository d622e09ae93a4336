"""The UTA pre-training engine: objectives, what a step touches, exact resume, DeepSpeed ranks."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from run_helpers import cli_flags, engine_args, kill_when_written
from timm.layers import drop_path
from transformers import HfArgumentParser

import pretrain.engine
from llava_uta.model.checkpoint import load_state_dict_file
from llava_uta.model.uta_vit import build_uta_vit
from pretrain.engine import PretrainArguments, Pretrainer
from pretrain.loop import load_rng_state, save_rng_state
from pretrain.objectives import cosine_alignment, gather_patches, masked_indices, objective_loss
from pretrain.teacher_cache import decode_targets, encode_targets

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tiny_world) -> Path:
    return tiny_world


def test_alignment_is_minus_one_when_the_student_reproduces_the_teacher():
    torch.manual_seed(0)
    student = build_uta_vit("uta_test_p8_32").eval()
    images = torch.randn(2, 3, 32, 32)
    keep = torch.tensor([[0, 3, 5, 6, 9, 10, 12, 15], [1, 2, 4, 7, 8, 11, 13, 14]])
    with torch.no_grad():
        pred = student(images, keep_indices=keep).features
        targets = torch.randn(2, 17, 32)  # the teacher agrees with the student exactly where the student looks
        targets[:, 0] = pred[:, 0]
        targets[:, 1:].scatter_(1, keep.unsqueeze(-1).expand(-1, -1, 32), pred[:, 1:])
        loss, stats = objective_loss("uta", student, images, targets, keep)
    assert loss.item() == pytest.approx(-1.0, abs=1e-5)
    assert stats["cos_cls"] == pytest.approx(1.0, abs=1e-5) and stats["cos_patch"] == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(gather_patches(targets, keep), pred[:, 1:])
    masked_idx, masked = masked_indices(keep, 16)
    assert masked_idx.shape == (2, 8) and not (masked.gather(1, keep)).any() and masked.gather(1, masked_idx).all()


def test_cls_weight_and_objectives():
    cls_p, cls_t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])  # cos 0
    patch = torch.ones(1, 3, 2)  # cos 1
    plain, _ = cosine_alignment(cls_p, cls_t, patch, patch, None)
    assert plain.item() == pytest.approx(-3 / 4)  # one mean over CLS + 3 patches
    weighted, _ = cosine_alignment(cls_p, cls_t, patch, patch, 0.5)
    assert weighted.item() == pytest.approx(-0.5)
    torch.manual_seed(0)
    student = build_uta_vit("uta_test_p8_32", use_mask_token=True)
    images, targets = torch.randn(2, 3, 32, 32), torch.randn(2, 17, 32)
    keep = torch.arange(8).repeat(2, 1)
    for objective in ("uta", "mim", "fd", "cls"):
        loss, stats = objective_loss(objective, student, images, targets, keep)
        loss.backward()
        assert -1 <= loss.item() <= 1
        assert student.patch_embed.proj.weight.grad is not None
        assert (student.mask_token.grad is not None) == (objective == "mim")
        student.zero_grad(set_to_none=True)
    assert set(objective_loss("fd", student, images, targets, keep)[1]) == {"cos_cls", "cos_patch"}


def test_a_step_trains_the_student_only(world, teacher_dir, tmp_path):
    trainer = Pretrainer(engine_args(world, teacher_dir, tmp_path / "run", max_steps=2))
    teacher_before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    summary = trainer.train()
    assert summary["steps"] == 2
    assert all(torch.equal(v, trainer.teacher.state_dict()[k]) for k, v in teacher_before.items())
    changed = [k for k, v in student_before.items() if not torch.equal(v, trainer.student.state_dict()[k])]
    assert "head.weight" in changed and "patch_embed.proj.weight" in changed
    saved = load_state_dict_file(tmp_path / "run/student.safetensors")
    assert torch.equal(saved["head.weight"], trainer.student.state_dict()["head.weight"])
    log = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and {"loss", "cos_cls", "cos_patch", "lr", "grad_norm"} <= set(log[0])
    assert list((tmp_path / "run/tensorboard").glob("events.out.tfevents.*"))


def test_a_run_resumed_from_a_step_checkpoint_ends_with_the_same_weights(world, teacher_dir, tmp_path):
    """The fast tier's exact resume: a copy of a step checkpoint (weights, optimizer, RNG, data position) resumes
    in-process to the uninterrupted run's weights, bit for bit."""
    straight = engine_args(world, teacher_dir, tmp_path / "straight", max_steps=6, save_every=2)
    Pretrainer(straight).train()
    shutil.copytree(tmp_path / "straight/checkpoints/step_00000002", tmp_path / "resumed/checkpoints/step_00000002")
    resumed = engine_args(world, teacher_dir, tmp_path / "resumed", max_steps=6, save_every=2, resume=True)
    assert Pretrainer(resumed).train()["steps"] == 6
    expected = load_state_dict_file(tmp_path / "straight/student.safetensors")
    got = load_state_dict_file(tmp_path / "resumed/student.safetensors")
    for key, value in expected.items():
        assert torch.equal(value, got[key]), key


@pytest.mark.slow
def test_killed_and_resumed_run_ends_with_the_same_weights(world, teacher_dir, tmp_path):
    straight = engine_args(world, teacher_dir, tmp_path / "straight", max_steps=8, save_every=2)
    Pretrainer(straight).train()

    resumed = engine_args(world, teacher_dir, tmp_path / "resumed", max_steps=8, save_every=2)
    checkpoint = tmp_path / "resumed/checkpoints/step_00000002"
    kill_when_written("pretrain.train", cli_flags(resumed), checkpoint, timeout=120)
    assert checkpoint.is_dir() and not (tmp_path / "resumed/student.safetensors").exists()  # killed mid-run
    resumed.resume = True
    trainer = Pretrainer(resumed)
    trainer.train()
    expected = load_state_dict_file(tmp_path / "straight/student.safetensors")
    got = load_state_dict_file(tmp_path / "resumed/student.safetensors")
    for key, value in expected.items():
        assert torch.allclose(value, got[key], atol=1e-6), key


def test_rng_state_file_round_trips(tmp_path):
    torch.manual_seed(123)
    save_rng_state(tmp_path / "rng.pt")
    expected = [torch.rand(8)] + ([torch.rand(8, device="cuda").cpu()] if torch.cuda.is_available() else [])
    torch.manual_seed(7)  # elsewhere in the stream
    load_rng_state(tmp_path / "rng.pt")
    got = [torch.rand(8)] + ([torch.rand(8, device="cuda").cpu()] if torch.cuda.is_available() else [])
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    assert ("cuda" in torch.load(tmp_path / "rng.pt", weights_only=True)) == torch.cuda.is_available()
    with pytest.raises(FileNotFoundError, match="rng_rank1.pt: no RNG state"):
        load_rng_state(tmp_path / "rng_rank1.pt")
    torch.save({"cuda": torch.zeros(3)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt: expected a dict with the CPU RNG state"):
        load_rng_state(tmp_path / "bad.pt")


def test_layer_decay_groups_follow_beit(world, teacher_dir, tmp_path):
    """[MASK] sits with the embeddings (layer 0), block i at layer i+1, the final norm and head at the top (L+1)."""
    trainer = Pretrainer(engine_args(world, teacher_dir, tmp_path / "run", objective="mim", layer_decay=0.5))
    depth, decay = trainer.student.cfg.depth, 0.5
    scale = {id(p): group["lr_scale"] for group in trainer.optimizer.param_groups for p in group["params"]}
    for name, param in trainer.student.named_parameters():
        if name.split(".")[0] in ("cls_token", "pos_embed", "patch_embed", "mask_token"):
            expected = decay ** (depth + 1)
        elif name.startswith("blocks."):
            expected = decay ** (depth - int(name.split(".")[1]))
        else:
            assert name.split(".")[0] in ("norm", "head"), name
            expected = 1.0
        assert scale[id(param)] == pytest.approx(expected), name
    trainer.scheduler.step_update(trainer.warmup)  # the peak: each group gets lr x its scale
    assert sorted({g["lr"] for g in trainer.optimizer.param_groups}) == pytest.approx(
        [1e-3 * decay**k for k in range(depth + 1, -1, -1)])


def test_mim_masks_blocks_by_default_and_min_block_follows_beit(world, teacher_dir, tmp_path):
    parse = lambda *flags: HfArgumentParser(PretrainArguments).parse_args_into_dataclasses(  # noqa: E731
        args=["--data_path", "d", "--output_dir", "o", *flags])[0]
    assert parse("--objective", "mim").masking == "block"  # EVA-02 masks the blocks
    assert parse().masking == "reversed_block" and parse("--objective", "fd").masking == "reversed_block"
    assert parse("--objective", "mim", "--masking", "random").masking == "random"  # explicit wins
    assert parse().min_block is None and parse("--min_block", "3").min_block == 3
    mim = Pretrainer(engine_args(world, teacher_dir, tmp_path / "mim", objective="mim"))
    assert mim.dataset.masks.kind == "block" and mim.dataset.masks.min_block == 1  # 4x4 grid: 16 x 16/196 -> 1
    uta = Pretrainer(engine_args(world, teacher_dir, tmp_path / "uta", min_block=3))
    assert uta.dataset.masks.kind == "reversed_block" and uta.dataset.masks.min_block == 3


def test_a_wall_clock_budget_stops_the_run_and_decays_the_lr_over_time(world, teacher_dir, tmp_path, monkeypatch):
    # the engine's clock advances 0.05 s a reading, so the run's seconds (and its step count) do not depend on how
    # busy the machine is: a loaded CPU made a real 1.5 s budget end after one or two steps
    readings = iter(0.05 * i for i in range(1, 1_000_000))
    monkeypatch.setattr(pretrain.engine.time, "perf_counter", lambda: next(readings))
    trainer = Pretrainer(engine_args(world, teacher_dir, tmp_path / "run", max_steps=10_000, warmup_steps=1,
                                     max_train_seconds=1.5, lr=1e-3, min_lr=1e-5))
    summary = trainer.train()
    log = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert 1 < summary["steps"] < 10_000 and 1.5 <= summary["train_seconds"] < 1.5 + max(r["seconds"] for r in log)
    lrs = [r["lr"] for r in log]
    assert lrs[1] <= 1e-3 and all(a > b for a, b in zip(lrs[1:-1], lrs[2:], strict=True))  # cosine by time
    assert lrs[-1] < 0.3e-3  # it ran over the time, not over the 10,000 steps (by steps it would still be ~1e-3)
    saved = sorted((tmp_path / "run/checkpoints").iterdir())[-1]
    state = torch.load(saved / "state.pt", weights_only=True)
    assert state["step"] == summary["steps"] and state["train_seconds"] == pytest.approx(summary["train_seconds"])


def test_eval_points_spread_over_the_steps_with_seconds_and_student_flop(world, teacher_dir, tmp_path):
    zs = world / "zeroshot"
    trainer = Pretrainer(engine_args(world, teacher_dir, tmp_path / "run", max_steps=6, eval_points=3,
                                     eval_data=str(zs / "val"), eval_classnames=str(zs / "classnames.json"),
                                     eval_templates=str(zs / "templates.json")))
    summary = trainer.train()
    evals = [r for r in map(json.loads, (tmp_path / "run/log.jsonl").read_text().splitlines()) if "eval" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    seconds = [r["train_seconds"] for r in evals]
    assert 0 < seconds[0] < seconds[1] < seconds[2] == pytest.approx(summary["train_seconds"])
    # uta: CLS + the 8 kept patches of the 4x4 grid, 16 images a step
    per_step = trainer.flops_per_token * 16 * trainer.objective.tokens_per_image(8, 16) / 1e12
    assert [r["student_tflop"] for r in evals] == pytest.approx([2 * per_step, 4 * per_step, 6 * per_step])
    assert summary["student_tflop"] == pytest.approx(6 * per_step)
    assert summary["zeroshot"] == evals[-1]["eval"]  # the last point is the final weights' result, not re-run
    state = torch.load(sorted((tmp_path / "run/checkpoints").iterdir())[-1] / "state.pt", weights_only=True)
    assert state["evals_done"] == 3 and state["student_flop"] == pytest.approx(6 * per_step * 1e12)


def test_bad_arguments_are_named(world, teacher_dir, tmp_path):
    with pytest.raises(ValueError, match="--objective"):
        Pretrainer(engine_args(world, teacher_dir, tmp_path, objective="mae"))
    with pytest.raises(ValueError, match="multiple of"):
        Pretrainer(engine_args(world, teacher_dir, tmp_path, batch_size=12))
    with pytest.raises(ValueError, match="teacher token grid 4x4"):
        Pretrainer(engine_args(world, teacher_dir, tmp_path, image_size=48))
    with pytest.raises(FileNotFoundError, match="ImageFolder"):
        Pretrainer(engine_args(world, teacher_dir, tmp_path, data_path=str(tmp_path / "nothing*.tar")))


@pytest.mark.slow
@pytest.mark.deepspeed
def test_two_deepspeed_ranks_follow_one_process(world, teacher_dir, tmp_path):
    """2 CPU ranks (ZeRO-2) with micro-batch 8 see the same global batches as 1 process with accumulation."""
    single = engine_args(world, teacher_dir, tmp_path / "single", drop_path=0.0)
    Pretrainer(single).train()
    ranks = engine_args(world, teacher_dir, tmp_path / "ranks", drop_path=0.0)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    launcher = str(Path(sys.executable).parent / "deepspeed")
    subprocess.run([launcher, "--num_gpus", "2", "--master_port", "29531", "--module", "pretrain.train",
                    *cli_flags(ranks), "--zero_stage", "2"], env=env, cwd=REPO, check=True, timeout=600,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
              for run in ("single", "ranks")]
    assert len(losses[0]) == len(losses[1]) == 4
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)
    assert losses[0][-1] < losses[0][0]


@pytest.mark.slow
@pytest.mark.deepspeed
def test_bf16_deepspeed_ranks_export_fp32_masters_and_keep_their_own_rng(world, teacher_dir, tmp_path):
    """2 CPU ranks, ZeRO-1, --bf16, drop path: fp32 export, per-rank RNG, and an exact 2-rank resume."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    launcher = str(Path(sys.executable).parent / "deepspeed")

    def launch(run: str, port: int, *extra: str) -> None:
        args = engine_args(world, teacher_dir, tmp_path / run, save_every=2)
        subprocess.run([launcher, "--num_gpus", "2", "--master_port", str(port), "--module", "pretrain.train",
                        *cli_flags(args), "--bf16", "--zero_stage", "1", *extra], env=env, cwd=REPO, check=True,
                       timeout=600, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    launch("straight", 29533)
    checkpoints = tmp_path / "straight/checkpoints"
    masters = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints / "step_00000004"), tag="deepspeed")
    module = torch.load(checkpoints / "step_00000004/deepspeed/mp_rank_00_model_states.pt",
                        weights_only=True)["module"]  # the bf16 weights the ranks computed with
    exported = load_state_dict_file(tmp_path / "straight/student.safetensors")
    assert exported.keys() == masters.keys()
    for key, value in exported.items():
        assert value.dtype == torch.float32 and torch.equal(value, masters[key].float()), key
        assert module[key].dtype == torch.bfloat16 and torch.equal(module[key], value.bfloat16()), key
    rounded = [key for key, value in exported.items() if torch.equal(value, value.bfloat16().float())]
    assert "head.weight" not in rounded and "blocks.0.attn.q_proj.weight" not in rounded  # not bf16 copies
    assert torch.equal(load_state_dict_file(checkpoints / "step_00000004/student.safetensors")["head.weight"],
                       exported["head.weight"])

    masks = []
    for rank in (0, 1):  # the drop-path masks each rank draws at step 3
        load_rng_state(checkpoints / f"step_00000002/rng_rank{rank}.pt")
        masks.append(drop_path(torch.ones(64, 1, 1), 0.5, training=True))
    assert not torch.equal(masks[0], masks[1])

    (tmp_path / "resumed/checkpoints").mkdir(parents=True)  # killed after step 2, relaunched on 2 ranks
    shutil.copytree(checkpoints / "step_00000002", tmp_path / "resumed/checkpoints/step_00000002")
    launch("resumed", 29534, "--resume", "True")
    got = load_state_dict_file(tmp_path / "resumed/student.safetensors")
    assert all(torch.equal(value, got[key]) for key, value in exported.items())


def test_teacher_cache_replaces_the_teacher_for_fixed_views(world, teacher_dir, tmp_path):
    cache = tmp_path / "cache"
    trainer = Pretrainer(engine_args(world, teacher_dir, tmp_path / "cached", teacher_cache=str(cache),
                                     cache_views=2, drop_path=0.0))
    shards = sorted(cache.glob("view*_shard*.safetensors"))
    assert [p.name for p in shards] == ["view000_shard00000.safetensors", "view001_shard00000.safetensors"]
    manifest = json.loads((cache / "cache.json").read_text())
    assert manifest["views"] == 2 and manifest["num_images"] == 64
    images, keep, cached = trainer.dataset[5]
    assert cached.dtype == torch.float16 and cached.shape == (17, 32)
    with torch.no_grad():
        expected = trainer.teacher(images[None], trainer.grid)[0]
    assert torch.allclose(cached.float(), expected, atol=2e-3, rtol=2e-3)
    trainer.dataset.set_epoch(3)  # view 3 mod 2 = 1: another crop, its own targets
    assert torch.equal(trainer.dataset[5][2], trainer.dataset.targets.get(1, 5))
    cached_log = trainer.train()

    plain = Pretrainer(engine_args(world, teacher_dir, tmp_path / "plain", drop_path=0.0)).train()
    assert cached_log["final_loss"] == pytest.approx(plain["final_loss"], abs=5e-3)  # epoch 0 = view 0 either way
    stamp = shards[0].stat().st_mtime_ns
    Pretrainer(engine_args(world, teacher_dir, tmp_path / "again", teacher_cache=str(cache), cache_views=2))
    assert shards[0].stat().st_mtime_ns == stamp  # reused, not rebuilt
    with pytest.raises(ValueError, match="caches other targets"):
        Pretrainer(engine_args(world, teacher_dir, tmp_path / "other", teacher_cache=str(cache), cache_views=3))


def test_fp8_cache_stays_within_its_stated_error_of_the_targets():
    """e4m3 with a per-token scale: every value within 2^-4 of itself (plus the subnormal step), cosine > 0.999."""
    targets = torch.randn(6, 17, 64) * torch.logspace(-2, 1, 64)  # channels over three decades
    stored = encode_targets(targets, "fp8")
    assert stored["targets"].dtype == torch.float8_e4m3fn and stored["scales"].shape == (6, 17, 1)
    decoded = decode_targets(stored["targets"], stored["scales"])
    bound = 2**-4 * targets.abs() + 2**-9 * stored["scales"]
    assert ((decoded - targets).abs() <= bound).all()
    assert torch.nn.functional.cosine_similarity(decoded, targets, dim=-1).min() > 0.999
    assert torch.equal(decode_targets(**encode_targets(targets, "fp16")), targets.half())
    with pytest.raises(ValueError, match="encoding"):
        encode_targets(targets, "int4")


def test_fp8_teacher_cache_trains_like_the_fp16_one(world, teacher_dir, tmp_path):
    runs = {e: Pretrainer(engine_args(world, teacher_dir, tmp_path / e, teacher_cache=str(tmp_path / f"c-{e}"),
                                      cache_encoding=e, drop_path=0.0)) for e in ("fp16", "fp8")}
    fp16, fp8 = (runs[e].dataset.targets for e in ("fp16", "fp8"))
    a, b = fp16.get(0, 5).float(), fp8.get(0, 5)
    assert b.dtype == torch.float32 and torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.999
    sizes = {e: sum(p.stat().st_size for p in (tmp_path / f"c-{e}").glob("view*.safetensors")) for e in runs}
    assert sizes["fp8"] < 0.6 * sizes["fp16"]
    losses = {e: runs[e].train()["final_loss"] for e in runs}
    assert losses["fp8"] == pytest.approx(losses["fp16"], abs=2e-3)


@pytest.mark.slow
def test_a_compiled_teacher_trains_like_the_eager_one(world, teacher_dir, tmp_path):
    runs = {compiled: Pretrainer(engine_args(world, teacher_dir, tmp_path / str(compiled), compile_teacher=compiled,
                                             drop_path=0.0)) for compiled in (False, True)}
    assert "encode" in vars(runs[True].teacher) and "encode" not in vars(runs[False].teacher)  # the flag took effect
    losses = {compiled: run.train()["final_loss"] for compiled, run in runs.items()}
    assert losses[True] == pytest.approx(losses[False], abs=1e-4)
