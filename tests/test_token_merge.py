"""The token-merging projector (`pixel_shuffleF_mlp2x_gelu`): neighbourhoods, the `llava_merge` model's save/load
round trip, LLaVA's mm_projector.bin, the processor's token count, grid tags, and stage 1 + 2 + chat on a tiny
ChatML LM."""

from __future__ import annotations

import pytest
import torch
from llava_helpers import llava_args, solid_image, tiny_llama_config, tiny_tower_config
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from llava_uta.conversation import get_template
from llava_uta.data.preprocess import build_conversation, tokenize_conversation
from llava_uta.model.llava_builder import build_llava
from llava_uta.model.merge_llava import LlavaMergeForConditionalGeneration
from llava_uta.model.processors import LlavaGridTagProcessor, clip_image_processor, image_text, make_processor
from llava_uta.model.projector import (
    load_llava_projector,
    merge_factor,
    pixel_shuffle,
    projector_to_llava,
)
from llava_uta.serve.chat import ChatSession
from llava_uta.serve.loader import load_pretrained_model
from llava_uta.train.train import train


def test_each_merged_token_is_its_block_of_neighbouring_patches_in_reading_order():
    grid, dim = 4, 3
    patches = torch.arange(grid * grid).float()[None, :, None] * torch.tensor([1.0, 10.0, 100.0])  # (1, 16, 3)
    merged = pixel_shuffle(patches, 2)
    assert merged.shape == (1, 4, 4 * dim)
    for token, (row, col) in enumerate((r, c) for r in range(2) for c in range(2)):
        block = [(2 * row + a) * grid + 2 * col + b for a in range(2) for b in range(2)]
        assert merged[0, token].tolist() == patches[0, block].reshape(-1).tolist()
    assert torch.equal(pixel_shuffle(patches, 4)[0, 0], patches[0].reshape(-1))  # one token: the whole grid
    assert torch.equal(pixel_shuffle(patches, 1), patches)
    with pytest.raises(ValueError, match="divisible by 3"):
        pixel_shuffle(patches, 3)
    assert merge_factor("pixel_shuffle4_mlp2x_gelu") == 4 and merge_factor("mlp2x_gelu") == 1
    for bad in ("pixel_shuffle_mlp", "pixel_shuffle1_mlp2x_gelu"):  # F = 1 merges nothing: that is mlp2x_gelu
        with pytest.raises(ValueError, match="pixel_shuffleF_mlp2x_gelu"):
            merge_factor(bad)


@pytest.fixture(scope="module")
def merged_model(llava_parts):
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(llava_parts["lm"])
    model = build_llava(tiny_llama_config(tokenizer), tiny_tower_config(), tokenizer, "pixel_shuffle2_mlp2x_gelu")
    return model.eval(), tokenizer


def test_a_merging_llava_has_a_quarter_of_the_image_tokens_and_round_trips(merged_model, tmp_path):
    model, tokenizer = merged_model
    assert isinstance(model, LlavaMergeForConditionalGeneration) and model.config.model_type == "llava_merge"
    assert model.config.image_seq_length == 4  # 4x4 patches merged 2x2
    assert model.model.multi_modal_projector.linear_1.in_features == 4 * 32
    processor = make_processor(model, tokenizer, clip_image_processor(32), "square")
    image = Image.new("RGB", (32, 32), (200, 40, 40))
    inputs = processor(images=image, text="<image>\nWhat is it?", return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 4
    with torch.no_grad():
        logits = model(**inputs).logits
    model.save_pretrained(tmp_path / "llava")
    processor.save_pretrained(tmp_path / "llava")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "llava").eval()
    assert type(reloaded) is LlavaMergeForConditionalGeneration
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, logits, rtol=0, atol=0)
    state = projector_to_llava(model.model.multi_modal_projector, "pixel_shuffle2_mlp2x_gelu")
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "model.mm_projector.0.weight": (64, 128), "model.mm_projector.0.bias": (64,),
        "model.mm_projector.2.weight": (64, 64), "model.mm_projector.2.bias": (64,)}
    load_llava_projector(reloaded.model.multi_modal_projector, state, "pixel_shuffle2_mlp2x_gelu")
    with pytest.raises(ValueError, match="shape"):
        load_llava_projector(reloaded.model.multi_modal_projector,
                             projector_to_llava(model.model.multi_modal_projector, "pixel_shuffle2_mlp2x_gelu")
                             | {"model.mm_projector.0.weight": torch.zeros(64, 32)}, "pixel_shuffle2_mlp2x_gelu")


def test_grid_tags_name_each_merged_token_and_training_expands_image_as_the_processor(llava_parts, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(llava_parts["lm"])
    model = build_llava(tiny_llama_config(tokenizer), tiny_tower_config(), tokenizer, "pixel_shuffle2_mlp2x_gelu",
                        grid_tags=True)
    assert model.config.mm_grid_tags and model.config.image_seq_length == 4
    processor = make_processor(model, tokenizer, clip_image_processor(32), "square")
    assert type(processor) is LlavaGridTagProcessor
    image_id = model.config.image_token_id
    assert image_text(processor) == (
        "<row_1_col_1><image><row_1_col_2><image>\n<row_2_col_1><image><row_2_col_2><image>\n")
    # a training sample's prompt part is what the processor makes of the same rendered prompt
    conv = build_conversation([{"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": "A cat."}],
                              get_template("v1"), has_image=True)
    sample = tokenize_conversation(conv, tokenizer, image_id, image_text(processor), 512)
    conv.messages[-1] = (conv.messages[-1][0], None)
    prompt = conv.get_prompt()
    inputs = processor(images=Image.new("RGB", (32, 32)), text=prompt, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == sample.input_ids[: inputs["input_ids"].shape[1]]
    assert (inputs["input_ids"] == image_id).sum() == 4
    processor.save_pretrained(tmp_path / "processor")
    reloaded = AutoProcessor.from_pretrained(tmp_path / "processor")
    assert type(reloaded) is LlavaGridTagProcessor and image_text(reloaded) == image_text(processor)
    with pytest.raises(ValueError, match="mm_grid_tags"):
        build_llava(tiny_llama_config(tokenizer), tiny_tower_config(), tokenizer, "mlp2x_gelu",
                    select_feature="cls_patch", grid_tags=True)


def test_merging_needs_patch_tokens_only(llava_parts):
    tokenizer = AutoTokenizer.from_pretrained(llava_parts["lm"])
    with pytest.raises(ValueError, match="select_feature patch"):
        build_llava(tiny_llama_config(tokenizer), tiny_tower_config(), tokenizer, "pixel_shuffle2_mlp2x_gelu",
                    select_feature="cls_patch")
    with pytest.raises(ValueError, match="cannot be merged in 3x3"):
        build_llava(tiny_llama_config(tokenizer), tiny_tower_config(), tokenizer, "pixel_shuffle3_mlp2x_gelu")


@pytest.mark.parametrize("grid_tags", [False, True])
def test_stages_1_and_2_and_chat_on_a_chatml_gguf_lm_with_merged_tokens(llava_parts, chat_gguf, tmp_path, grid_tags):
    """The embedded default's path on tiny parts: an LM from a GGUF file, the chatml template, 2x2-merged tokens
    (with and without grid tags, which every folder kind keeps)."""
    parts = {**llava_parts, "lm": chat_gguf}
    projector = {"projector": "pixel_shuffle2_mlp2x_gelu", "mm_grid_tags": grid_tags}
    stage1 = train(llava_args(parts, tmp_path / "stage1", stage=1, **projector))
    adapter = tmp_path / "stage1" / "mm_projector.bin"
    stage2 = train(llava_args(parts, tmp_path / "stage2", stage=2, version="chatml", pretrain_mm_mlp_adapter=adapter,
                              **projector))
    for trainer in (stage1, stage2):
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        assert len(losses) == 4 and losses[-1] < losses[0]
    solid_image(tmp_path / "red.png", "red")
    for folder, base in ((tmp_path / "stage2", None), (tmp_path / "stage1", chat_gguf)):
        loaded = load_pretrained_model(folder, base, device="cpu")
        assert type(loaded.model) is LlavaMergeForConditionalGeneration
        assert loaded.model.config.image_seq_length == 4
        assert (type(loaded.processor) is LlavaGridTagProcessor) == grid_tags
        session = ChatSession(loaded, image=Image.open(tmp_path / "red.png"))
        answer = session.answer("What is it?", max_new_tokens=6)
        assert isinstance(answer, str) and "<|im_end|>" not in answer
    assert load_pretrained_model(tmp_path / "stage2", device="cpu").conv_mode == "chatml"
    assert load_pretrained_model(tmp_path / "stage1", chat_gguf, device="cpu").conv_mode == "plain"
