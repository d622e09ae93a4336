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
from llava_uta.model.open_clip_loader import create_open_clip, open_clip_tokenizer
from pretrain.teacher import CLIPTeacher

# tiny timm EVA trunks (32 px, patch 8) in the two EVA-CLIP generations: EVA-01 (EVA01-g-14-plus, the paper's teacher:
# fused qkv + q/v bias, GELU MLP, no RoPE) and EVA-02 (EVA02-CLIP: separate q/k/v, SwiGLU with an inner LayerNorm,
# a LayerNorm inside attention, RoPE)
TRUNKS = {
    "uta_test_eva01_p8_32": dict(),
    "uta_test_eva02_p8_32": dict(qkv_fused=False, mlp_ratio=8 / 3, swiglu_mlp=True, scale_mlp=True,
                                 scale_attn_inner=True, use_rot_pos_emb=True, ref_feat_shape=(16, 16)),
}
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


def eva_clip_visual(eva02: bool, depth: int = 2, dim: int = 32, heads: int = 2) -> dict[str, torch.Tensor]:
    """A vision tower's state dict under the names EVA-CLIP's own model code gives it (`EVAVisionTransformer`,
    eva_clip/eva_vit_model.py), random values: EVA-01 (EVA01-g-14-plus): fused `qkv` without bias plus `q_bias` /
    `v_bias`, GELU `Mlp` (`fc1`, `fc2`); EVA-02: `q_proj` / `k_proj` / `v_proj` without bias plus `q_bias` / `v_bias`,
    `inner_attn_ln`, SwiGLU (`w1` gated, `w2`, `ffn_ln`, `w3`) and the RoPE tables, once at `rope` and in every block
    (the blocks share one module). Both: CLS pooling through `norm`, then `head` (the CLIP projection)."""
    hidden = dim * 8 // 3 if eva02 else dim * 4
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, 17, dim), "patch_embed.proj.weight": (dim, 3, 8, 8),
              "patch_embed.proj.bias": (dim,), "norm.weight": (dim,), "norm.bias": (dim,),
              "head.weight": (24, dim), "head.bias": (24,)}
    rope = (16, dim // heads)
    if eva02:
        shapes |= {"rope.freqs_cos": rope, "rope.freqs_sin": rope}
    for i in range(depth):
        block = {"norm1.weight": (dim,), "norm1.bias": (dim,), "norm2.weight": (dim,), "norm2.bias": (dim,),
                 "attn.q_bias": (dim,), "attn.v_bias": (dim,), "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,)}
        if eva02:
            block |= {"attn.q_proj.weight": (dim, dim), "attn.k_proj.weight": (dim, dim),
                      "attn.v_proj.weight": (dim, dim), "attn.inner_attn_ln.weight": (dim,),
                      "attn.inner_attn_ln.bias": (dim,), "attn.rope.freqs_cos": rope, "attn.rope.freqs_sin": rope,
                      "mlp.w1.weight": (hidden, dim), "mlp.w1.bias": (hidden,), "mlp.w2.weight": (hidden, dim),
                      "mlp.w2.bias": (hidden,), "mlp.ffn_ln.weight": (hidden,), "mlp.ffn_ln.bias": (hidden,),
                      "mlp.w3.weight": (dim, hidden), "mlp.w3.bias": (dim,)}
        else:
            block |= {"attn.qkv.weight": (3 * dim, dim), "mlp.fc1.weight": (hidden, dim), "mlp.fc1.bias": (hidden,),
                      "mlp.fc2.weight": (dim, hidden), "mlp.fc2.bias": (dim,)}
        shapes |= {f"blocks.{i}.{k}": v for k, v in block.items()}
    return {f"visual.{k}": torch.randn(shape) for k, shape in shapes.items()}


# where EVA-CLIP's tensors must land in the open_clip model (its timm trunk), by what each does in EVA-CLIP's forward
EVA_CLIP_TO_OPEN_CLIP = {
    "visual.blocks.1.attn.q_bias": "visual.trunk.blocks.1.attn.q_bias",
    "visual.blocks.1.attn.v_bias": "visual.trunk.blocks.1.attn.v_bias",
    "visual.blocks.1.attn.qkv.weight": "visual.trunk.blocks.1.attn.qkv.weight",
    "visual.blocks.1.mlp.fc1.weight": "visual.trunk.blocks.1.mlp.fc1.weight",
    "visual.norm.weight": "visual.trunk.norm.weight",
    "visual.head.weight": "visual.trunk.head.weight",
}
EVA02_CLIP_TO_OPEN_CLIP = {
    "visual.blocks.1.attn.q_bias": "visual.trunk.blocks.1.attn.q_proj.bias",
    "visual.blocks.1.attn.v_bias": "visual.trunk.blocks.1.attn.v_proj.bias",
    "visual.blocks.1.attn.k_proj.weight": "visual.trunk.blocks.1.attn.k_proj.weight",
    "visual.blocks.1.attn.inner_attn_ln.weight": "visual.trunk.blocks.1.attn.norm.weight",
    "visual.blocks.1.mlp.w1.weight": "visual.trunk.blocks.1.mlp.fc1_g.weight",  # EVA-CLIP: act(w1(x)) * w2(x)
    "visual.blocks.1.mlp.w2.weight": "visual.trunk.blocks.1.mlp.fc1_x.weight",
    "visual.blocks.1.mlp.ffn_ln.bias": "visual.trunk.blocks.1.mlp.norm.bias",
    "visual.blocks.1.mlp.w3.weight": "visual.trunk.blocks.1.mlp.fc2.weight",
    "visual.head.bias": "visual.trunk.head.bias",
}


def eva_clip_checkpoint(name: str, eva02: bool, text_at_top: bool) -> dict[str, torch.Tensor]:
    """EVA-CLIP's vision tower (eva_clip_visual) and an open_clip text tower of config `name`, as EVA-CLIP saves them
    (the text tower under `text.`, or at the top level as in the older CLIP layout)."""
    text = {k: v for k, v in create_open_clip(f"random:open_clip:{name}").state_dict().items()
            if not k.startswith("visual.")}
    if text_at_top:
        text = {k.removeprefix("text."): v for k, v in text.items()}
    return eva_clip_visual(eva02) | {k: torch.randn_like(v) for k, v in text.items()}


@pytest.mark.parametrize("text_at_top", [False, True])
@pytest.mark.parametrize("index", [0, 1])
def test_eva_clip_layout_loads_every_tensor_where_eva_clip_uses_it(eva_clip_configs, tmp_path, index, text_at_top,
                                                                   no_network):
    name, eva02 = eva_clip_configs[index], index == 1
    torch.manual_seed(index)
    checkpoint = eva_clip_checkpoint(name, eva02, text_at_top)
    torch.save(checkpoint, tmp_path / "eva_clip.pt")

    loaded = create_open_clip(f"open_clip:{name}@{tmp_path / 'eva_clip.pt'}").eval()  # strict: every key used
    state = loaded.state_dict()
    for theirs, ours in (EVA02_CLIP_TO_OPEN_CLIP if eva02 else EVA_CLIP_TO_OPEN_CLIP).items():
        assert torch.equal(state[ours], checkpoint[theirs]), f"{theirs} -> {ours}"
    text_key = "token_embedding.weight" if text_at_top else "text.token_embedding.weight"
    assert torch.equal(state["text.token_embedding.weight"], checkpoint[text_key])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        teacher = CLIPTeacher.from_pretrained(f"open_clip:{name}@{tmp_path / 'eva_clip.pt'}")
        assert torch.equal(teacher(images), CLIPTeacher(loaded.visual)(images))


def test_eva_clip_layout_errors_name_the_problem(eva_clip_configs, tmp_path):
    torch.manual_seed(0)
    eva_clip = eva_clip_checkpoint(eva_clip_configs[0], eva02=False, text_at_top=False)
    torch.save(eva_clip, tmp_path / "eva_clip.pt")
    vit_cfg = {"embed_dim": 24, "text_cfg": TEXT_CFG, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32,
                                                                      "layers": 1, "head_width": 16}}
    (tmp_path / "uta-test-loader-vit.json").write_text(json.dumps(vit_cfg))
    open_clip.add_model_config(tmp_path / "uta-test-loader-vit.json")
    with pytest.raises(CheckpointError, match="EVA-CLIP's layout.*VisionTransformer"):
        create_open_clip(f"open_clip:uta-test-loader-vit@{tmp_path / 'eva_clip.pt'}")
    del eva_clip["visual.blocks.1.mlp.fc2.weight"]
    eva_clip["visual.extra"] = torch.zeros(1)
    torch.save(eva_clip, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): visual.trunk.blocks.1.mlp.fc2.weight"):
        create_open_clip(f"open_clip:{eva_clip_configs[0]}@{tmp_path / 'broken.pt'}")


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
    with pytest.raises(ValueError, match="Hugging Face Hub.*open_clip:local-dir:DIR"):
        CLIPTeacher.from_pretrained("open_clip:hf-hub:timm/eva_giant_patch14_clip_224.laion400m")
    with pytest.raises(FileNotFoundError, match="only read from local files"):
        CLIPTeacher.from_pretrained("open_clip:ViT-S-16@laion2b_s34b_b79k")  # a pretrained tag, not a file
    with pytest.raises(ValueError, match="text tower from the Hugging Face model 'roberta-base'"):
        create_open_clip("open_clip:roberta-ViT-B-32")
    with pytest.raises(ValueError, match="tokenizer .* would be downloaded"):
        open_clip_tokenizer("open_clip:ViT-B-16-SigLIP")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        create_open_clip("open_clip:no-such-model")
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        create_open_clip("open_clip:local-dir:/nonexistent/teacher")
    assert open_clip_tokenizer("open_clip:EVA01-g-14-plus")(["a photo"]).shape == (1, 77)  # the teacher's BPE: local


def test_a_built_in_name_without_weights_is_an_error_unless_asked_for(no_network, teacher_dir, tmp_path):
    """A named teacher with no weights file would distil a random model with normal-looking losses."""
    with pytest.raises(ValueError, match="without weights.*open_clip:ViT-S-16@FILE"):
        create_open_clip("open_clip:ViT-S-16")
    with pytest.raises(ValueError, match="without weights"):
        CLIPTeacher.from_pretrained("open_clip:ViT-S-16")
    assert CLIPTeacher.from_pretrained("open_clip:ViT-S-16", random_weights=True).grid == (14, 14)  # on purpose
    assert CLIPTeacher.from_pretrained("random:open_clip:ViT-S-16").grid == (14, 14)  # the same, in the source
    from pretrain.engine import PretrainArguments, Pretrainer

    args = dict(data_path=str(tmp_path), output_dir=str(tmp_path / "run"), teacher="open_clip:ViT-S-16",
                model="uta_test_p8_32")
    with pytest.raises(ValueError, match="without weights"):
        Pretrainer(PretrainArguments(**args))
