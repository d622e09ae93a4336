"""Conversation templates: the exact strings LLaVA renders (docs/llava.md#conversation-templates), the label spans."""

from __future__ import annotations

import pytest

from llava_uta.conversation import SeparatorStyle, conv_templates, generation_prompt, get_template

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)
TURNS = ["<image>\nWhat is this?", "A cat.", "Color?", "Orange."]


def _conv(version: str, turns: list[str | None]):
    conv = get_template(version)
    for i, message in enumerate(turns):
        conv.append_message(conv.roles[i % 2], message)
    return conv


@pytest.mark.parametrize(
    ("version", "system"), [("v1", VICUNA_SYSTEM), ("vicuna_v1", VICUNA_SYSTEM), ("llava_v1", LLAVA_SYSTEM)]
)
def test_v1_strings(version, system):
    assert _conv(version, TURNS).get_prompt() == (
        f"{system} USER: <image>\nWhat is this? ASSISTANT: A cat.</s>USER: Color? ASSISTANT: Orange.</s>"
    )
    assert _conv(version, [*TURNS[:3], None]).get_prompt() == (
        f"{system} USER: <image>\nWhat is this? ASSISTANT: A cat.</s>USER: Color? ASSISTANT:"
    )
    assert generation_prompt(version, TURNS[:1]) == f"{system} USER: <image>\nWhat is this? ASSISTANT:"
    assert get_template(version).stop_str == "</s>"


def test_llava_llama_2_strings():
    prefix = f"[INST] <<SYS>>\n{LLAMA_2_SYSTEM}\n<</SYS>>\n\n<image>\nWhat is this? [/INST]"
    assert _conv("llava_llama_2", TURNS).get_prompt() == (prefix + " A cat. </s><s>[INST] Color? [/INST] Orange. </s>")
    assert generation_prompt("llava_llama_2", TURNS[:1]) == prefix


def test_plain_is_image_plus_caption():
    """LLaVA's preprocess_plain: the instruction is dropped, the sample is <image> + caption + newline."""
    assert _conv("plain", ["Describe it.\n<image>", "a red circle."]).get_prompt() == "<image>a red circle.\n"
    assert generation_prompt("plain", ["<image>\nDescribe it."]) == "<image>"
    assert get_template("plain").stop_str == "\n"


@pytest.mark.parametrize("version", sorted(conv_templates))
def test_spans_cover_exactly_the_answers_and_their_separator(version):
    conv = _conv(version, TURNS if version != "plain" else TURNS[:2])
    prompt, spans = conv.render()
    answers = [prompt[a:b] for a, b in spans]
    if version == "plain":
        assert answers == ["A cat.\n"]
    elif conv.sep_style == SeparatorStyle.CHATML:  # after "<|im_start|>assistant\n", up to <|im_end|>
        assert answers == [answer + "<|im_end|>" for answer in ("A cat.", "Orange.")]
    else:  # the span starts where the generation prompt ends ("ASSISTANT:" / "[/INST]")
        closing = conv.stop_str if version != "llava_llama_2" else " </s>"
        assert answers == [" " + answer + closing for answer in ("A cat.", "Orange.")]


def test_turn_order_and_copies_are_checked():
    conv = get_template("v1")
    with pytest.raises(ValueError, match="not one of"):
        conv.append_message("HUMAN", "hi")
    conv.append_message("ASSISTANT", "hi")
    with pytest.raises(ValueError, match="alternate"):
        conv.get_prompt()
    assert get_template("v1").messages == [] and get_template("llava_v1").messages == []
    with pytest.raises(ValueError, match="unknown conversation template"):
        get_template("v0")
    with pytest.raises(ValueError, match="odd number"):
        generation_prompt("v1", TURNS[:2])


def test_chatml_is_the_tokenizers_own_chat_template_with_the_same_system_turn():
    """`chatml` (LLaVA-NeXT's qwen_1_5) renders what a ChatML tokenizer's apply_chat_template renders for the same
    turns, system turn included; answers end with <|im_end|>, where generation stops."""
    from gguf_helpers import chat_tokenizer

    tokenizer = chat_tokenizer(["What is this? A cat."] * 10)
    conv = _conv("chatml", TURNS)
    roles = ["user", "assistant"] * 2
    messages = [{"role": "system", "content": conv.system}] + [
        {"role": role, "content": text} for role, text in zip(roles, TURNS, strict=True)]
    assert conv.get_prompt() == tokenizer.apply_chat_template(messages, tokenize=False)
    assert generation_prompt("chatml", TURNS[:3]) == tokenizer.apply_chat_template(
        messages[:4], tokenize=False, add_generation_prompt=True)
    assert get_template("chatml").stop_str == "<|im_end|>" and conv_templates["qwen_1_5"] is conv_templates["chatml"]
