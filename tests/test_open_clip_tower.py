"""An open_clip ViT CLIP as a transformers CLIP tower: same activations; Llava builds, trains and serves on it."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from llava_helpers import llava_args, solid_image, tiny_llama_config
from open_clip.constants import OPENAI_DATASET_MEAN
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, CLIPVisionModel, CLIPVisionModelWithProjection

from llava_uta.model.convert import main as convert_main
from llava_uta.model.llava_builder import build_llava, load_vision_tower
from llava_uta.model.open_clip_tower import convert_open_clip
from llava_uta.serve.chat import ChatSession
from llava_uta.serve.loader import load_pretrained_model
from llava_uta.train.train import train
from pretrain.train_clip import save_local_dir

# a 32 px, patch-8 ViT (4x4 grid, 2 heads of 16) with a 24-dim image embedding; the text tower is never run
TINY = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


def _teacher_dir(root: Path, seed: int = 0, **cfg) -> Path:
    """A local-dir open_clip CLIP with every vision weight perturbed (LayerNorms and q/k/v biases too)."""
    model_cfg = {**TINY, **cfg}
    torch.manual_seed(seed)
    clip = open_clip.CLIP(**model_cfg)
    with torch.no_grad():
        for p in clip.visual.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_local_dir(clip, model_cfg, root)
    return root


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return _teacher_dir(tmp_path_factory.mktemp("open_clip") / "teacher")


@pytest.fixture(scope="module")
def tok(llava_parts) -> Path:
    return llava_parts["tok"]


@pytest.fixture(scope="module")
def tower(tmp_path_factory, teacher) -> Path:
    out = tmp_path_factory.mktemp("open_clip_tower") / "tower"
    convert_main(["--from-open-clip", f"open_clip:local-dir:{teacher}", str(out)])
    return out


@pytest.mark.parametrize(
    ("cfg", "act"),
    [
        ({}, "gelu"),
        ({"quick_gelu": True}, "quick_gelu"),
        ({"vision_cfg": {**TINY["vision_cfg"], "act_kwargs": {"approximate": "tanh"}}}, "gelu_pytorch_tanh"),
    ],
)
def test_converted_tower_matches_open_clip(tmp_path, cfg, act):
    teacher = _teacher_dir(tmp_path / "teacher", seed=1, **cfg)
    out = convert_open_clip(f"open_clip:local-dir:{teacher}", tmp_path / "tower")
    tower = CLIPVisionModelWithProjection.from_pretrained(out).eval()
    config = tower.config
    assert (config.model_type, config.hidden_act, config.layer_norm_eps) == ("clip_vision_model", act, 1e-5)
    assert (config.num_attention_heads, config.intermediate_size, config.projection_dim) == (2, 64, 24)

    visual = open_clip.create_model(f"local-dir:{teacher}").visual.eval()
    captured = []
    visual.transformer.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = tower(x, output_hidden_states=True)
        ref = visual.forward_intermediates(x, output_fmt="NLC", output_extra_tokens=True)
        visual.output_tokens = True
        pooled, tokens = visual(x)
    blocks = [torch.cat([cls, patches], 1) for cls, patches in
              zip(ref["image_intermediates_prefix"], ref["image_intermediates"], strict=True)]
    assert len(ours.hidden_states) == 3
    for hf, oc in zip(ours.hidden_states, [captured[0], *blocks], strict=True):  # embeddings, then every block
        torch.testing.assert_close(hf, oc, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.image_embeds, pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.image_embeds, ref["image_features"], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        final_tokens = tower.vision_model.post_layernorm(ours.last_hidden_state[:, 1:])
    torch.testing.assert_close(final_tokens, tokens, atol=1e-5, rtol=1e-5)


def test_folder_loads_as_llava_s_clip_vision_model_with_the_open_clip_preprocessing(tmp_path, teacher, tower):
    vision = load_vision_tower(str(tower))
    assert type(vision) is CLIPVisionModel
    reference = CLIPVisionModelWithProjection.from_pretrained(tower).vision_model.state_dict()
    assert vision.state_dict().keys() == reference.keys()
    assert all(torch.equal(v, reference[k]) for k, v in vision.state_dict().items())
    processor = json.loads((tower / "preprocessor_config.json").read_text())
    assert processor["crop_size"] == {"height": 32, "width": 32} and processor["size"] == {"shortest_edge": 32}
    assert processor["resample"] == 3 and processor["image_mean"] == pytest.approx(list(OPENAI_DATASET_MEAN))

    custom = _teacher_dir(tmp_path / "custom")  # the processor follows the open_clip config, not a default
    config = json.loads((custom / "open_clip_config.json").read_text())
    config["preprocess_cfg"].update(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], interpolation="bilinear")
    (custom / "open_clip_config.json").write_text(json.dumps(config))
    convert_main(["--from-open-clip", str(custom), str(tmp_path / "custom_tower")])  # a bare open_clip folder
    processor = AutoImageProcessor.from_pretrained(tmp_path / "custom_tower")
    assert (list(processor.image_mean), list(processor.image_std)) == ([0.5] * 3, [0.25] * 3)
    assert processor.resample == 2  # bilinear


def test_named_model_with_a_local_weights_file(tmp_path, tower):
    (tmp_path / "uta-test-vit.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(tmp_path / "uta-test-vit.json")
    torch.manual_seed(2)
    torch.save(open_clip.create_model("uta-test-vit").state_dict(), tmp_path / "weights.pt")
    convert_main(["--from-open-clip", f"open_clip:uta-test-vit@{tmp_path / 'weights.pt'}", str(tmp_path / "tower")])
    with pytest.warns(FutureWarning) as warned:  # the last release's spelling: the same tower, and warnings
        convert_main(["--from-open-clip", "uta-test-vit", "--open-clip-pretrained", str(tmp_path / "weights.pt"),
                      str(tmp_path / "old")])
    new_spelling = f"write --from-open-clip open_clip:uta-test-vit@{tmp_path / 'weights.pt'} "
    assert any(new_spelling in str(w.message) for w in warned)
    clip = open_clip.create_model("uta-test-vit", pretrained=str(tmp_path / "weights.pt")).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for tower in ("tower", "old"):
            embeds = CLIPVisionModelWithProjection.from_pretrained(tmp_path / tower)(x).image_embeds
            torch.testing.assert_close(embeds, clip.encode_image(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="only read from local files"):
        convert_open_clip("open_clip:uta-test-vit@openai", tmp_path / "x")  # a tag would download
    with pytest.raises(SystemExit):
        convert_main(["--from-open-clip", "open_clip:uta-test-vit", "--to", "official", str(tmp_path / "y")])


@pytest.mark.parametrize("select_feature", ["patch", "cls_patch"])
def test_llava_on_the_converted_tower(tok, tower, select_feature):
    tokenizer = AutoTokenizer.from_pretrained(tok)
    torch.manual_seed(0)
    model = build_llava(tiny_llama_config(tokenizer), str(tower), tokenizer, select_feature=select_feature).eval()
    n_tokens = 16 + (select_feature == "cls_patch")  # the 4x4 grid (+ CLS)
    assert isinstance(model.model.vision_tower, CLIPVisionModel) and model.config.image_seq_length == n_tokens
    assert model.model.multi_modal_projector.linear_1.in_features == 32
    image = Image.new("RGB", (40, 48), (200, 30, 30))
    pixels = AutoImageProcessor.from_pretrained(tower)(images=image, return_tensors="pt")["pixel_values"]
    ids = torch.tensor([[tokenizer.bos_token_id, *[model.config.image_token_id] * n_tokens, 5, 6, 7]])
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels)
    assert pixels.shape == (1, 3, 32, 32) and out.logits.shape == (1, n_tokens + 4, len(tokenizer))
    assert [f.shape for f in out.image_outputs.pooler_output] == [(n_tokens, 64)]


def test_llava_trains_and_serves_on_the_converted_tower(tmp_path, llava_parts, tower):
    parts = {**llava_parts, "tower": tower}
    train(llava_args(parts, tmp_path / "stage1", stage=1, max_steps=1))
    adapter = tmp_path / "stage1" / "mm_projector.bin"
    train(llava_args(parts, tmp_path / "stage2", stage=2, max_steps=1, pretrain_mm_mlp_adapter=adapter))
    solid_image(tmp_path / "red.png", "red")
    for folder, base in ((tmp_path / "stage1", parts["lm"]), (tmp_path / "stage2", None)):
        loaded = load_pretrained_model(folder, base, device="cpu")
        assert isinstance(loaded.model.model.vision_tower, CLIPVisionModel)
        answer = ChatSession(loaded, image=Image.open(tmp_path / "red.png")).answer("What is it?", max_new_tokens=3)
        assert isinstance(answer, str)


@pytest.mark.parametrize(
    ("vision_cfg", "reasons"),
    [
        ({"attentional_pool": True, "attn_pooler_queries": 4, "attn_pooler_heads": 2}, ["attentional pooling"]),
        ({"pool_type": "avg"}, ["pool_type 'avg'"]),
        ({"ls_init_value": 0.1, "no_ln_pre": True}, ["layer scale (ls_init_value)", "no LayerNorm before"]),
        ({"qk_norm": True}, ["custom attention blocks"]),
        ({"layers": [1, 1, 1, 1], "width": 8, "head_width": 8}, ["is a ModifiedResNet"]),
    ],
)
def test_unsupported_open_clip_models_are_refused(tmp_path, vision_cfg, reasons):
    root = _teacher_dir(tmp_path / "odd", vision_cfg={**TINY["vision_cfg"], **vision_cfg})
    with pytest.raises(ValueError, match="cannot be converted to a transformers CLIP vision tower") as error:
        convert_open_clip(f"open_clip:local-dir:{root}", tmp_path / "tower")
    message = str(error.value)
    assert message.startswith(f"open_clip:local-dir:{root} ") and all(reason in message for reason in reasons), message
    assert not (tmp_path / "tower").exists()


def test_preprocessing_without_a_clip_image_processor_twin_is_refused(tmp_path):
    root = _teacher_dir(tmp_path / "squash")
    config = json.loads((root / "open_clip_config.json").read_text())
    config["preprocess_cfg"]["resize_mode"] = "squash"
    (root / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="resize_mode 'squash'"):
        convert_open_clip(f"open_clip:local-dir:{root}", tmp_path / "tower")
