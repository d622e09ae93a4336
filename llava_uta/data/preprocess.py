"""LLaVA conversations to model inputs: turn checks, template rendering, tokens, and loss masks.

The prompt is rendered once by `llava_uta.conversation` and tokenized in one piece, exactly as at generation
time; a token is supervised when its characters overlap an answer span the template reports (the answer and its
closing separator, e.g. `</s>` for v1). That replaces LLaVA's per-round length arithmetic, which silently masks
whole samples when a tokenizer splits differently ("tokenization mismatch", docs/llava.md#known-pitfalls).
A prompt starts with the tokenizer's BOS token (`conversation.with_bos`), as at generation time. Each `<image>` is one
added special token; before tokenizing, each is replaced by the text the model's processor puts
in its place (the tower's number of image tokens, as transformers' Llava expects, with grid tags the text tags between
them), so that training tokenizes the prompt exactly as generation does.
"""

from __future__ import annotations

from dataclasses import dataclass

from llava_uta.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX
from llava_uta.conversation import Conversation, SeparatorStyle, with_bos

ROLES = ("human", "gpt")


class BadSampleError(ValueError):
    """A training sample that cannot be used; the message names the sample id (and image file)."""


@dataclass
class TokenizedSample:
    input_ids: list[int]
    labels: list[int]


def build_conversation(turns: list[dict], template: Conversation, has_image: bool) -> Conversation:
    """Check a LLaVA `conversations` list and fill a copy of `template` with it (`<image>` moved to the front)."""
    if not isinstance(turns, list) or not turns:
        raise ValueError("'conversations' must be a non-empty list of turns")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ValueError(f"turn {i} must be a dict with a string 'value'")
        if turn.get("from") != ROLES[i % 2]:
            raise ValueError(f"turn {i} is from {turn.get('from')!r}, expected {ROLES[i % 2]!r} (human, gpt, ...)")
    if len(turns) % 2:
        raise ValueError("the conversation ends with a human turn: there is no answer to learn")
    if template.sep_style == SeparatorStyle.PLAIN and len(turns) != 2:
        raise ValueError(f"the plain template takes one human and one gpt turn, got {len(turns)} turns")
    counts = [turn["value"].count(DEFAULT_IMAGE_TOKEN) for turn in turns]
    if has_image and (counts[0] != 1 or sum(counts) != 1):
        raise ValueError(f"a sample with an image needs exactly one {DEFAULT_IMAGE_TOKEN} in its first human turn")
    if not has_image and sum(counts):
        raise ValueError(f"{DEFAULT_IMAGE_TOKEN} in a sample without an 'image'")

    conv = template.copy()
    for i, turn in enumerate(turns):
        value = turn["value"]
        if i == 0 and has_image:
            value = DEFAULT_IMAGE_TOKEN + "\n" + value.replace(DEFAULT_IMAGE_TOKEN, "").strip()
        conv.append_message(conv.roles[i % 2], value)
    return conv


def expand_images(prompt: str, spans: list[tuple[int, int]], image_text: str) -> tuple[str, list[tuple[int, int]]]:
    """The prompt with each `<image>` replaced by `image_text`, and the answer spans moved with it."""
    growth = len(image_text) - len(DEFAULT_IMAGE_TOKEN)
    moved = [(a + growth * prompt[:a].count(DEFAULT_IMAGE_TOKEN), b + growth * prompt[:b].count(DEFAULT_IMAGE_TOKEN))
             for a, b in spans]
    return prompt.replace(DEFAULT_IMAGE_TOKEN, image_text), moved


def tokenize_conversation(
    conv: Conversation, tokenizer, image_token_id: int, image_text: str, max_length: int
) -> TokenizedSample:
    """Token ids with each `<image>` expanded to `image_text`, and labels (IGNORE_INDEX off the answers)."""
    rendered, rendered_spans = conv.render()
    led = with_bos(rendered, tokenizer)
    shift = len(led) - len(rendered)
    rendered, rendered_spans = led, [(a + shift, b + shift) for a, b in rendered_spans]
    prompt, spans = expand_images(rendered, rendered_spans, image_text)
    encoding = tokenizer(prompt, return_offsets_mapping=True)
    input_ids: list[int] = encoding["input_ids"]
    labels = [token if end > start and any(start < b and end > a for a, b in spans) else IGNORE_INDEX
              for token, (start, end) in zip(input_ids, encoding["offset_mapping"], strict=True)]
    expected = rendered.count(DEFAULT_IMAGE_TOKEN) * image_text.count(DEFAULT_IMAGE_TOKEN)
    if input_ids.count(image_token_id) != expected:
        raise ValueError(f"the tokenizer does not keep {DEFAULT_IMAGE_TOKEN} as the single token {image_token_id}")

    truncated = len(input_ids) > max_length
    if image_token_id in input_ids[max_length:]:
        raise ValueError(f"model_max_length {max_length} would cut the image tokens ({len(input_ids)} tokens)")
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        why = f"after truncation to model_max_length {max_length}" if truncated else "(empty answers?)"
        raise ValueError(f"no supervised token left {why}")
    return TokenizedSample(input_ids, labels)
