"""The frozen CLIP teacher: targets against open_clip's own outputs, for both kinds of vision tower."""

import open_clip
import pytest
import torch
import torch.nn.functional as F

from pretrain.teacher import CLIPTeacher
from pretrain.train_clip import save_local_dir

VIT_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TIMM_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False,
                   "timm_pool": "token", "timm_proj": "linear"},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def vit_clip():
    torch.manual_seed(0)
    return open_clip.CLIP(**VIT_CFG).eval()


def test_vit_targets_match_open_clip(vit_clip):
    teacher = CLIPTeacher(vit_clip.visual)
    images = torch.randn(3, 3, 32, 32)
    targets = teacher(images)
    assert targets.shape == (3, 1 + 16, 32) and targets.dtype == torch.float32
    with torch.no_grad():
        assert torch.allclose(targets[:, 0], vit_clip.encode_image(images), atol=1e-5)
        # by hand: embeddings -> blocks -> ln_post -> proj, for every token
        v = vit_clip.visual
        x = v.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat([v.class_embedding.expand(3, 1, -1), x], dim=1) + v.positional_embedding
        x = v.ln_pre(x)
        for block in v.transformer.resblocks:
            x = block(x)
        expected = v.ln_post(x) @ v.proj
    assert torch.allclose(targets, expected, atol=1e-5)


def test_timm_tower_targets_are_consistent():
    torch.manual_seed(0)
    clip = open_clip.CLIP(**TIMM_CFG).eval()
    teacher = CLIPTeacher(clip.visual)
    assert teacher.grid == (14, 14) and teacher.patch_size == (16, 16)
    images = torch.randn(2, 3, 224, 224)
    targets = teacher(images)
    assert targets.shape == (2, 1 + 196, 32)
    with torch.no_grad():
        assert torch.allclose(targets[:, 0], clip.encode_image(images), atol=1e-5)
        trunk = clip.visual.trunk
        tokens = trunk.forward_features(images)  # final norm applied
        assert torch.allclose(targets[:, 1:], clip.visual.head(trunk.head(tokens[:, 1:])), atol=1e-5)


def test_teacher_is_frozen(vit_clip):
    teacher = CLIPTeacher(vit_clip.visual)
    teacher.train()
    assert not teacher.training and not teacher.visual.training
    assert all(not p.requires_grad for p in teacher.parameters())
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    assert not teacher(x).requires_grad


def test_grid_alignment(vit_clip):
    teacher = CLIPTeacher(vit_clip.visual)
    same_grid = teacher(F.interpolate(torch.randn(2, 3, 32, 32), size=48), student_grid=(4, 4))
    assert same_grid.shape == (2, 17, 32)  # resized to the teacher's 32 px input: positions correspond
    with pytest.raises(ValueError, match="teacher token grid 4x4"):
        teacher(torch.randn(1, 3, 32, 32), student_grid=(6, 6))


def test_from_pretrained_local_dir_and_precision(vit_clip, tmp_path):
    save_local_dir(vit_clip, VIT_CFG, tmp_path / "teacher")
    teacher = CLIPTeacher.from_pretrained(f"open_clip:local-dir:{tmp_path / 'teacher'}")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher(images)[:, 0], vit_clip.encode_image(images), atol=1e-5)
    bf16 = CLIPTeacher.from_pretrained(f"open_clip:local-dir:{tmp_path / 'teacher'}", precision="bf16")
    assert next(bf16.parameters()).dtype == torch.bfloat16
    assert F.cosine_similarity(bf16(images), teacher(images), dim=-1).min() > 0.98
    with pytest.raises(ValueError, match="precision"):
        CLIPTeacher.from_pretrained("open_clip:local-dir:x", precision="int3")


def test_clip_batches_are_whole_groups():
    from pretrain.train_clip import sample_batch

    idx = sample_batch(400, 32, 4, torch.Generator().manual_seed(0))
    assert idx.shape == (32,) and idx.max() < 400
    groups = idx.view(8, 4)
    assert (groups[:, 0] % 4 == 0).all() and (groups.diff(dim=1) == 1).all()
    with pytest.raises(ValueError, match="multiple of the group size"):
        sample_batch(400, 30, 4, torch.Generator())


@pytest.mark.slow
def test_compiled_teacher_gives_the_eager_targets(vit_clip):
    teacher = CLIPTeacher(vit_clip.visual)
    images = torch.randn(4, 3, 48, 48)  # resized to the 32 px input first, outside the compiled graph
    eager = teacher(images, student_grid=(4, 4))
    teacher.compile_encoder()
    compiled = teacher(images, student_grid=(4, 4))
    assert compiled.shape == eager.shape == (4, 17, 32) and compiled.dtype == torch.float32
    assert torch.allclose(compiled, eager, atol=1e-5)
    assert not compiled.requires_grad
