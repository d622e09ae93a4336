"""The UTA ViT configs as timm models (llava_uta.model.timm_models): create_model, weight files, feature maps."""

from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys

import pytest
import timm
import torch
from open_clip.timm_model import TimmModel
from open_clip.transformer import TextTransformer
from safetensors.torch import save_file

import llava_uta.model.timm_models  # noqa: F401  (registers the configs; llava_uta.model does too)
from llava_uta.model.checkpoint import CheckpointError, resize_uta_vit, save_uta_vit, student_config_path
from llava_uta.model.official import export_official
from llava_uta.model.uta_vit import UTA_VIT_CONFIGS, UTAViT

TINY = "uta_tiny_p8_64"
NAMES = ["uta_test_p8_32", TINY]


class Opaque:
    """Not a tensor: torch.load(weights_only=True) refuses to unpickle it."""


def _images(size: int, batch: int = 2, chans: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, chans, size, size, generator=torch.Generator().manual_seed(seed))


def _grid_maps(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, 1+N, C) tokens -> (B, C, grid, grid) patch maps, CLS dropped."""
    return tokens[:, 1:].reshape(tokens.shape[0], grid, grid, -1).permute(0, 3, 1, 2)


def _released(model: UTAViT) -> dict[str, torch.Tensor]:
    """The released layout (visual.*, text.*, logit_scale) of a UTAViT, with a tiny text tower."""
    text = TextTransformer(context_length=8, vocab_size=64, width=32, heads=2, layers=1, output_dim=model.cfg.out_dim)
    return export_official(model, text)


def _write(path, state: dict[str, torch.Tensor]):
    save_file(state, path) if path.suffix == ".safetensors" else torch.save(state, path)
    return path


def _create(name: str = TINY, file=None, **kwargs) -> UTAViT:
    if file is not None:
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(file)))
    return timm.create_model(name, **kwargs).eval()


def _assert_same_outputs(model: UTAViT, ref: UTAViT, size: int) -> None:
    """timm's forward is UTAViT.encode_image; forward_features is norm(tokens) of the UTA forward."""
    x = _images(size)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), ref.norm(ref.forward_blocks(x)[0]))
        assert torch.equal(model(x), ref.encode_image(x))


@pytest.fixture(scope="module")
def source() -> UTAViT:
    torch.manual_seed(0)
    return UTAViT(UTA_VIT_CONFIGS[TINY]).eval()


def test_every_config_is_registered():
    assert set(timm.list_models(module="timm_models")) == set(UTA_VIT_CONFIGS)  # (other tests register uta_test_eva*)
    for name, cfg in UTA_VIT_CONFIGS.items():
        pretrained_cfg = timm.get_pretrained_cfg(name)
        assert pretrained_cfg.input_size == (cfg.in_chans, cfg.img_size, cfg.img_size)
        assert pretrained_cfg.num_classes == cfg.out_dim and not pretrained_cfg.has_weights
    with pytest.raises(RuntimeError, match="No pretrained weights"):
        timm.create_model(TINY, pretrained=True)


def test_importing_the_model_package_registers_without_a_cycle():
    code = "import llava_uta.model, timm; assert timm.is_model('uta_b16_224') and timm.is_model('uta_test_p8_32')"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)


@pytest.mark.parametrize("name", NAMES)
def test_create_model_is_the_uta_vit(name):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    cfg = UTA_VIT_CONFIGS[name]
    ref = UTAViT(cfg).eval()
    ref.load_state_dict(model.state_dict(), strict=True)
    assert isinstance(model, UTAViT) and model.cfg == cfg
    _assert_same_outputs(model, ref, cfg.img_size)
    x, keep = _images(cfg.img_size), torch.stack([torch.randperm(cfg.num_patches)[:5] for _ in range(2)])
    with torch.no_grad():  # the UTA keep-indices forward is still there
        assert torch.equal(UTAViT.forward(model, x, keep).features, ref(x, keep).features)


def test_model_keywords_map_onto_the_config():
    base = UTA_VIT_CONFIGS["uta_test_p8_32"]
    model = _create("uta_test_p8_32", num_classes=16, in_chans=1, img_size=48, drop_path_rate=0.1, depth=3)
    cfg = dataclasses.replace(base, out_dim=16, in_chans=1, img_size=48, drop_path_rate=0.1, depth=3)
    assert model.cfg == cfg and len(model.blocks) == 3
    assert torch.equal(model.rope.get_embed(), UTAViT(cfg).rope.get_embed())  # RoPE built for the 6x6 grid
    assert torch.equal(model.rope.get_embed(), resize_uta_vit(UTAViT(base), 48).rope.get_embed())
    with torch.no_grad():
        assert model(_images(48, chans=1)).shape == (2, 16)
    with pytest.raises(ValueError, match="square"):
        timm.create_model("uta_test_p8_32", img_size=(32, 48))
    with pytest.raises(TypeError, match="unsupported keyword"):
        timm.create_model("uta_test_p8_32", patch_drop_rate=0.5)


@pytest.mark.parametrize("with_json", [True, False])
def test_pretrained_student_file(source, tmp_path, with_json):
    path = tmp_path / "student.safetensors"
    save_uta_vit(source, path)
    if not with_json:
        student_config_path(path).unlink()
    _assert_same_outputs(_create(file=path), source, 64)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin"])
def test_pretrained_released_file(source, tmp_path, suffix):
    path = _write(tmp_path / f"uta{suffix}", _released(source))
    _assert_same_outputs(_create(file=path), source, 64)


def test_pretrained_state_dict_goes_through_the_filter(source):
    model = _create(pretrained=True, pretrained_cfg_overlay=dict(state_dict=_released(source)))
    _assert_same_outputs(model, source, 64)


@pytest.mark.parametrize("layout", ["student", "released"])
def test_pretrained_at_another_image_size(source, tmp_path, layout):
    path = tmp_path / "uta.safetensors"
    save_uta_vit(source, path) if layout == "student" else _write(path, _released(source))
    model = _create(file=path, img_size=96)
    ref = resize_uta_vit(copy.deepcopy(source), 96)
    assert model.cfg == ref.cfg and torch.equal(model.rope.get_embed(), ref.rope.get_embed())
    _assert_same_outputs(model, ref, 96)


def test_pretrained_without_the_head(source, tmp_path):
    """num_classes=0 (as open_clip asks with proj='none'): timm drops the checkpoint's head, the rest loads."""
    path = tmp_path / "student.safetensors"
    save_uta_vit(source, path)
    model = _create(file=path, num_classes=0)
    x = _images(64)
    with torch.no_grad():
        assert torch.equal(model(x), source.forward_features(x)[:, 0])


def _bad_file(case: str, source: UTAViT, tmp_path):
    """A checkpoint that must not load as uta_tiny_p8_64, and the file its error must name."""
    path = tmp_path / ("bad.pt" if case.endswith("_pt") else "bad.safetensors")
    student = {k: v.contiguous() for k, v in source.state_dict().items()}
    if case.startswith("truncated"):
        _write(path, student)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif case == "wrong_keys":  # a student with one official (released) name
        student["blocks.0.mlp.w3.weight"] = student.pop("blocks.0.mlp.fc2.weight")
        _write(path, student)
    elif case == "released_missing_tensor":
        released = _released(source)
        del released["visual.blocks.1.attn.proj.weight"]
        _write(path, released)
    elif case == "other_model":
        save_uta_vit(UTAViT(UTA_VIT_CONFIGS["uta_test_p8_32"]), path)
        student_config_path(path).unlink()
    elif case == "other_heads_json":  # same weight shapes, but the student's config has 8 heads
        save_uta_vit(UTAViT(dataclasses.replace(source.cfg, num_heads=8)), path)
        return path, student_config_path(path)
    elif case == "unsafe_pickle_pt":
        torch.save({"state_dict": student, "extra": Opaque()}, path)
    elif case != "missing":
        raise AssertionError(case)
    return path, path


@pytest.mark.parametrize("case", ["truncated", "truncated_pt", "wrong_keys", "released_missing_tensor", "other_model",
                                  "other_heads_json", "unsafe_pickle_pt", "missing"])
def test_bad_files_raise_naming_the_file(source, tmp_path, case):
    path, named = _bad_file(case, source, tmp_path)
    with pytest.raises(CheckpointError) as info:
        _create(file=path)
    assert str(named) in str(info.value)


@pytest.mark.parametrize("name", NAMES)
def test_features_only(name):
    cfg = UTA_VIT_CONFIGS[name]
    torch.manual_seed(0)
    full = timm.create_model(name).eval()
    grid, x = cfg.grid_size, _images(cfg.img_size)
    with torch.no_grad():
        hidden = full.forward_blocks(x)[1]
    same_weights = dict(pretrained=True, pretrained_cfg_overlay=dict(state_dict=full.state_dict()))
    for out_indices in [(0, cfg.depth - 1), None]:
        kwargs = {} if out_indices is None else dict(out_indices=out_indices)
        backbone = timm.create_model(name, features_only=True, **kwargs, **same_weights).eval()
        taken = out_indices or tuple(range(cfg.depth))[-3:]  # default: the last three blocks
        info = backbone.feature_info
        assert tuple(info.out_indices) == taken and info.channels() == [cfg.width] * len(taken)
        assert info.reduction() == [cfg.patch_size] * len(taken)
        with torch.no_grad():
            maps = backbone(x)
        assert [m.shape for m in maps] == [(2, cfg.width, grid, grid)] * len(taken)
        for m, i in zip(maps, taken, strict=True):
            assert torch.equal(m, _grid_maps(hidden[i + 1], grid))


def test_forward_intermediates(source):
    model = _create(pretrained=True, pretrained_cfg_overlay=dict(state_dict=source.state_dict()))
    x = _images(64)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x, indices=[1, 3])
        hidden = source.forward_blocks(x)[1]
        assert torch.equal(final, source.forward_features(x))
        assert torch.equal(maps[0], _grid_maps(hidden[2], 8)) and torch.equal(maps[1], _grid_maps(hidden[4], 8))
        tokens = model.forward_intermediates(x, indices=1, output_fmt="NLC", intermediates_only=True)
        assert torch.equal(tokens[0], hidden[4][:, 1:])


@pytest.mark.parametrize(("pool", "proj"), [("token", ""), ("avg", "linear")])
def test_open_clip_timm_tower(pool, proj):
    tower = TimmModel(model_name="uta_test_p8_32", embed_dim=32, image_size=32, pool=pool, proj=proj).eval()
    x = _images(32)
    with torch.no_grad():
        out = tower(x)
        assert out.shape == (2, 32) and out.isfinite().all()
        if proj == "":  # the UTA head is the projection into the joint space
            assert torch.equal(out, tower.trunk.encode_image(x))
