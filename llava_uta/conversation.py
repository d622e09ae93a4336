"""Conversation templates rendered to the exact strings LLaVA trains and serves with.

The strings are LLaVA's, to the character (docs/llava.md#conversation-templates).

Plain strings and functions, importable without torch. One renderer serves training and generation:
`Conversation.render()` returns the prompt together with the character spans the loss is computed on: each
assistant answer with the separator that closes it and the space before it (everything the model generates after
a generation prompt), `get_prompt()` returns the prompt alone, and a last
assistant message of `None` leaves the assistant turn open for generation:

    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\\nWhat is this?")
    conv.append_message(conv.roles[1], None)
    conv.get_prompt()  # '<system> USER: <image>\\nWhat is this? ASSISTANT:'
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum

from llava_uta.constants import DEFAULT_IMAGE_TOKEN

CHATML_START = "<|im_start|>"


class SeparatorStyle(Enum):
    TWO = "two"  # "ROLE: message" turns; human turns end with sep, assistant turns with sep2 (vicuna v1)
    LLAMA_2 = "llama_2"  # "[INST] ... [/INST] answer </s>" rounds joined by sep
    PLAIN = "plain"  # captioning: each human turn is reduced to its image, each answer ends with sep
    CHATML = "chatml"  # "<|im_start|>role\nmessage<|im_end|>\n" turns after a system turn (LLaVA-NeXT's qwen_1_5)


@dataclass
class Conversation:
    system: str
    roles: tuple[str, str]
    sep_style: SeparatorStyle
    sep: str
    sep2: str | None = None
    version: str = ""
    messages: list[tuple[str, str | None]] = field(default_factory=list)

    def append_message(self, role: str, message: str | None) -> None:
        if role not in self.roles:
            raise ValueError(f"role {role!r} is not one of {self.roles}")
        self.messages.append((role, message))

    def copy(self) -> Conversation:
        return dataclasses.replace(self, messages=list(self.messages))

    def get_prompt(self) -> str:
        return self.render()[0]

    @property
    def stop_str(self) -> str:
        """The string that ends an assistant answer: where generation stops."""
        return self.sep if self.sep_style in (SeparatorStyle.PLAIN, SeparatorStyle.CHATML) else self.sep2

    def render(self) -> tuple[str, list[tuple[int, int]]]:
        """(prompt, target spans): [start, end) character ranges of what follows each open assistant prompt."""
        self._check_turn_order()
        render = {
            SeparatorStyle.TWO: self._render_two,
            SeparatorStyle.LLAMA_2: self._render_llama_2,
            SeparatorStyle.PLAIN: self._render_plain,
            SeparatorStyle.CHATML: self._render_chatml,
        }[self.sep_style]
        return render()

    def _check_turn_order(self) -> None:
        for i, (role, message) in enumerate(self.messages):
            if role != self.roles[i % 2]:
                raise ValueError(f"turn {i} is from {role!r}, expected {self.roles[i % 2]!r} (turns must alternate)")
            if message is None and i != len(self.messages) - 1:
                raise ValueError(f"turn {i} is empty; only the last (assistant) turn may be left open")
            if message is None and i % 2 == 0:
                raise ValueError("only an assistant turn may be left open")

    def _render_two(self) -> tuple[str, list[tuple[int, int]]]:
        text, spans = self.system + self.sep, []
        for i, (role, message) in enumerate(self.messages):
            text += role + ":"
            start = len(text)
            if message is not None:
                text += " " + message + (self.sep, self.sep2)[i % 2]
            if message is not None and i % 2:
                spans.append((start, len(text)))
        return text, spans

    def _render_llama_2(self) -> tuple[str, list[tuple[int, int]]]:
        text, spans = "", []
        for i, (_, message) in enumerate(self.messages):
            if message is None:
                continue
            if i % 2 == 0:
                if i == 0 and self.system:
                    message = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n" + message
                text += ("" if i == 0 else self.sep) + f"[INST] {message} [/INST]"
            else:
                start = len(text)
                text += " " + message + " " + self.sep2
                spans.append((start, len(text)))
        return text, spans

    def _render_chatml(self) -> tuple[str, list[tuple[int, int]]]:
        text, spans = (f"{CHATML_START}system\n{self.system}{self.sep}\n" if self.system else ""), []
        for i, (role, message) in enumerate(self.messages):
            text += f"{CHATML_START}{role}\n"
            if message is None:
                continue
            start = len(text)
            text += message + self.sep
            if i % 2:
                spans.append((start, len(text)))
            text += "\n"
        return text, spans

    def _render_plain(self) -> tuple[str, list[tuple[int, int]]]:
        text, spans = self.system, []
        for i, (_, message) in enumerate(self.messages):
            if message is None:
                continue
            if i % 2 == 0:
                text += DEFAULT_IMAGE_TOKEN * message.count(DEFAULT_IMAGE_TOKEN)
            else:
                start = len(text)
                text += message + self.sep
                spans.append((start, len(text)))
        return text, spans


conv_vicuna_v1 = Conversation(
    system="A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    roles=("USER", "ASSISTANT"),
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
    version="v1",
)

conv_llava_v1 = dataclasses.replace(
    conv_vicuna_v1,
    messages=[],
    system="A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
)

conv_llava_llama_2 = Conversation(
    system="You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language.",
    roles=("USER", "ASSISTANT"),
    sep_style=SeparatorStyle.LLAMA_2,
    sep="<s>",
    sep2="</s>",
    version="llama_v2",
)

conv_llava_plain = Conversation(system="", roles=("", ""), sep_style=SeparatorStyle.PLAIN, sep="\n", version="plain")

# ChatML as LLaVA-NeXT's qwen_1_5 renders it: equal to the tokenizer's own chat template (SmolLM2, Qwen) given the
# same system turn; an answer ends with <|im_end|>, the token the LM stops at
conv_chatml = Conversation(
    system="You are a helpful assistant.",
    roles=("user", "assistant"),
    sep_style=SeparatorStyle.CHATML,
    sep="<|im_end|>",
    version="chatml",
)

conv_templates: dict[str, Conversation] = {
    "plain": conv_llava_plain,
    "v1": conv_vicuna_v1,
    "vicuna_v1": conv_vicuna_v1,
    "llava_v1": conv_llava_v1,
    "llava_llama_2": conv_llava_llama_2,
    "chatml": conv_chatml,
    "qwen_1_5": conv_chatml,
}


def get_template(version: str) -> Conversation:
    """A fresh copy of the template named by LLaVA's `--version` / `--conv-mode`."""
    if version not in conv_templates:
        raise ValueError(f"unknown conversation template {version!r}; choose one of {sorted(conv_templates)}")
    return conv_templates[version].copy()


def generation_prompt(version: str, turns: list[str], system: str | None = None) -> str:
    """The prompt for the next answer: `turns` alternate user, assistant, ..., and end with a user turn.

    `system` (if given) replaces the template's system prompt.
    """
    if len(turns) % 2 != 1:
        raise ValueError("turns must end with a user turn (an odd number of turns)")
    conv = get_template(version)
    if system is not None:
        conv.system = system
    for i, message in enumerate([*turns, None]):
        conv.append_message(conv.roles[i % 2], message)
    return conv.get_prompt()


def with_bos(prompt: str, tokenizer) -> str:
    """`prompt` led by the tokenizer's BOS token, as LLaVA's prompts are by LLaMA's `<s>`.

    The token is put in front where the tokenizer has one but does not add it itself (SmolLM2's `<|im_start|>`) and
    the prompt does not already start with it (a ChatML prompt does). Without it a `plain` prompt would start with
    the image tokens, in the first position, where LMs keep their attention sink.
    """
    bos = getattr(tokenizer, "bos_token", None)
    if not bos or prompt.startswith(bos) or tokenizer.bos_token_id in tokenizer("")["input_ids"]:
        return prompt
    return bos + prompt
