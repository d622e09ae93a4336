"""A UTA checkpoint at another input size (224 -> 336 in the paper; 32 -> 48 px here): load, convert, export."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from transformers import AutoImageProcessor, AutoModel

from llava_uta.model.checkpoint import load_uta_vit, save_uta_vit
from llava_uta.model.convert import main as convert_main
from llava_uta.model.llava_builder import num_image_tokens
from llava_uta.model.official import build_official_visual, load_official_visual
from llava_uta.model.uta_vit import UTAViT, build_uta_vit


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A 32 px / patch-8 student (4x4 grid) trained with drop-path, saved as pre-training writes it."""
    torch.manual_seed(0)
    vit = build_uta_vit("uta_test_p8_32", drop_path_rate=0.1)
    path = tmp_path_factory.mktemp("student") / "student.safetensors"
    save_uta_vit(vit, path)
    return path


def test_position_embedding_is_resampled_by_timm_and_rope_rebuilt_for_the_new_grid(student):
    trained = load_uta_vit(student)
    resized = load_uta_vit(student, img_size=48)
    assert resized.cfg.img_size == 48 and resized.cfg.grid_size == 6 and resized.patch_embed.img_size == (48, 48)
    expected = resample_abs_pos_embed(trained.pos_embed.detach(), new_size=(6, 6), num_prefix_tokens=1)
    torch.testing.assert_close(resized.pos_embed.detach(), expected, rtol=0, atol=0)
    torch.testing.assert_close(resized.pos_embed[:, :1], trained.pos_embed[:, :1], rtol=0, atol=0)  # CLS row kept
    fresh = UTAViT(resized.cfg)  # what timm's Eva builds at 48 px: 6x6 grid on the same 16-grid reference
    torch.testing.assert_close(resized.rope.get_embed(), fresh.rope.get_embed(), rtol=0, atol=0)
    assert resized.rope.get_embed().shape == (36, 2 * trained.cfg.head_dim)
    trained_sd, resized_sd = trained.state_dict(), resized.state_dict()
    assert all(torch.equal(trained_sd[k], resized_sd[k]) for k in trained_sd if k != "pos_embed")
    out = resized.eval()(torch.randn(2, 3, 48, 48))
    assert out.features.shape == (2, 1 + 36, 32)


def test_same_size_is_the_identity(student, official_checkpoint):
    plain, same = load_uta_vit(student).state_dict(), load_uta_vit(student, img_size=32).state_dict()
    assert plain.keys() == same.keys() and all(torch.equal(plain[k], same[k]) for k in plain)
    plain, same = load_official_visual(official_checkpoint).state_dict(), load_official_visual(
        official_checkpoint, img_size=32).state_dict()
    assert all(torch.equal(plain[k], same[k]) for k in plain)


def test_bad_sizes_are_refused(student):
    with pytest.raises(ValueError, match="not a multiple of patch_size 8"):
        load_uta_vit(student, img_size=50)
    with pytest.raises(ValueError, match="positive"):
        load_uta_vit(student, img_size=0)
    with pytest.raises(SystemExit):
        convert_main(["--from-open-clip", "open_clip:local-dir:x", "out", "--image-size", "48"])


def test_student_converts_to_a_48px_tower_without_drop_path(student, tmp_path):
    convert_main([str(student), str(tmp_path / "tower"), "--image-size", "48"])
    config = json.loads((tmp_path / "tower" / "config.json").read_text())
    assert config["image_size"] == 48 and config["patch_size"] == 8 and config["drop_path_rate"] == 0.0
    processor = AutoImageProcessor.from_pretrained(tmp_path / "tower")
    assert processor.size == {"shortest_edge": 48} and processor.crop_size == {"height": 48, "width": 48}
    tower = AutoModel.from_pretrained(tmp_path / "tower").eval()
    assert num_image_tokens(tower.config, "default") == 36
    pixels = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        out = tower(pixels)
        reference = load_uta_vit(student, img_size=48).eval()(pixels)
    assert out.hidden_states[-2].shape == (2, 1 + 36, 32)
    torch.testing.assert_close(out.pooler_output, reference.features[:, 0])


def test_released_checkpoint_converts_and_exports_at_48px(official_checkpoint, tmp_path):
    convert_main([str(official_checkpoint), str(tmp_path / "tower"), "--image-size", "48"])
    assert json.loads((tmp_path / "tower" / "config.json").read_text())["image_size"] == 48
    convert_main([str(official_checkpoint), str(tmp_path / "uta48.safetensors"), "--to", "official",
                  "--image-size", "48"])
    exported = load_file(tmp_path / "uta48.safetensors")  # visual.* only (no --text-model): build the tower from it
    visual = {k.removeprefix("visual."): v for k, v in exported.items() if k.startswith("visual.")}
    reloaded = build_official_visual(visual, "uta48").eval()  # strict; its RoPE tables are checked at 6x6
    resized = load_official_visual(official_checkpoint, img_size=48)
    assert reloaded.cfg == resized.cfg
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encode_image(x), resized.encode_image(x))
        tower = AutoModel.from_pretrained(tmp_path / "tower").eval()
        torch.testing.assert_close(tower(x).pooler_output, resized.encode_image(x))
