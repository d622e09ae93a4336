"""The UTA ViT: named configs, RoPE layout, masked (keep-indices) forward, training features, student I/O."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from llava_uta.model.checkpoint import CheckpointError, load_uta_vit, save_uta_vit
from llava_uta.model.uta_vit import UTA_VIT_CONFIGS, UTAViT, UTAViTConfig, build_uta_vit


def _images(cfg: UTAViTConfig, batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(seed))


def _random_keep(batch: int, n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(batch)])


@pytest.fixture(scope="module")
def tiny() -> UTAViT:
    torch.manual_seed(0)
    return build_uta_vit("uta_tiny_p8_64").eval()


@pytest.mark.parametrize("name", list(UTA_VIT_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_named_config_on_meta(name, dtype):
    """Shapes and dtypes of full and masked forwards, without allocating memory."""
    with torch.device("meta"):
        model = build_uta_vit(name).to(dtype)
        cfg = model.cfg
        x = torch.empty(2, 3, cfg.img_size, cfg.img_size, dtype=dtype)
        full = model(x)
        keep = torch.zeros(2, cfg.num_patches // 2, dtype=torch.long)
        masked = model(x, keep_indices=keep)
        embedding = model.encode_image(x)
    assert full.features.shape == (2, 1 + cfg.num_patches, cfg.out_dim) and full.features.dtype == dtype
    assert masked.features.shape == (2, 1 + cfg.num_patches // 2, cfg.out_dim)
    assert len(full.hidden_states) == cfg.depth + 1
    assert all(h.shape == (2, 1 + cfg.num_patches, cfg.width) for h in full.hidden_states)
    assert embedding.shape == (2, cfg.out_dim) and embedding.dtype == dtype
    assert model.blocks[0].mlp.fc1_g.out_features == cfg.mlp_hidden
    assert model.rope.get_embed().shape == (cfg.num_patches, 2 * cfg.head_dim)


def test_released_parameter_counts():
    """Analytic parameter counts of the released towers (docs/uta.md#student-architecture)."""
    with torch.device("meta"):
        counts = {n: sum(p.numel() for p in build_uta_vit(n).parameters()) for n in ("uta_b16_224", "uta_l14_336")}
    assert counts == {"uta_b16_224": 86_638_336, "uta_l14_336": 304_646_080}


def test_rope_table_is_the_official_layout(tiny):
    """Row angle on the first half of each head, column angle on the second, interleaved pairs, 16-grid scaling."""
    cfg = tiny.cfg
    G, hd = cfg.grid_size, cfg.head_dim
    sin, cos = tiny.rope.get_embed().chunk(2, dim=-1)
    inv_freq = [10000 ** (-4 * j / hd) for j in range(hd // 4)]
    for n in range(G * G):
        row, col = divmod(n, G)
        for c in range(hd):
            axis_pos = (row if c < hd // 2 else col) * cfg.rope_ref_grid / G
            angle = torch.tensor(axis_pos * inv_freq[(c % (hd // 2)) // 2], dtype=torch.float64)
            assert cos[n, c].item() == pytest.approx(angle.cos().item(), abs=1e-5)
            assert sin[n, c].item() == pytest.approx(angle.sin().item(), abs=1e-5)


def test_masked_forward_with_every_index_equals_the_full_forward(tiny):
    x = _images(tiny.cfg, 2)
    keep = torch.arange(tiny.cfg.num_patches).expand(2, -1)
    with torch.no_grad():
        full, masked = tiny(x), tiny(x, keep_indices=keep)
    torch.testing.assert_close(masked.features, full.features, atol=1e-5, rtol=1e-5)
    for a, b in zip(masked.hidden_states, full.hidden_states, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_positions_travel_with_the_kept_tokens(tiny):
    """A permutation of all patches permutes the outputs: pos_embed and RoPE are gathered at the kept positions."""
    x = _images(tiny.cfg, 2, seed=1)
    perm = _random_keep(2, tiny.cfg.num_patches, tiny.cfg.num_patches, seed=1)
    with torch.no_grad():
        full, permuted = tiny(x).features, tiny(x, keep_indices=perm).features
    torch.testing.assert_close(permuted[:, 0], full[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(permuted[:, 1:], full[:, 1:][torch.arange(2)[:, None], perm], atol=1e-5, rtol=1e-5)


def test_rope_rows_at_kept_positions(tiny):
    keep = _random_keep(3, tiny.cfg.num_patches, 20)
    full, kept = tiny.rope_embed(), tiny.rope_embed(keep)
    assert kept.shape == (3, 1, 20, 2 * tiny.cfg.head_dim)
    for b in range(3):
        assert torch.equal(kept[b, 0], full[keep[b]])


def test_masked_forward_keeps_cls_first_and_only_k_tokens(tiny):
    x = _images(tiny.cfg, 2, seed=2)
    keep = _random_keep(2, tiny.cfg.num_patches, 32, seed=2)
    with torch.no_grad():
        out = tiny(x, keep_indices=keep)
        full = tiny(x)
    assert out.features.shape == (2, 33, tiny.cfg.out_dim)
    assert out.hidden_states[0].shape == (2, 33, tiny.cfg.width)
    # block-0 input = CLS + gathered (patch embedding + absolute position) tokens
    torch.testing.assert_close(out.hidden_states[0][:, 0], full.hidden_states[0][:, 0])
    torch.testing.assert_close(
        out.hidden_states[0][:, 1:], full.hidden_states[0][:, 1:][torch.arange(2)[:, None], keep]
    )
    # dropping tokens changes what the kept tokens attend to
    assert not torch.allclose(out.features[:, 0], full.features[:, 0], rtol=1e-2, atol=0)


def test_bad_keep_indices(tiny):
    x = _images(tiny.cfg, 2)
    with pytest.raises(ValueError, match="keep_indices"):
        tiny(x, keep_indices=torch.arange(5))
    with pytest.raises(ValueError, match="keep_indices"):
        tiny(x, keep_indices=torch.zeros(2, 5))


def test_encode_image_is_the_projected_cls(tiny):
    x = _images(tiny.cfg, 2, seed=3)
    with torch.no_grad():
        features = tiny(x).features
        embedding, normed = tiny.encode_image(x), tiny.encode_image(x, normalize=True)
    torch.testing.assert_close(embedding, features[:, 0])
    torch.testing.assert_close(normed, F.normalize(features[:, 0], dim=-1))
    torch.testing.assert_close(normed.norm(dim=-1), torch.ones(2))


def test_forward_backward_reaches_every_parameter():
    torch.manual_seed(0)
    model = build_uta_vit("uta_test_p8_32").train()
    keep = _random_keep(4, model.cfg.num_patches, 8)
    out = model(_images(model.cfg, 4), keep_indices=keep)
    out.features.float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = build_uta_vit("uta_test_p8_32")
    x, keep = _images(model.cfg, 2), _random_keep(2, model.cfg.num_patches, 8)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        model(x, keep_indices=keep).features.sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def test_drop_path_is_stochastic_in_training_only():
    torch.manual_seed(0)
    model = build_uta_vit("uta_test_p8_32", drop_path_rate=0.5)
    x = _images(model.cfg, 8)
    with torch.no_grad():
        train_a, train_b = model.train()(x).features, model(x).features
        eval_a, eval_b = model.eval()(x).features, model(x).features
    assert not torch.allclose(train_a, train_b)
    assert torch.equal(eval_a, eval_b)


def test_attention_uses_sdpa(tiny, monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    with torch.no_grad():
        tiny(_images(tiny.cfg, 1))
    assert len(calls) == tiny.cfg.depth


def test_no_weight_decay_and_overrides():
    model = build_uta_vit("uta_test_p8_32", depth=3, out_dim=16)
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    assert {"pos_embed", "cls_token"} <= dict(model.named_parameters()).keys()
    assert len(model.blocks) == 3 and model.head.out_features == 16
    with pytest.raises(KeyError, match="unknown UTA ViT config"):
        build_uta_vit("uta_huge")
    with pytest.raises(ValueError, match="head_dim divisible by 4"):
        build_uta_vit("uta_test_p8_32", num_heads=3)


def test_student_checkpoint_round_trip(tmp_path, tiny):
    save_uta_vit(tiny, tmp_path / "student.safetensors")
    assert json.loads((tmp_path / "student.json").read_text())["width"] == tiny.cfg.width
    loaded = load_uta_vit(tmp_path / "student.safetensors").eval()
    assert loaded.cfg == tiny.cfg
    x = _images(tiny.cfg, 2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).features, tiny(x).features, atol=0, rtol=0)
    (tmp_path / "student.json").write_text(
        json.dumps({**json.loads((tmp_path / "student.json").read_text()), "width": 64, "num_heads": 2})
    )
    with pytest.raises(
        CheckpointError, match=r"shape mismatches .*k_proj.weight: checkpoint \(128, 128\) vs model \(64, 64\)"
    ):
        load_uta_vit(tmp_path / "student.safetensors")
    (tmp_path / "student.json").unlink()
    with pytest.raises(CheckpointError, match="needs its config file"):
        load_uta_vit(tmp_path / "student.safetensors")
