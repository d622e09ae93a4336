"""The one chat API: a multi-turn conversation about one image, answered by a loaded LLaVA-UTA model.

    session = ChatSession(load_pretrained_model("checkpoints/llava-uta"), image=Image.open("cat.png"))
    for piece in session.ask("What is in the image?", temperature=0.2):   # streamed
        print(piece, end="", flush=True)
    session.answer("What color is it?", temperature=0)                    # whole answer, greedy

The command-line chat, the web demo and the LLaVA-Bench answerer all talk to the model through this class; it
renders the prompt with the conversation template (the image goes in front of the first question), runs
transformers' `generate` (greedy when temperature == 0), cuts the answer at the template's stop string and
keeps it in the history for the next turn.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from llava_uta.constants import DEFAULT_IMAGE_TOKEN
from llava_uta.conversation import generation_prompt, get_template
from llava_uta.serve.loader import LoadedModel

STREAM_TIMEOUT_S = 600.0  # a generation step slower than this is treated as hung


@dataclass
class GenerationSettings:
    """Sampling settings of one answer; temperature 0 means greedy decoding."""

    temperature: float = 0.2
    top_p: float = 0.7
    max_new_tokens: int = 512

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 1:
            raise ValueError(f"need temperature >= 0, 0 < top_p <= 1 and max_new_tokens >= 1, got {self}")


def final_text(raw: str, stop: str | None) -> str:
    """The answer in decoded model output: up to the stop string, without surrounding whitespace."""
    text = raw.lstrip()
    if stop and stop in text:
        text = text[: text.index(stop)]
    return text.rstrip()


def safe_prefix(raw: str, stop: str | None) -> str:
    """The part of a still-growing output that is certain to begin `final_text` (holds back a partial stop)."""
    text = raw.lstrip()
    if stop and stop in text:
        return final_text(raw, stop)
    text = text.rstrip()
    for k in range(min(len(stop or ""), len(text) + 1) - 1, 0, -1):
        if text.endswith(stop[:k]):
            return text[:-k].rstrip()
    return text


class Cancelled(StoppingCriteria):
    """Stops `generate` once the event is set (from another thread)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@dataclass
class ChatSession:
    """A conversation about (at most) one image; all model logic of serving and evaluation."""

    loaded: LoadedModel
    conv_mode: str | None = None
    image: Image.Image | None = None
    turns: list[str] = field(default_factory=list)  # user, assistant, user, assistant, ...

    def __post_init__(self) -> None:
        self.conv_mode = self.conv_mode or self.loaded.conv_mode
        self.stop = get_template(self.conv_mode).stop_str
        if self.image is not None:
            self.image = self.image.convert("RGB")
        self._cancel = threading.Event()

    def cancel(self) -> None:
        """Stop the answer being streamed (from any thread); what it said so far joins the history."""
        self._cancel.set()

    def reset(self, image: Image.Image | None = None) -> None:
        """Forget the conversation; a new image (if given) replaces the old one."""
        self.turns = []
        if image is not None:
            self.image = image.convert("RGB")

    def prompt(self, question: str) -> str:
        """The full prompt for `question` as the next user turn (the image token goes before the first one)."""
        first = question if self.turns or self.image is None else f"{DEFAULT_IMAGE_TOKEN}\n{question}"
        return generation_prompt(self.conv_mode, [*self._history_with_image(), first])

    def ask(
        self, question: str, temperature: float = 0.2, top_p: float = 0.7, max_new_tokens: int = 512
    ) -> Iterator[str]:
        """Stream the answer to `question` piece by piece; it joins the history once complete."""
        settings = GenerationSettings(temperature, top_p, max_new_tokens)
        return self._stream(question, settings)

    def answer(self, question: str, temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 512) -> str:
        """The whole answer to `question` (greedy by default), added to the history."""
        settings = GenerationSettings(temperature, top_p, max_new_tokens)
        inputs = self._inputs(self.prompt(question))
        with torch.inference_mode():
            output = self.loaded.model.generate(**inputs, **self._generate_kwargs(settings))
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        text = final_text(self.loaded.tokenizer.decode(new_tokens, skip_special_tokens=True), self.stop)
        self.turns += [question, text]
        return text

    def regenerate(self, temperature: float = 0.2, top_p: float = 0.7, max_new_tokens: int = 512) -> Iterator[str]:
        """Drop the last answer and stream a new one to the same question."""
        if not self.turns:
            raise ValueError("nothing to regenerate: the conversation is empty")
        question = self.turns[-2]
        self.turns = self.turns[:-2]
        return self.ask(question, temperature, top_p, max_new_tokens)

    def _history_with_image(self) -> list[str]:
        if not self.turns or self.image is None:
            return list(self.turns)
        return [f"{DEFAULT_IMAGE_TOKEN}\n{self.turns[0]}", *self.turns[1:]]

    def _stream(self, question: str, settings: GenerationSettings) -> Iterator[str]:
        inputs = self._inputs(self.prompt(question))
        streamer = TextIteratorStreamer(
            self.loaded.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=STREAM_TIMEOUT_S
        )
        self._cancel = cancel = threading.Event()
        kwargs = {**self._generate_kwargs(settings), "streamer": streamer,
                  "stopping_criteria": StoppingCriteriaList([Cancelled(cancel)])}
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode():
                    self.loaded.model.generate(**inputs, **kwargs)
            except BaseException as err:  # handed to the consumer below instead of dying silently in the thread
                failure.append(err)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        raw, sent = "", 0
        try:
            for piece in streamer:
                raw += piece
                ready = safe_prefix(raw, self.stop)
                if len(ready) > sent:
                    yield ready[sent:]
                    sent = len(ready)
        finally:  # also when the consumer stops iterating early: generation stops with it
            cancel.set()
            thread.join()
        if failure:
            raise failure[0]
        text = final_text(raw, self.stop)
        if len(text) > sent:
            yield text[sent:]
        self.turns += [question, text]

    def _inputs(self, prompt: str) -> dict[str, torch.Tensor]:
        if self.image is None:
            return to_model(self.loaded.tokenizer(prompt, return_tensors="pt"), self.loaded.model)
        return to_model(self.loaded.processor(images=self.image, text=prompt, return_tensors="pt"), self.loaded.model)

    def _generate_kwargs(self, settings: GenerationSettings) -> dict:
        config = copy.deepcopy(self.loaded.model.generation_config)
        sampling = settings.temperature > 0
        config.update(
            do_sample=sampling,
            temperature=settings.temperature if sampling else 1.0,
            top_p=settings.top_p if sampling else 1.0,
            max_new_tokens=settings.max_new_tokens,
            stop_strings=[self.stop] if self.stop else None,
            pad_token_id=self.loaded.tokenizer.pad_token_id,
        )
        return {"generation_config": config, "tokenizer": self.loaded.tokenizer}


def to_model(inputs, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Processor outputs on the model's device, pixels in its dtype."""
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


def answer_many(
    loaded: LoadedModel,
    pairs: list[tuple[Image.Image, str]],
    conv_mode: str | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 512,
) -> list[str]:
    """Single-turn answers to several (image, question) pairs in one left-padded `generate` call.

    The prompts are exactly those of a fresh ChatSession per pair, so (greedy) answers match `answer()`.
    """
    sessions = [ChatSession(loaded, conv_mode, image) for image, _ in pairs]
    prompts = [session.prompt(question) for session, (_, question) in zip(sessions, pairs, strict=True)]
    tokenizer = loaded.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # new tokens must follow every prompt directly
    try:
        batch = loaded.processor(images=[s.image for s in sessions], text=prompts, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    inputs = to_model(batch, loaded.model)
    settings = GenerationSettings(temperature, top_p, max_new_tokens)
    with torch.inference_mode():
        output = loaded.model.generate(**inputs, **sessions[0]._generate_kwargs(settings))
    texts = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [final_text(text, sessions[0].stop) for text in texts]
