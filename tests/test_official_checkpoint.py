"""Released-checkpoint loading: strict, numerically equal to an independent reference, clear errors."""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from llava_uta.model.checkpoint import CheckpointError, load_state_dict_file
from llava_uta.model.official import UTACLIP, load_official_checkpoint, load_official_visual
from llava_uta.model.uta_vit import UTA_VIT_CONFIGS

# ---- an independent reference, written from the math in docs/uta.md, reading the official keys directly


def _ln(x, sd, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + "weight"], sd[prefix + "bias"], eps)


def _rotate_pairs(x):
    """(x0, x1) -> (-x1, x0) on interleaved channel pairs."""
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([-x1, x0], dim=-1).flatten(-2)


def _attention(q, k, v):
    weights = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)
    return weights @ v


def reference_visual(sd, images, heads, keep=None):
    """(features (B, 1+K, E) = head(norm(tokens)), last-block tokens) of an official `visual.*` state dict."""
    v = "visual."
    w = sd[v + "patch_embed.proj.weight"]
    x = F.conv2d(images, w, sd[v + "patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    B, _, D = x.shape
    x = torch.cat([sd[v + "cls_token"].expand(B, 1, D), x], dim=1) + sd[v + "pos_embed"]
    cos, sin = sd[v + "rope.freqs_cos"], sd[v + "rope.freqs_sin"]
    if keep is not None:
        x = torch.cat([x[:, :1], x[:, 1:][torch.arange(B)[:, None], keep]], dim=1)
        cos, sin = cos[keep][:, None], sin[keep][:, None]  # (B, 1, K, head_dim)
    depth = len({k.split(".")[2] for k in sd if k.startswith(v + "blocks.")})
    for i in range(depth):
        b = f"{v}blocks.{i}."
        h = _ln(x, sd, b + "norm1.", 1e-6)
        q = h @ sd[b + "attn.q_proj.weight"].T + sd[b + "attn.q_bias"]
        k = h @ sd[b + "attn.k_proj.weight"].T
        val = h @ sd[b + "attn.v_proj.weight"].T + sd[b + "attn.v_bias"]
        q, k, val = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, val))  # (B, heads, T, hd)
        q = torch.cat([q[:, :, :1], q[:, :, 1:] * cos + _rotate_pairs(q[:, :, 1:]) * sin], dim=2)
        k = torch.cat([k[:, :, :1], k[:, :, 1:] * cos + _rotate_pairs(k[:, :, 1:]) * sin], dim=2)
        a = _attention(q, k, val).transpose(1, 2).flatten(2)
        x = x + a @ sd[b + "attn.proj.weight"].T + sd[b + "attn.proj.bias"]
        h = _ln(x, sd, b + "norm2.", 1e-6)
        h = F.silu(h @ sd[b + "mlp.w1.weight"].T + sd[b + "mlp.w1.bias"]) * (
            h @ sd[b + "mlp.w2.weight"].T + sd[b + "mlp.w2.bias"]
        )
        h = _ln(h, sd, b + "mlp.ffn_ln.", 1e-6)
        x = x + h @ sd[b + "mlp.w3.weight"].T + sd[b + "mlp.w3.bias"]
    features = _ln(x, sd, v + "norm.", 1e-6) @ sd[v + "head.weight"].T + sd[v + "head.bias"]
    return features, x


def reference_text(sd, tokens, heads):
    """Causal pre-LN GELU transformer, pooled at the EOT (argmax) token, @ text_projection."""
    t = "text."
    x = sd[t + "token_embedding.weight"][tokens] + sd[t + "positional_embedding"]
    L = x.shape[1]
    causal = torch.full((L, L), float("-inf")).triu(1)
    layers = len({k.split(".")[3] for k in sd if k.startswith(t + "transformer.resblocks.")})
    for i in range(layers):
        b = f"{t}transformer.resblocks.{i}."
        h = _ln(x, sd, b + "ln_1.", 1e-5)
        q, k, v = (h @ sd[b + "attn.in_proj_weight"].T + sd[b + "attn.in_proj_bias"]).chunk(3, dim=-1)
        q, k, v = (z.unflatten(-1, (heads, -1)).transpose(1, 2) for z in (q, k, v))
        weights = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + causal).softmax(dim=-1)
        a = (weights @ v).transpose(1, 2).flatten(2)
        x = x + a @ sd[b + "attn.out_proj.weight"].T + sd[b + "attn.out_proj.bias"]
        h = _ln(x, sd, b + "ln_2.", 1e-5)
        h = F.gelu(h @ sd[b + "mlp.c_fc.weight"].T + sd[b + "mlp.c_fc.bias"])
        x = x + h @ sd[b + "mlp.c_proj.weight"].T + sd[b + "mlp.c_proj.bias"]
    x = _ln(x, sd, t + "ln_final.", 1e-5)
    return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ sd[t + "text_projection"]


# ---- tests


@pytest.fixture(scope="module")
def loaded(official_checkpoint) -> UTACLIP:
    return load_official_checkpoint(official_checkpoint)


def test_strict_load_infers_the_architecture(loaded, official_state_dict):
    cfg = loaded.visual.cfg
    assert (cfg.img_size, cfg.patch_size, cfg.width, cfg.depth, cfg.num_heads) == (32, 8, 64, 2, 2)
    assert (cfg.mlp_hidden, cfg.out_dim) == (170, 48)
    n_rope = sum(".rope.freqs_" in k or k.startswith("visual.rope.") for k in official_state_dict)
    n_used = len(loaded.visual.state_dict()) + len(loaded.text.state_dict()) + 1
    assert n_used + n_rope == len(official_state_dict)  # every tensor used; only the RoPE tables recomputed
    assert loaded.logit_scale.item() == pytest.approx(4.6052)


def test_image_features_equal_the_reference(loaded, official_state_dict):
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ref_features, ref_tokens = reference_visual(official_state_dict, images, heads=2)
    with torch.no_grad():
        out = loaded.visual(images)
        embedding = loaded.encode_image(images)
    assert ref_features.abs().mean() > 0.1  # the comparison is not between near-zero numbers
    torch.testing.assert_close(out.features, ref_features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.hidden_states[-1], ref_tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(embedding, ref_features[:, 0], atol=1e-5, rtol=1e-5)


def test_masked_features_equal_the_reference(loaded, official_state_dict):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    keep = torch.tensor([[0, 5, 10, 15, 3, 6], [15, 14, 1, 2, 8, 9]])
    ref_features, _ = reference_visual(official_state_dict, images, heads=2, keep=keep)
    with torch.no_grad():
        features = loaded.visual(images, keep_indices=keep).features
    torch.testing.assert_close(features, ref_features, atol=1e-5, rtol=1e-5)


def test_text_features_equal_the_reference_with_open_clip_tokens(loaded, official_state_dict):
    tokens = open_clip.get_tokenizer("ViT-B-32")(["a photo of a dog.", "a red square", "x"])
    assert tokens.shape == (3, 77)
    with torch.no_grad():
        text = loaded.encode_text(tokens, normalize=True)
    ref = F.normalize(reference_text(official_state_dict, tokens, heads=1), dim=-1)
    torch.testing.assert_close(text, ref, atol=1e-5, rtol=1e-5)


def test_reference_outputs_saved_and_reproduced(tmp_path, official_checkpoint, official_state_dict):
    """Reference outputs written to disk are reproduced by a fresh load of a safetensors copy."""
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    ref_features, _ = reference_visual(official_state_dict, images, heads=2)
    save_file({"images": images, "features": ref_features}, tmp_path / "reference_outputs.safetensors")
    save_file(dict(official_state_dict), tmp_path / "uta.safetensors")
    saved = load_state_dict_file(tmp_path / "reference_outputs.safetensors")
    with torch.no_grad():
        features = load_official_visual(tmp_path / "uta.safetensors")(saved["images"]).features
    torch.testing.assert_close(features, saved["features"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "module"])
def test_wrapped_state_dicts_load(tmp_path, official_state_dict, wrapper):
    torch.save({wrapper: official_state_dict, "epoch": 3}, tmp_path / "wrapped.pth")
    assert load_state_dict_file(tmp_path / "wrapped.pth").keys() == official_state_dict.keys()


def test_named_configs_match_the_released_shapes():
    """uta_b16_224 / l14_336 / g14_336 carry the released towers' shapes (docs/uta.md#student-architecture)."""
    shapes = {
        name: (c.img_size, c.patch_size, c.depth, c.width, c.num_heads, c.mlp_hidden, c.out_dim)
        for name, c in UTA_VIT_CONFIGS.items()
    }
    assert shapes["uta_b16_224"] == (224, 16, 12, 768, 12, 2048, 1024)
    assert shapes["uta_l14_336"] == (336, 14, 24, 1024, 16, 2730, 1024)
    assert shapes["uta_g14_336"] == (336, 14, 40, 1408, 16, 4096, 1024)


# ---- bad files


def _save(tmp_path, sd, name="bad.pt"):
    torch.save(sd, tmp_path / name)
    return tmp_path / name


def test_unexpected_and_missing_keys_are_named(tmp_path, official_state_dict):
    sd = dict(official_state_dict)
    sd["visual.blocks.0.attn.inner_attn_ln.weight"] = torch.ones(64)  # EVA-02's sub-LN, absent from UTA
    del sd["visual.blocks.1.mlp.w3.bias"]
    with pytest.raises(CheckpointError) as e:
        load_official_checkpoint(_save(tmp_path, sd))
    msg = str(e.value)
    assert "bad.pt" in msg and "blocks.0.attn.inner_attn_ln.weight" in msg and "blocks.1.mlp.fc2.bias" in msg


def test_shape_mismatch_is_named(tmp_path, official_state_dict):
    sd = dict(official_state_dict)
    sd["text.ln_final.weight"] = torch.ones(65)
    with pytest.raises(CheckpointError, match=r"text\.\*.*ln_final\.weight: checkpoint \(65,\) vs model \(64,\)"):
        load_official_checkpoint(_save(tmp_path, sd))


def test_wrong_rope_tables_are_rejected(tmp_path, official_state_dict):
    sd = dict(official_state_dict)
    sd["visual.blocks.1.attn.rope.freqs_sin"] = sd["visual.blocks.1.attn.rope.freqs_sin"].flip(0)
    with pytest.raises(CheckpointError, match="RoPE table visual.blocks.1.attn.rope.freqs_sin"):
        load_official_checkpoint(_save(tmp_path, sd))


def test_not_an_official_checkpoint(tmp_path, official_state_dict):
    visual_only = {k: v for k, v in official_state_dict.items() if k.startswith("visual.")}
    with pytest.raises(CheckpointError, match="holds visual.*, text.* and logit_scale"):
        load_official_checkpoint(_save(tmp_path, visual_only))
    with pytest.raises(CheckpointError, match="unexpected keys outside"):
        load_official_checkpoint(_save(tmp_path, {**official_state_dict, "optimizer.step": torch.tensor(1.0)}))


def test_truncated_and_garbage_files(tmp_path, official_checkpoint, official_state_dict):
    data = official_checkpoint.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pt: not a readable checkpoint"):
        load_official_checkpoint(tmp_path / "truncated.pt")
    save_file(dict(official_state_dict), tmp_path / "t.safetensors")
    st = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(st[: len(st) - 1000])
    with pytest.raises(CheckpointError, match="t.safetensors: not a readable checkpoint"):
        load_official_checkpoint(tmp_path / "t.safetensors")
    (tmp_path / "notes.bin").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.bin: not a readable checkpoint"):
        load_official_checkpoint(tmp_path / "notes.bin")
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_official_checkpoint(tmp_path / "missing.pt")


def test_pickled_code_is_refused(tmp_path):
    torch.save({"visual.cls_token": torch.zeros(1), "hook": math.sqrt}, tmp_path / "evil.pt")  # not plain tensors
    with pytest.raises(CheckpointError, match="evil.pt: not a readable checkpoint"):
        load_state_dict_file(tmp_path / "evil.pt")


def test_student_exports_to_the_official_layout_and_loads_back(tmp_path):
    import open_clip

    from llava_uta.model.checkpoint import save_uta_vit
    from llava_uta.model.convert import main as convert_main
    from llava_uta.model.official import load_official_checkpoint
    from llava_uta.model.uta_vit import build_uta_vit
    from pretrain.train_clip import save_local_dir

    torch.manual_seed(0)
    student = build_uta_vit("uta_test_p8_32", use_mask_token=True).eval()  # a MIM student: [MASK] is dropped
    save_uta_vit(student, tmp_path / "student.safetensors")
    clip_cfg = {"embed_dim": 32,
                "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
                "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}}
    teacher = open_clip.CLIP(**clip_cfg).eval()
    save_local_dir(teacher, clip_cfg, tmp_path / "teacher")
    out = tmp_path / "official.safetensors"
    convert_main([str(tmp_path / "student.safetensors"), str(out), "--to", "official",
                  "--text-model", f"open_clip:local-dir:{tmp_path / 'teacher'}"])
    loaded = load_official_checkpoint(out, text_heads=1)  # strict: every key used, RoPE tables checked
    images = torch.randn(2, 3, 32, 32)
    tokens = open_clip.SimpleTokenizer(context_length=16)(["a red circle.", "a star."])
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(images), student.encode_image(images), atol=1e-5)
        assert torch.allclose(loaded.encode_text(tokens), teacher.encode_text(tokens), atol=1e-5)
