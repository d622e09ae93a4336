"""The transformers vision tower: Llava contract, save/load in a fresh process, the converter CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModel, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from llava_uta.model.checkpoint import save_uta_vit
from llava_uta.model.convert import main as convert_main
from llava_uta.model.hf_vision import UTAVisionConfig, UTAVisionModel
from llava_uta.model.official import load_official_checkpoint
from llava_uta.model.uta_vit import build_uta_vit

IMAGE_TOKEN = 250


def _llava(vision_config: UTAVisionConfig, **kwargs) -> LlavaForConditionalGeneration:
    text = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(
        LlavaConfig(vision_config=vision_config, text_config=text, image_token_id=IMAGE_TOKEN, **kwargs)
    ).eval()


def _prompt(n_image_tokens: int, batch: int = 2) -> torch.Tensor:
    text = torch.randint(3, 200, (batch, 5), generator=torch.Generator().manual_seed(0))
    return torch.cat(
        [torch.ones(batch, 1, dtype=torch.long), torch.full((batch, n_image_tokens), IMAGE_TOKEN), text], 1
    )


@pytest.fixture(scope="module")
def tower() -> UTAVisionModel:
    torch.manual_seed(0)
    return UTAVisionModel.from_vit(build_uta_vit("uta_test_p8_32")).eval()


def test_config_round_trip_and_auto_registration(tower):
    cfg = tower.config
    assert cfg.to_vit_config() == tower.vit.cfg
    assert isinstance(AutoConfig.for_model("uta_vision"), UTAVisionConfig)
    assert type(AutoModel.from_config(cfg)) is UTAVisionModel
    assert tower.patch_size == 8 and cfg.hidden_size == 32 and UTAVisionModel._supports_sdpa


@pytest.mark.parametrize("request_", [None, True, -1, -2, [-2, -1]])
def test_llava_style_calls_return_indexable_hidden_states(tower, request_):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = tower(x, output_hidden_states=request_, return_dict=True, image_sizes=None)
        reference = tower.vit(x)
    assert len(out.hidden_states) == 3 and out.hidden_states[-2].shape == (2, 17, 32)
    for ours, ref in zip(out.hidden_states, reference.hidden_states, strict=True):
        torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(out.last_hidden_state, out.hidden_states[-1])
    torch.testing.assert_close(out.pooler_output, reference.features[:, 0])  # the CLIP image embedding


@pytest.mark.parametrize(
    ("layer", "strategy", "n_tokens", "proj_in"),
    [(-2, "default", 16, 32), (-1, "full", 17, 32), ([-2, -1], "default", 16, 64)],
)
def test_llava_forward_with_the_uta_tower(tower, layer, strategy, n_tokens, proj_in):
    llava = _llava(tower.config, vision_feature_layer=layer, vision_feature_select_strategy=strategy)
    assert isinstance(llava.model.vision_tower, UTAVisionModel)
    assert llava.model.multi_modal_projector.linear_1.in_features == proj_in
    ids = _prompt(n_tokens)
    out = llava(input_ids=ids, pixel_values=torch.randn(2, 3, 32, 32), labels=ids.masked_fill(ids == IMAGE_TOKEN, -100))
    assert out.logits.shape == (2, ids.shape[1], 256) and torch.isfinite(out.loss)
    assert [f.shape for f in out.image_outputs.pooler_output] == [(n_tokens, 64)] * 2
    out.loss.backward()
    assert llava.model.vision_tower.vit.blocks[0].attn.q_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="do not match"):
        llava(input_ids=_prompt(n_tokens - 1), pixel_values=torch.randn(2, 3, 32, 32))


def test_gradient_checkpointing_switch(tower):
    tower.activation_checkpointing_enable()
    assert tower.vit.grad_checkpointing
    tower.activation_checkpointing_disable()
    assert not tower.vit.grad_checkpointing


def test_converter_and_fresh_process_round_trip(tmp_path, official_checkpoint):
    """Convert an official checkpoint and a student; reload both towers and a Llava model in a new process."""
    convert_main([str(official_checkpoint), str(tmp_path / "official_tower")])
    torch.manual_seed(1)
    student = build_uta_vit("uta_test_p8_32")
    save_uta_vit(student, tmp_path / "student.safetensors")
    convert_main([str(tmp_path / "student.safetensors"), str(tmp_path / "student_tower")])
    processor_cfg = json.loads((tmp_path / "official_tower" / "preprocessor_config.json").read_text())
    assert processor_cfg["crop_size"] == {"height": 32, "width": 32} and processor_cfg["resample"] == 3  # bicubic
    assert processor_cfg["image_mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    image.save(tmp_path / "image.png")
    llava = _llava(UTAVisionConfig.from_vit_config(student.cfg), vision_feature_layer=-2)
    llava.model.vision_tower.vit.load_state_dict(student.state_dict())
    llava.save_pretrained(tmp_path / "llava")
    ids = _prompt(16, batch=1)
    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent(f"""
        import torch, llava_uta.model
        from PIL import Image
        from safetensors.torch import save_file
        from transformers import AutoImageProcessor, AutoModel, LlavaForConditionalGeneration
        root = {str(tmp_path)!r}
        out = {{}}
        for name in ("official_tower", "student_tower"):
            proc = AutoImageProcessor.from_pretrained(f"{{root}}/{{name}}")
            pixels = proc(images=Image.open(f"{{root}}/image.png"), return_tensors="pt")["pixel_values"]
            tower = AutoModel.from_pretrained(f"{{root}}/{{name}}").eval()
            with torch.no_grad():
                out[name] = tower(pixels).pooler_output
            out[name + "_pixels"] = pixels
        llava = LlavaForConditionalGeneration.from_pretrained(f"{{root}}/llava").eval()
        with torch.no_grad():
            ids, pixels = torch.load(f"{{root}}/ids.pt"), out["student_tower_pixels"]
            out["llava"] = llava(input_ids=ids, pixel_values=pixels).logits
        save_file(out, f"{{root}}/fresh.safetensors")
    """)
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    from safetensors.torch import load_file

    fresh = load_file(tmp_path / "fresh.safetensors")
    assert fresh["official_tower_pixels"].shape == (1, 3, 32, 32)
    with torch.no_grad():
        official = load_official_checkpoint(official_checkpoint).encode_image(fresh["official_tower_pixels"])
        student_embedding = student.eval().encode_image(fresh["student_tower_pixels"])
        logits = llava(input_ids=ids, pixel_values=fresh["student_tower_pixels"]).logits
    torch.testing.assert_close(fresh["official_tower"], official, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fresh["student_tower"], student_embedding, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fresh["llava"], logits, atol=1e-6, rtol=1e-6)


def test_frozen_tower_with_drop_path_stays_deterministic_when_llava_trains():
    """The Trainer calls model.train(): a frozen tower built with drop-path must still give its eval-mode features."""
    vit_cfg = build_uta_vit("uta_test_p8_32", drop_path_rate=0.1).cfg  # 2 blocks: drop-path 0 then 0.1
    llava = _llava(UTAVisionConfig.from_vit_config(vit_cfg), vision_feature_layer=-1)  # the block that drops
    tower = llava.model.vision_tower
    assert tower.config.drop_path_rate == 0.1
    tower.requires_grad_(False)  # what build_llava and the trainer do
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = torch.cat(llava.get_image_features(pixel_values=x).pooler_output)  # llava is in eval mode
        llava.train()
        first = torch.cat(llava.get_image_features(pixel_values=x).pooler_output)
        second = torch.cat(llava.get_image_features(pixel_values=x).pooler_output)
    torch.testing.assert_close(first, reference, rtol=0, atol=0)
    torch.testing.assert_close(second, reference, rtol=0, atol=0)
    assert not tower.training and not any(m.training for m in tower.modules())
    assert llava.training and llava.model.multi_modal_projector.training  # the rest of the model does train
    tower.requires_grad_(True)  # a tower that trains gets its drop-path back
    llava.train()
    assert tower.training and tower.vit.blocks[1].drop_path1.training
