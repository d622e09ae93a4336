"""LLaVA conversations to model inputs: turn checks, template rendering, tokens, and loss masks.

The prompt is rendered once by `llava_uta.conversation` and tokenized in one piece, exactly as at generation
time; a token is supervised when its characters overlap an answer span the template reports (the answer and its
closing separator, e.g. `</s>` for v1). That replaces LLaVA's per-round length arithmetic, which silently masks
whole samples when a tokenizer splits differently ("tokenization mismatch", docs/llava.md#known-pitfalls).
Each `<image>` is one added special token, expanded here to the tower's number of image tokens, as
transformers' Llava expects (`image_token_id`, `image_seq_length`).
"""

from __future__ import annotations

from dataclasses import dataclass

from llava_uta.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX
from llava_uta.conversation import Conversation, SeparatorStyle

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


def tokenize_conversation(
    conv: Conversation, tokenizer, image_token_id: int, num_image_tokens: int, max_length: int
) -> TokenizedSample:
    """Token ids with each `<image>` expanded to `num_image_tokens`, and labels (IGNORE_INDEX off the answers)."""
    prompt, spans = conv.render()
    encoding = tokenizer(prompt, return_offsets_mapping=True)
    input_ids: list[int] = []
    labels: list[int] = []
    image_starts: list[int] = []
    for token, (start, end) in zip(encoding["input_ids"], encoding["offset_mapping"], strict=True):
        if token == image_token_id:
            image_starts.append(len(input_ids))
            input_ids += [token] * num_image_tokens
            labels += [IGNORE_INDEX] * num_image_tokens
            continue
        supervised = end > start and any(start < b and end > a for a, b in spans)
        input_ids.append(token)
        labels.append(token if supervised else IGNORE_INDEX)
    if len(image_starts) != prompt.count(DEFAULT_IMAGE_TOKEN):
        raise ValueError(f"the tokenizer does not keep {DEFAULT_IMAGE_TOKEN} as the single token {image_token_id}")

    truncated = len(input_ids) > max_length
    if any(start + num_image_tokens > max_length for start in image_starts):
        raise ValueError(f"model_max_length {max_length} would cut the image tokens ({len(input_ids)} tokens)")
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        why = f"after truncation to model_max_length {max_length}" if truncated else "(empty answers?)"
        raise ValueError(f"no supervised token left {why}")
    return TokenizedSample(input_ids, labels)
