"""Contrastive fine-tuning (llava-uta-finetune-clip): global-batch loss, accumulation, fixed temperature, layer decay,
exact resume, the released-layout output and clear errors."""

import io
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import open_clip
import pytest
import torch
from run_helpers import kill_when_written
from tolerances import assert_close_to_scale, grads
from transformers import HfArgumentParser

from llava_uta.eval.zeroshot import main as zeroshot_main
from llava_uta.model.checkpoint import CheckpointError, load_state_dict_file, save_uta_vit
from llava_uta.model.convert import convert
from llava_uta.model.hf_vision import UTAVisionModel
from llava_uta.model.official import load_official_checkpoint
from llava_uta.model.uta_vit import build_uta_vit
from pretrain.caption_data import caption_source
from pretrain.finetune_clip import CLIPFinetuner, FinetuneArguments
from pretrain.train_clip import save_local_dir

TEACHER_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tiny_world) -> Path:
    return tiny_world


@pytest.fixture(scope="module")
def towers(tmp_path_factory) -> dict[str, Path]:
    """A tiny teacher CLIP (local-dir, 4 text heads of 8 channels) and a UTA student of the same embedding width."""
    root = tmp_path_factory.mktemp("towers")
    torch.manual_seed(0)
    save_local_dir(open_clip.CLIP(**TEACHER_CFG), TEACHER_CFG, root / "teacher")
    save_uta_vit(build_uta_vit("uta_test_p8_32"), root / "student.safetensors")
    return {"teacher": root / "teacher", "student": root / "student.safetensors"}


def finetune_args(world: Path, towers: dict, out: Path, **overrides) -> FinetuneArguments:
    args = dict(train_data=str(world / "clip/captions.csv"), output_dir=str(out), init=str(towers["student"]),
                text_model=f"open_clip:local-dir:{towers['teacher']}", max_steps=4, batch_size=16, micro_batch_size=8,
                lr=1e-3, warmup_steps=1, workers=0, save_every=100, log_every=1)
    args.update(overrides)
    return FinetuneArguments(**args)


def cli_flags(args: FinetuneArguments) -> list[str]:
    keys = ("train_data", "output_dir", "init", "text_model", "max_steps", "batch_size", "micro_batch_size", "lr",
            "warmup_steps", "workers", "save_every", "log_every", "drop_path")
    return [part for key in keys for part in (f"--{key}", str(getattr(args, key)))]


@pytest.mark.parametrize("drop_path", [0.0, 0.2])
def test_accumulated_gradient_is_the_full_batch_gradient(world, towers, tmp_path, drop_path):
    """Feature caching over 2 micro-batches gives the gradient of the loss over the 16 features the two grad-enabled
    forwards compute (with drop path, the cached pass replays the same masks); without drop path that is the
    full-batch gradient."""
    trainer = CLIPFinetuner(finetune_args(world, towers, tmp_path / "accum", drop_path=drop_path))
    images, tokens = next(iter(trainer.loader(0, 0)))
    images2, tokens2 = next(iter(trainer.loader(1, 0)))
    batch = (torch.cat([images, images2]), torch.cat([tokens, tokens2]))
    model = trainer.model.train()

    torch.manual_seed(7)
    if drop_path:
        parts = [model(images, tokens), model(images2, tokens2)]
        reference = trainer.loss(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    else:
        reference = trainer.loss(*model(*batch)[:2])
    reference.backward()
    expected = grads(model)
    model.zero_grad(set_to_none=True)

    torch.manual_seed(7)
    loss = trainer.train_step([(images, tokens), (images2, tokens2)])
    got = grads(model)
    assert loss == pytest.approx(reference.item(), abs=1e-5)
    assert "visual.blocks.0.attn.q_proj.weight" in got
    assert_close_to_scale(expected, got, rel=1e-5)  # sums over 16 features in another order (see tolerances.py)
    assert "logit_scale" not in got  # the temperature is not trained


def test_temperature_stays_fixed_and_the_output_loads_everywhere(world, towers, tmp_path):
    args = finetune_args(world, towers, tmp_path / "run", eval_data=str(world / "zeroshot/val"),
                         eval_classnames=str(world / "zeroshot/classnames.json"),
                         eval_templates=str(world / "zeroshot/templates.json"), eval_every=2)
    trainer = CLIPFinetuner(args)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    summary = trainer.train()
    after = trainer.model.state_dict()
    assert after["logit_scale"].item() == pytest.approx(math.log(100)) == before["logit_scale"].item()
    assert not torch.equal(before["visual.head.weight"], after["visual.head.weight"])
    assert not torch.equal(before["text.text_projection"], after["text.text_projection"])
    assert {"zeroshot_before", "zeroshot"} <= summary.keys() and 0 <= summary["zeroshot"]["top1"] <= 1
    log = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4] and [r["step"] for r in log if "eval" in r] == [2, 4]

    out = tmp_path / "run/uta_clip.safetensors"
    state = load_state_dict_file(out)
    assert state["logit_scale"].item() == pytest.approx(math.log(100))
    released = load_official_checkpoint(out)  # text heads (4, not the released 64-channel default) from metadata
    assert released.text.heads == 4
    tokens = trainer.tokenizer(["a red square", "three blue circles"])
    images = torch.randn(2, 3, 32, 32)
    model = trainer.model.eval()
    with torch.no_grad():
        assert torch.allclose(released.encode_text(tokens), model.encode_text(tokens), atol=1e-5)
        assert torch.allclose(released.encode_image(images), model.encode_image(images), atol=1e-5)

    results = tmp_path / "zeroshot.json"
    zeroshot_main(["--model", f"uta:{out}", "--imagenet", str(world / "zeroshot/val"),
                   "--classnames", str(world / "zeroshot/classnames.json"), "--templates",
                   str(world / "zeroshot/templates.json"), "--out", str(results), "--workers", "0"])
    assert json.loads(results.read_text())["classification"]["top1"] == pytest.approx(summary["zeroshot"]["top1"])
    tower = UTAVisionModel.from_pretrained(convert(out, tmp_path / "tower"))
    with torch.no_grad():
        assert torch.allclose(tower.vit.encode_image(images), model.encode_image(images), atol=1e-5)


def test_layer_decay_scales_follow_timm(world, towers, tmp_path):
    """Image tower: lr x 0.75^(depth+1-layer), embeddings at layer 0 and norm/head at the top; text tower: lr x 1."""
    trainer = CLIPFinetuner(finetune_args(world, towers, tmp_path / "decay", layer_decay=0.75, max_steps=10,
                                          warmup_steps=2))
    trainer.scheduler.step_update(5)
    base = trainer.optimizer.param_groups[-1]["lr"]
    depth = trainer.model.visual.cfg.depth
    lr_of = {id(p): group["lr"] for group in trainer.optimizer.param_groups for p in group["params"]}
    for name, param in trainer.model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("text."):
            layer = depth + 1
        elif name.startswith(("visual.patch_embed", "visual.cls_token", "visual.pos_embed")):
            layer = 0
        elif name.startswith("visual.blocks."):
            layer = int(name.split(".")[2]) + 1
        else:
            layer = depth + 1
        assert lr_of[id(param)] == pytest.approx(base * 0.75 ** (depth + 1 - layer)), name
    assert id(trainer.model.logit_scale) not in lr_of
    wd_of = {id(p): group["weight_decay"] for group in trainer.optimizer.param_groups for p in group["params"]}
    assert wd_of[id(trainer.model.visual.pos_embed)] == 0 and wd_of[id(trainer.model.text.positional_embedding)] == 0
    assert wd_of[id(trainer.model.visual.blocks[0].attn.q_proj.weight)] == 0.05


def test_locked_text_tower_is_not_trained(world, towers, tmp_path):
    trainer = CLIPFinetuner(finetune_args(world, towers, tmp_path / "lit", lock_text=True, max_steps=2))
    before = {k: v.clone() for k, v in trainer.model.text.state_dict().items()}
    trainer.train()
    assert all(torch.equal(v, trainer.model.text.state_dict()[k]) for k, v in before.items())


@pytest.mark.slow
def test_two_ranks_gather_the_global_batch_like_one_process(world, towers, tmp_path):
    """2 CPU ranks x micro-batch 8 (features gathered across ranks) follow 1 process x 2 cached micro-batches."""
    CLIPFinetuner(finetune_args(world, towers, tmp_path / "single")).train()
    ranks = finetune_args(world, towers, tmp_path / "ranks")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
                    "-m", "pretrain.finetune_clip", *cli_flags(ranks)], env=env, cwd=REPO, check=True, timeout=600,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
              for run in ("single", "ranks")]
    assert len(losses[0]) == len(losses[1]) == 4
    assert losses[1][0] == pytest.approx(losses[0][0], abs=1e-5)
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    single, two = (load_state_dict_file(tmp_path / run / "uta_clip.safetensors") for run in ("single", "ranks"))
    for key, value in single.items():
        assert torch.allclose(value, two[key], atol=1e-5), key


def test_a_run_resumed_from_a_step_checkpoint_ends_with_the_same_weights(world, towers, tmp_path):
    """The fast tier's exact resume: a copied step checkpoint (drop path on) resumes in-process, bit for bit."""
    recipe = dict(max_steps=4, save_every=2, drop_path=0.1)
    CLIPFinetuner(finetune_args(world, towers, tmp_path / "straight", **recipe)).train()
    shutil.copytree(tmp_path / "straight/checkpoints/step_00000002", tmp_path / "resumed/checkpoints/step_00000002")
    CLIPFinetuner(finetune_args(world, towers, tmp_path / "resumed", resume=True, **recipe)).train()
    expected = load_state_dict_file(tmp_path / "straight/uta_clip.safetensors")
    got = load_state_dict_file(tmp_path / "resumed/uta_clip.safetensors")
    for key, value in expected.items():
        assert torch.equal(value, got[key]), key


@pytest.mark.slow
def test_killed_and_resumed_run_ends_with_the_same_weights(world, towers, tmp_path):
    CLIPFinetuner(finetune_args(world, towers, tmp_path / "straight", max_steps=8, save_every=2,
                                drop_path=0.1)).train()
    resumed = finetune_args(world, towers, tmp_path / "resumed", max_steps=8, save_every=2, drop_path=0.1)
    checkpoint = tmp_path / "resumed/checkpoints/step_00000002"
    kill_when_written("pretrain.finetune_clip", cli_flags(resumed), checkpoint)
    assert checkpoint.is_dir() and not (tmp_path / "resumed/uta_clip.safetensors").exists()  # killed mid-run
    resumed.resume = True
    CLIPFinetuner(resumed).train()
    expected = load_state_dict_file(tmp_path / "straight/uta_clip.safetensors")
    got = load_state_dict_file(tmp_path / "resumed/uta_clip.safetensors")
    for key, value in expected.items():
        assert torch.equal(value, got[key]), key


def test_bad_inputs_are_named(world, towers, tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(towers["student"].read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated.safetensors"):
        CLIPFinetuner(finetune_args(world, towers, tmp_path / "a", init=str(truncated)))
    wrong = tmp_path / "wrong.pt"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(CheckpointError, match="wrong.pt"):
        CLIPFinetuner(finetune_args(world, towers, tmp_path / "b", init=str(wrong)))
    with pytest.raises(ValueError, match="--text_model"):
        CLIPFinetuner(finetune_args(world, towers, tmp_path / "c", text_model=None))

    rows = (world / "clip/captions.csv").read_text().splitlines()
    csv = tmp_path / "missing.csv"
    csv.write_text("\n".join([rows[0], "clip/nowhere.png,a red square", *rows[1:]]) + "\n")
    (tmp_path / "clip").symlink_to(world / "clip")
    trainer = CLIPFinetuner(finetune_args(world, towers, tmp_path / "d", train_data=str(csv)))
    with pytest.raises(FileNotFoundError, match=r"missing.csv: row 2 names .*nowhere.png"):
        [trainer.dataset[i] for i in range(len(trainer.dataset))]


def test_webdataset_shards_pair_images_with_captions(world, tmp_path):
    """Members sharing a key form a sample; a sample without a .txt caption is skipped."""
    pngs = sorted((world / "clip").rglob("*.png"))[:3]
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, png in enumerate(pngs):
            members = [(f"s{i:03d}.png", png.read_bytes())]
            if i != 1:
                members.append((f"s{i:03d}.txt", f"caption {i}\n".encode()))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    source = caption_source(tmp_path / "shard-*.tar")
    assert len(source) == 2
    assert [source[i][1] for i in range(2)] == ["caption 0", "caption 2"]
    assert source[1][0].size == (32, 32)
    with pytest.raises(FileNotFoundError, match="expected an open_clip CSV"):
        caption_source(tmp_path / "nothing-here")



@pytest.mark.parametrize(("script", "lr", "layer_decay"), [("finetune_clip_b.sh", 2e-4, 0.75),
                                                            ("finetune_clip_l.sh", 4e-4, 0.85)])
def test_recipe_scripts_pass_the_paper_card_to_the_cli(tmp_path, script, lr, layer_decay):
    """The scripts run under a stand-in `deepspeed` that records its arguments; every flag must parse."""
    fake = tmp_path / "bin/deepspeed"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/argv\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "HOSTFILE": "/etc/hostfile"}
    subprocess.run(["bash", str(REPO / "scripts" / script), "--max_steps", "7"], env=env, check=True, timeout=60)
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv[:4] == ["--hostfile", "/etc/hostfile", "--module", "pretrain.finetune_clip"]
    (args,) = HfArgumentParser(FinetuneArguments).parse_args_into_dataclasses(args=argv[4:])
    assert (args.lr, args.layer_decay, args.optimizer, args.batch_size) == (lr, layer_decay, "lamb", 49152)
    assert (args.logit_scale, args.weight_decay, args.min_lr, args.max_steps) == (100.0, 0.05, 0.0, 7)
    assert args.bf16 and args.resume
