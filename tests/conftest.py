"""Shared fixtures: a tiny random checkpoint in the released UTA layout (docs/uta.md#released-checkpoints)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Every subprocess (DeepSpeed launcher, ranks, torch's JIT builds) finds this environment's tools first, so all
# tests build DeepSpeed's CPU ops with the same ninja (a system ninja of another version rebuilds them each time).
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

# a 32 px, patch-8 vision tower (4x4 grid, so RoPE is interpolated from the 16-grid) and a 2-layer text tower
TINY_OFFICIAL = dict(
    img=32, patch=8, width=64, depth=2, heads=2, hidden=170, embed=48, text_width=64, text_layers=2, vocab=49408, ctx=77
)


def official_rope_tables(grid: int, head_dim: int, ref_grid: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """freqs_cos, freqs_sin (N, head_dim) as the released RoPE module stores them (docs/uta.md#student-architecture)."""
    dim = head_dim // 2
    freqs = 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)
    t = torch.arange(grid).float() / grid * ref_grid
    f = torch.outer(t, freqs).repeat_interleave(2, dim=-1)  # (G, dim), pairs interleaved
    f = torch.cat([f[:, None, :].expand(grid, grid, dim), f[None, :, :].expand(grid, grid, dim)], dim=-1)
    f = f.reshape(grid * grid, head_dim)  # first half: row angle, second half: column angle
    return f.cos(), f.sin()


def make_official_state_dict(seed: int = 0, **shape) -> dict[str, torch.Tensor]:
    """Random weights under the official key names and shapes; scaled so activations stay O(1)."""
    s = {**TINY_OFFICIAL, **shape}
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *size, std=0.1: torch.randn(*size, generator=g) * std
    norm = lambda n: (1 + rnd(n), rnd(n))
    sd: dict[str, torch.Tensor] = {}
    D, H, E, W = s["width"], s["hidden"], s["embed"], s["text_width"]
    grid = s["img"] // s["patch"]
    cos, sin = official_rope_tables(grid, D // s["heads"])
    v = "visual."
    sd[v + "cls_token"] = rnd(1, 1, D, std=0.5)
    sd[v + "pos_embed"] = rnd(1, grid * grid + 1, D, std=0.5)
    sd[v + "patch_embed.proj.weight"] = rnd(D, 3, s["patch"], s["patch"])
    sd[v + "patch_embed.proj.bias"] = rnd(D)
    sd[v + "rope.freqs_cos"], sd[v + "rope.freqs_sin"] = cos.clone(), sin.clone()
    for i in range(s["depth"]):
        b = f"{v}blocks.{i}."
        sd[b + "norm1.weight"], sd[b + "norm1.bias"] = norm(D)
        sd[b + "attn.q_bias"], sd[b + "attn.v_bias"] = rnd(D), rnd(D)
        for name in ("q_proj", "k_proj", "v_proj"):
            sd[b + f"attn.{name}.weight"] = rnd(D, D, std=D**-0.5)
        sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"] = rnd(D, D, std=D**-0.5), rnd(D)
        sd[b + "attn.rope.freqs_cos"], sd[b + "attn.rope.freqs_sin"] = cos.clone(), sin.clone()
        sd[b + "norm2.weight"], sd[b + "norm2.bias"] = norm(D)
        sd[b + "mlp.w1.weight"], sd[b + "mlp.w1.bias"] = rnd(H, D, std=D**-0.5), rnd(H)
        sd[b + "mlp.w2.weight"], sd[b + "mlp.w2.bias"] = rnd(H, D, std=D**-0.5), rnd(H)
        sd[b + "mlp.ffn_ln.weight"], sd[b + "mlp.ffn_ln.bias"] = norm(H)
        sd[b + "mlp.w3.weight"], sd[b + "mlp.w3.bias"] = rnd(D, H, std=H**-0.5), rnd(D)
    sd[v + "norm.weight"], sd[v + "norm.bias"] = norm(D)
    sd[v + "head.weight"], sd[v + "head.bias"] = rnd(E, D, std=D**-0.5), rnd(E)
    t = "text."
    sd[t + "token_embedding.weight"] = rnd(s["vocab"], W, std=0.5)
    sd[t + "positional_embedding"] = rnd(s["ctx"], W)
    for i in range(s["text_layers"]):
        b = f"{t}transformer.resblocks.{i}."
        sd[b + "ln_1.weight"], sd[b + "ln_1.bias"] = norm(W)
        sd[b + "attn.in_proj_weight"], sd[b + "attn.in_proj_bias"] = rnd(3 * W, W, std=W**-0.5), rnd(3 * W)
        sd[b + "attn.out_proj.weight"], sd[b + "attn.out_proj.bias"] = rnd(W, W, std=W**-0.5), rnd(W)
        sd[b + "ln_2.weight"], sd[b + "ln_2.bias"] = norm(W)
        sd[b + "mlp.c_fc.weight"], sd[b + "mlp.c_fc.bias"] = rnd(4 * W, W, std=W**-0.5), rnd(4 * W)
        sd[b + "mlp.c_proj.weight"], sd[b + "mlp.c_proj.bias"] = rnd(W, 4 * W, std=(4 * W) ** -0.5), rnd(W)
    sd[t + "ln_final.weight"], sd[t + "ln_final.bias"] = norm(W)
    sd[t + "text_projection"] = rnd(W, E, std=W**-0.5)
    sd["logit_scale"] = torch.tensor(4.6052)
    return sd


@pytest.fixture(scope="session")
def official_state_dict() -> dict[str, torch.Tensor]:
    return make_official_state_dict()


@pytest.fixture(scope="session")
def official_checkpoint(tmp_path_factory, official_state_dict):
    """The tiny official-layout state dict saved the way the released .pt files are (a flat torch.save)."""
    path = tmp_path_factory.mktemp("official") / "uta_tiny.pt"
    torch.save(official_state_dict, path)
    return path


# A tiny open_clip CLIP, the teacher of the pre-training tests (8 px patches on 32 px images, 32-dim embeddings).
TEACHER_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    """TEACHER_CFG with seed-0 weights, saved as an open_clip local-dir folder."""
    import open_clip

    from pretrain.train_clip import save_local_dir

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("teacher") / "clip"
    save_local_dir(open_clip.CLIP(**TEACHER_CFG), TEACHER_CFG, out)
    return out


# One tiny ShapesWorld for every test that reads one (32 px images; 64 CLIP and 64 pre-training images, 5 bench and
# 8 grounding images, a few LLaVA samples). Tests read it, never write into it.
TINY_WORLD = dict(image_size=32, num_clip=64, num_pretrain=64, num_zeroshot_per_class=1, num_stage1=4, num_stage2=4,
                  num_text_instruct=16, num_bench_images=5, clip_group_size=2, num_grounding_images=8)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    from llava_uta.data.shapes import ShapesWorldConfig, build

    out = tmp_path_factory.mktemp("tiny_world") / "shapes"
    build(ShapesWorldConfig(**TINY_WORLD), out, workers=1)
    return out


@pytest.fixture(scope="session")
def llava_parts(tmp_path_factory) -> dict[str, Path]:
    """A tiny sentencepiece tokenizer + Llama LM, a tiny UTA tower, and LLaVA stage-1 / stage-2 JSON with images."""
    from llava_helpers import make_dataset, make_lm_dir, make_tokenizer_dir, make_tower_dir

    root = tmp_path_factory.mktemp("llava_parts")
    tok = make_tokenizer_dir(root / "tok")
    make_dataset(root / "data", n=24, text_only=8)
    make_dataset(root / "data", n=16, plain=True)
    return {"root": root, "tok": tok, "lm": make_lm_dir(root / "lm", tok), "tower": make_tower_dir(root / "tower"),
            "data": root / "data"}


@pytest.fixture(scope="session")
def llava_runs(llava_parts, tmp_path_factory) -> dict[str, Path]:
    """Trained tiny LLaVA folders on llava_parts: stage 1 (4 steps), stage 2 and LoRA (2 steps each), a test image."""
    from llava_helpers import llava_args, solid_image

    from llava_uta.train.train import train

    root = tmp_path_factory.mktemp("llava_runs")
    train(llava_args(llava_parts, root / "stage1", stage=1))
    adapter = {"pretrain_mm_mlp_adapter": root / "stage1" / "mm_projector.bin", "max_steps": 2}
    train(llava_args(llava_parts, root / "stage2", stage=2, **adapter))
    train(llava_args(llava_parts, root / "lora", stage=2, lora_enable=True, lora_r=4, lora_alpha=8, **adapter))
    solid_image(root / "red.png", "red")
    return {**llava_parts, "stage1": root / "stage1", "stage2": root / "stage2", "lora": root / "lora",
            "image": root / "red.png"}


@pytest.fixture(scope="session")
def chat_gguf(tmp_path_factory) -> Path:
    """A tiny ChatML Llama (byte-level BPE, SmolLM2's special tokens) as a GGUF file, as the shipped LM is one."""
    from gguf_helpers import chat_tokenizer, tiny_chat_llama, write_gguf
    from llava_helpers import corpus

    tokenizer = chat_tokenizer(corpus() + ["<image>", "You are a helpful assistant. What shape is it?"])
    return write_gguf(tiny_chat_llama(tokenizer), tokenizer, tmp_path_factory.mktemp("chat_lm") / "tiny-chat.gguf")
