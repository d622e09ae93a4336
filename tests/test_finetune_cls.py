"""Classification fine-tuning (llava-uta-finetune-cls): init vs random init, layer decay, ranks, exact resume, the
output through timm, the recipe scripts and clear errors."""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from run_helpers import kill_when_written
from transformers import HfArgumentParser

import llava_uta.model  # noqa: F401  (registers the UTA configs with timm)
from llava_uta.data.image_folder import ImageDataError
from llava_uta.data.shapes.scene import COLORS, render, sample_scene
from llava_uta.model.checkpoint import load_state_dict_file, load_uta_vit
from pretrain.finetune_cls import ClassificationFinetuner, FinetuneClsArguments

REPO = Path(__file__).resolve().parents[1]
SHAPES = ("circle", "square", "triangle", "cross")


@pytest.fixture(scope="module")
def shape_folders(tmp_path_factory) -> Path:
    """An ImageFolder train/val pair of 32 px ShapesWorld images with one object each; the class is its shape."""
    root = tmp_path_factory.mktemp("shapes_cls")
    rng = random.Random(0)
    for split, n in (("train", 24), ("val", 10)):
        for shape in SHAPES:
            (root / split / shape).mkdir(parents=True)
            for k in range(n):
                render(sample_scene(rng, 32, num_objects=1, shape=shape)).save(root / split / shape / f"{k}.png")
    return root


@pytest.fixture(scope="module")
def colour_folders(tmp_path_factory) -> Path:
    """An ImageFolder train/val pair of noisy solid-colour 32 px images, four classes."""
    root = tmp_path_factory.mktemp("colours_cls")
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 10)):
        for name in ("red", "green", "blue", "yellow"):
            (root / split / name).mkdir(parents=True)
            for k in range(n):
                pixels = np.clip(np.array(COLORS[name]) + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{k}.png")
    return root


def cls_args(data: Path, out: Path, **overrides) -> FinetuneClsArguments:
    args = dict(train_data=str(data / "train"), val_data=str(data / "val"), output_dir=str(out),
                model="uta_test_p8_32", max_steps=4, batch_size=16, micro_batch_size=8, lr=1e-3, warmup_steps=1,
                workers=0, save_every=100, log_every=1, eval_batch_size=16)
    args.update(overrides)
    return FinetuneClsArguments(**args)


def cli_flags(args: FinetuneClsArguments) -> list[str]:
    keys = ("train_data", "val_data", "output_dir", "model", "max_steps", "batch_size", "micro_batch_size", "lr",
            "warmup_steps", "workers", "save_every", "log_every", "eval_batch_size", "drop_path", "mixup", "cutmix",
            "auto_augment", "model_ema_decay")
    value = lambda key: "none" if getattr(args, key) is None else str(getattr(args, key))  # auto_augment off
    flags = [part for key in keys for part in (f"--{key}", value(key))]
    return flags + (["--model_ema"] if args.model_ema else [])


def test_a_trained_init_beats_its_random_init_twin(colour_folders, tmp_path):
    """--init's weights, head included, are what a run starts from: after two steps at a negligible lr, the run from
    a tower fine-tuned on the task classifies, its random-init twin does not. (Random towers read colour linearly,
    so any real budget lets the twin catch up on this task; shape, which they do not read, a tiny ViT does not
    learn in a test's budget. The quickstart measures pre-training against random init at a real budget.)"""
    recipe = dict(auto_augment="none", drop_path=0.0, smoothing=0.0)
    first = ClassificationFinetuner(cls_args(colour_folders, tmp_path / "first", max_steps=20, lr=2e-3,
                                             warmup_steps=2, **recipe)).train()
    assert first["val"]["top1"] >= 0.9
    budget = dict(max_steps=2, lr=1e-9, warmup_steps=0, seed=1, **recipe)
    init = str(tmp_path / "first/model.safetensors")
    second = ClassificationFinetuner(cls_args(colour_folders, tmp_path / "second", init=init, model=None,
                                              **budget)).train()
    twin = ClassificationFinetuner(cls_args(colour_folders, tmp_path / "twin", **budget)).train()
    assert second["val"]["top1"] >= 0.9 and twin["val"]["top1"] <= 0.6, (second["val"], twin["val"])


def test_layer_decay_scales_follow_eva02(shape_folders, tmp_path):
    """lr x 0.7^(depth+1-layer): embeddings at layer 0, block i at i+1, final norm and head at depth+1; no weight
    decay on biases, norms, position embedding and CLS token."""
    trainer = ClassificationFinetuner(cls_args(shape_folders, tmp_path / "decay", layer_decay=0.7, max_steps=10,
                                               warmup_steps=2))
    trainer.scheduler.step_update(5)
    depth = trainer.model.cfg.depth
    lr_of = {id(p): g["lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in trainer.optimizer.param_groups for p in g["params"]}
    base = lr_of[id(trainer.model.head.weight)]
    for name, param in trainer.model.named_parameters():
        if name.startswith(("patch_embed", "cls_token", "pos_embed")):
            layer = 0
        elif name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        else:
            layer = depth + 1
        assert lr_of[id(param)] == pytest.approx(base * 0.7 ** (depth + 1 - layer)), name
        no_decay = param.ndim <= 1 or name in ("pos_embed", "cls_token")
        assert wd_of[id(param)] == (0.0 if no_decay else 0.05), name
    assert len(lr_of) == sum(1 for _ in trainer.model.parameters())


@pytest.mark.slow
def test_two_ranks_follow_one_process_with_accumulation(shape_folders, tmp_path):
    """2 CPU ranks x micro-batch 8 (DDP) and 1 process x 2 accumulated micro-batches: the same losses and weights."""
    ClassificationFinetuner(cls_args(shape_folders, tmp_path / "single", drop_path=0.0)).train()
    ranks = cls_args(shape_folders, tmp_path / "ranks", drop_path=0.0)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29543",
                    "-m", "pretrain.finetune_cls", *cli_flags(ranks)], env=env, cwd=REPO, check=True, timeout=600,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    losses = [[r["loss"] for r in map(json.loads, (tmp_path / run / "log.jsonl").read_text().splitlines())
               if "loss" in r] for run in ("single", "ranks")]
    assert len(losses[0]) == len(losses[1]) == 4
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    single, two = (load_state_dict_file(tmp_path / run / "model.safetensors") for run in ("single", "ranks"))
    for key, value in single.items():
        assert torch.allclose(value, two[key], atol=1e-5), key
    summaries = [json.loads((tmp_path / run / "summary.json").read_text()) for run in ("single", "ranks")]
    assert summaries[0]["val"] == pytest.approx(summaries[1]["val"])  # the val split evaluated across ranks


def test_a_run_resumed_from_a_step_checkpoint_ends_with_the_same_weights(shape_folders, tmp_path):
    """The fast tier's exact resume (in-process, no data workers): a copied step checkpoint with mixup, cutmix, drop
    path and EMA resumes to the uninterrupted run's weights and EMA."""
    recipe = dict(max_steps=4, save_every=2, drop_path=0.1, mixup=0.8, cutmix=1.0, model_ema=True,
                  model_ema_decay=0.9)
    ClassificationFinetuner(cls_args(shape_folders, tmp_path / "straight", **recipe)).train()
    shutil.copytree(tmp_path / "straight/checkpoints/step_00000002", tmp_path / "resumed/checkpoints/step_00000002")
    ClassificationFinetuner(cls_args(shape_folders, tmp_path / "resumed", resume=True, **recipe)).train()
    for name in ("model.safetensors", "ema.safetensors"):
        expected = load_state_dict_file(tmp_path / "straight" / name)
        got = load_state_dict_file(tmp_path / "resumed" / name)
        for key, value in expected.items():
            assert torch.equal(value, got[key]), (name, key)


@pytest.mark.slow
def test_killed_and_resumed_run_ends_with_the_same_weights(shape_folders, tmp_path):
    """RandAugment, mixup + cutmix, drop path, EMA and two data workers: a SIGKILLed run resumes exactly."""
    recipe = dict(max_steps=6, save_every=2, drop_path=0.1, mixup=0.8, cutmix=1.0, model_ema=True,
                  model_ema_decay=0.9, workers=2)
    ClassificationFinetuner(cls_args(shape_folders, tmp_path / "straight", **recipe)).train()
    resumed = cls_args(shape_folders, tmp_path / "resumed", **recipe)
    checkpoint = tmp_path / "resumed/checkpoints/step_00000002"
    kill_when_written("pretrain.finetune_cls", cli_flags(resumed), checkpoint)
    assert checkpoint.is_dir() and not (tmp_path / "resumed/model.safetensors").exists()  # killed mid-run
    resumed.resume = True
    ClassificationFinetuner(resumed).train()
    for name in ("model.safetensors", "ema.safetensors"):
        expected = load_state_dict_file(tmp_path / "straight" / name)
        got = load_state_dict_file(tmp_path / "resumed" / name)
        for key, value in expected.items():
            assert torch.equal(value, got[key]), (name, key)


def test_output_loads_through_timm_and_as_a_student(shape_folders, tmp_path):
    summary = ClassificationFinetuner(cls_args(shape_folders, tmp_path / "run", image_size=48)).train()
    out = tmp_path / "run/model.safetensors"
    classes = json.loads((tmp_path / "run/classes.json").read_text())
    assert classes == sorted(SHAPES)
    model = timm.create_model("uta_test_p8_32", pretrained=True, num_classes=4, global_pool="avg", img_size=48,
                              pretrained_cfg_overlay=dict(file=str(out), num_classes=4)).eval()
    student = load_uta_vit(out).eval()
    assert student.cfg.out_dim == 4 and student.cfg.img_size == 48
    trainer = ClassificationFinetuner(cls_args(shape_folders, tmp_path / "eval", init=str(out), model=None))
    trainer.model.eval()
    images = torch.stack([trainer.val_folder[i][0] for i in range(len(trainer.val_folder))])
    with torch.no_grad():
        logits = model(images)
        assert torch.allclose(logits, trainer.model(images), atol=1e-5)  # --init keeps a head of the same shape
    targets = torch.tensor(trainer.val_folder.targets)
    assert (logits.argmax(-1) == targets).float().mean().item() == pytest.approx(summary["val"]["top1"])


def test_bad_inputs_are_named(shape_folders, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(shape_folders, root)
    (root / "train" / "star").mkdir()
    with pytest.raises(ImageDataError, match=r"no images: .*train/star"):
        ClassificationFinetuner(cls_args(root, tmp_path / "a"))
    (root / "train" / "star").rmdir()
    (root / "train" / "cross" / "broken.png").write_bytes(b"not a png")
    trainer = ClassificationFinetuner(cls_args(root, tmp_path / "b"))
    with pytest.raises(ImageDataError, match=r"train/cross/broken.png: unreadable image"):
        [trainer.dataset[i] for i in range(len(trainer.dataset))]
    with pytest.raises(ValueError, match="not a UTA ViT config"):
        cls_args(root, tmp_path / "c", model="vit_base_patch16_224")
    with pytest.raises(ValueError, match="--model"):
        cls_args(root, tmp_path / "d", model=None)


@pytest.mark.parametrize("script,lr,layer_decay,drop_path,smoothing", [
    ("finetune_cls_b.sh", 1e-4, 0.7, 0.1, 0.1),
    ("finetune_cls_l.sh", 5e-5, 0.8, 0.15, 0.2),
])
def test_recipe_scripts_pass_eva02s_recipe_to_the_cli(tmp_path, script, lr, layer_decay, drop_path, smoothing):
    """The scripts run under a stand-in `deepspeed` that records its arguments; every flag must parse."""
    fake = tmp_path / "bin/deepspeed"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/argv\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "HOSTFILE": "/etc/hostfile"}
    subprocess.run(["bash", str(REPO / "scripts" / script), "--max_steps", "7"], env=env, check=True, timeout=60)
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv[:4] == ["--hostfile", "/etc/hostfile", "--module", "pretrain.finetune_cls"]
    (args,) = HfArgumentParser(FinetuneClsArguments).parse_args_into_dataclasses(args=argv[4:])
    assert (args.lr, args.layer_decay, args.drop_path, args.smoothing) == (lr, layer_decay, drop_path, smoothing)
    assert (args.image_size, args.batch_size, args.epochs, args.warmup_epochs) == (448, 1024, 30, 3)
    assert (args.auto_augment, args.mixup, args.cutmix, args.weight_decay) == ("rand-m9-mstd0.5-inc1", 0, 0, 0.05)
    assert args.model_ema and args.bf16 and args.resume and args.max_steps == 7
