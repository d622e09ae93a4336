"""The one open_clip loader: EVA-CLIP's released key layout (the paper's teacher), and nothing from the network."""

from __future__ import annotations

import json
import socket

import open_clip
import pytest
import torch
from timm.models import register_model
from timm.models.eva import Eva

from llava_uta.model.checkpoint import CheckpointError
from llava_uta.model.openclip_loader import create_openclip, openclip_tokenizer
from pretrain.teacher import CLIPTeacher

# tiny timm EVA trunks (32 px, patch 8) in the two EVA-CLIP generations: EVA-01 (EVA01-g-14-plus, the paper's teacher:
# fused qkv + q/v bias, GELU MLP, no RoPE) and EVA-02 (EVA02-CLIP: separate q/k/v, SwiGLU with an inner LayerNorm,
# a LayerNorm inside attention, RoPE)
TRUNKS = {
    "uta_test_eva01_p8_32": dict(),
    "uta_test_eva02_p8_32": dict(qkv_fused=False, mlp_ratio=8 / 3, swiglu_mlp=True, scale_mlp=True,
                                 scale_attn_inner=True, use_rot_pos_emb=True, ref_feat_shape=(16, 16)),
}
EVA02_TO_EVA_CLIP = (  # timm's EVA-02 names -> EVA-CLIP's (the inverse of what timm's checkpoint filter renames)
    (".attn.q_proj.bias", ".attn.q_bias"), (".attn.v_proj.bias", ".attn.v_bias"),
    (".attn.norm.", ".attn.inner_attn_ln."), (".mlp.fc1_g.", ".mlp.w1."), (".mlp.fc1_x.", ".mlp.w2."),
    (".mlp.norm.", ".mlp.ffn_ln."), (".mlp.fc2.", ".mlp.w3."),
)
TEXT_CFG = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}


def _register_trunk(name: str, arch: dict) -> None:
    def create(pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None, **kwargs) -> Eva:
        return Eva(**{"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, **arch, **kwargs})

    create.__name__ = name
    register_model(create)


@pytest.fixture(scope="module")
def eva_clip_configs(tmp_path_factory) -> list[str]:
    """open_clip configs like EVA01-g-14-plus (timm trunk, its head as the projection, custom text tower)."""
    root = tmp_path_factory.mktemp("configs")
    for trunk, arch in TRUNKS.items():
        _register_trunk(trunk, arch)
        cfg = {"embed_dim": 24, "custom_text": True, "text_cfg": TEXT_CFG,
               "vision_cfg": {"image_size": 32, "timm_model_name": trunk, "timm_model_pretrained": False,
                              "timm_pool": "token", "timm_proj": None}}
        (root / f"{trunk}-clip.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(root / f"{trunk}-clip.json")
    return [f"{trunk}-clip" for trunk in TRUNKS]


def to_eva_clip_layout(state_dict: dict[str, torch.Tensor], text_at_top: bool) -> dict[str, torch.Tensor]:
    """An open_clip state dict written the way BAAI's EVA-CLIP checkpoints are (visual.* without .trunk)."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("visual.trunk."):
            key = "visual." + key.removeprefix("visual.trunk.")
            if ".mlp.fc1_g." in key or ".attn.q_proj." in key:  # an EVA-02 trunk
                for ours, theirs in EVA02_TO_EVA_CLIP:
                    key = key.replace(ours, theirs)
        elif text_at_top:
            key = key.removeprefix("text.")  # the old CLIP layout: text tower keys at the top level
        out[key] = value
    if "visual.blocks.0.attn.q_proj.weight" in out:  # EVA-02: EVA-CLIP also stores its RoPE tables, shared + per block
        for prefix in ("visual.", "visual.blocks.0.attn.", "visual.blocks.1.attn."):
            out[prefix + "rope.freqs_cos"] = out[prefix + "rope.freqs_sin"] = torch.randn(16, 16)
    return out


@pytest.mark.parametrize("text_at_top", [False, True])
@pytest.mark.parametrize("index", [0, 1])
def test_eva_clip_layout_loads_as_the_same_model(eva_clip_configs, tmp_path, index, text_at_top):
    name = eva_clip_configs[index]
    torch.manual_seed(index)
    original = create_openclip(name, random_weights=True).eval()
    with torch.no_grad():
        for p in original.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # no init-time zeros or ones left to hide a wrong mapping
    eva_clip = to_eva_clip_layout(original.state_dict(), text_at_top)
    assert not any(".trunk." in k for k in eva_clip) and "visual.patch_embed.proj.weight" in eva_clip
    assert ("visual.blocks.0.mlp.w1.weight" in eva_clip) == (index == 1)  # EVA-02 names for the EVA-02 trunk
    torch.save(eva_clip, tmp_path / "eva_clip.pt")

    loaded = create_openclip(name, tmp_path / "eva_clip.pt").eval()
    images, tokens = torch.randn(2, 3, 32, 32), torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), original.encode_image(images))
        assert torch.equal(loaded.encode_text(tokens), original.encode_text(tokens))
        teacher = CLIPTeacher.from_pretrained(name, str(tmp_path / "eva_clip.pt"))
        assert torch.equal(teacher(images), CLIPTeacher(original.visual)(images))


def test_eva_clip_layout_errors_name_the_problem(eva_clip_configs, tmp_path):
    torch.manual_seed(0)
    eva_clip = to_eva_clip_layout(create_openclip(eva_clip_configs[0], random_weights=True).state_dict(),
                                  text_at_top=False)
    torch.save(eva_clip, tmp_path / "eva_clip.pt")
    vit_cfg = {"embed_dim": 24, "text_cfg": TEXT_CFG, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32,
                                                                      "layers": 1, "head_width": 16}}
    (tmp_path / "uta-test-loader-vit.json").write_text(json.dumps(vit_cfg))
    open_clip.add_model_config(tmp_path / "uta-test-loader-vit.json")
    with pytest.raises(CheckpointError, match="EVA-CLIP's layout.*VisionTransformer"):
        create_openclip("uta-test-loader-vit", tmp_path / "eva_clip.pt")
    del eva_clip["visual.blocks.1.mlp.fc2.weight"]
    eva_clip["visual.extra"] = torch.zeros(1)
    torch.save(eva_clip, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): visual.trunk.blocks.1.mlp.fc2.weight"):
        create_openclip(eva_clip_configs[0], tmp_path / "broken.pt")


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach the network (sockets, the Hub, open_clip's downloads) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for module in (open_clip.factory, open_clip.pretrained):
        for attr in ("download_pretrained", "download_pretrained_from_hf", "download_pretrained_from_url"):
            if hasattr(module, attr):
                monkeypatch.setattr(module, attr, refuse)


def test_hub_models_and_tags_are_refused_without_network(no_network):
    with pytest.raises(ValueError, match="Hugging Face Hub.*local-dir:PATH"):
        CLIPTeacher.from_pretrained("hf-hub:timm/eva_giant_patch14_clip_224.laion400m")
    with pytest.raises(FileNotFoundError, match="only read from local files"):
        CLIPTeacher.from_pretrained("ViT-S-16", "laion2b_s34b_b79k")  # a pretrained tag, not a file
    with pytest.raises(ValueError, match="text tower from the Hugging Face model 'roberta-base'"):
        create_openclip("roberta-ViT-B-32")
    with pytest.raises(ValueError, match="tokenizer .* would be downloaded"):
        openclip_tokenizer("ViT-B-16-SigLIP")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        create_openclip("no-such-model")
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        create_openclip("local-dir:/nonexistent/teacher")
    assert openclip_tokenizer("EVA01-g-14-plus")(["a photo"]).shape == (1, 77)  # the teacher's own BPE: local


def test_a_built_in_name_without_weights_is_an_error_unless_asked_for(no_network, teacher_dir, tmp_path):
    """A named teacher with no weights file would distil a random model with normal-looking losses."""
    with pytest.raises(ValueError, match="without weights.*--teacher_pretrained"):
        create_openclip("ViT-S-16")
    with pytest.raises(ValueError, match="without weights"):
        CLIPTeacher.from_pretrained("ViT-S-16")
    assert CLIPTeacher.from_pretrained("ViT-S-16", random_weights=True).grid == (14, 14)  # on purpose: timing
    from pretrain.engine import PretrainArguments, Pretrainer

    args = dict(data_path=str(tmp_path), output_dir=str(tmp_path / "run"), teacher="ViT-S-16", model="uta_test_p8_32")
    with pytest.raises(ValueError, match="without weights"):
        Pretrainer(PretrainArguments(**args))
