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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from llava_uta.constants import DEFAULT_IMAGE_TOKEN
from llava_uta.conversation import generation_prompt, get_template, with_bos
from llava_uta.serve.loader import LoadedModel

STREAM_TIMEOUT_S = 600.0  # a generation step slower than this is treated as hung


@dataclass
class GenerationSettings:
    """Sampling settings of one answer; temperature 0 means greedy decoding."""

    temperature: float = 0.2
    top_p: float = 0.7
    max_new_tokens: int = 512
    stop: tuple[str, ...] = ()  # more stop strings, besides the template's

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 1:
            raise ValueError(f"need temperature >= 0, 0 < top_p <= 1 and max_new_tokens >= 1, got {self}")


@dataclass
class Completion:
    """What the last answer cost and why it ended ("stop": end of sequence or a stop string; "length": the limit)."""

    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


Stops = str | Sequence[str] | None


def _as_tuple(stop: Stops) -> tuple[str, ...]:
    return (stop,) if isinstance(stop, str) else tuple(s for s in stop or () if s)


def final_text(raw: str, stop: Stops) -> str:
    """The answer in decoded model output: up to the first stop string, without surrounding whitespace."""
    text = raw.lstrip()
    cuts = [text.index(s) for s in _as_tuple(stop) if s in text]
    if cuts:
        text = text[: min(cuts)]
    return text.rstrip()


def safe_prefix(raw: str, stop: Stops) -> str:
    """The part of a still-growing output that is certain to begin `final_text` (holds back a partial stop)."""
    stops = _as_tuple(stop)
    text = raw.lstrip()
    if any(s in text for s in stops):
        return final_text(raw, stops)
    text = text.rstrip()
    held = max((k for s in stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])), default=0)
    return text[: len(text) - held].rstrip() if held else text


class Cancelled(StoppingCriteria):
    """Stops `generate` once the event is set (from another thread)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class Turns:
    """What every chat session shares over its `turns`, its `ask` and its `_cancel` event."""

    def cancel(self) -> None:
        """Stop the answer being streamed (from any thread); what it said so far joins the history."""
        self._cancel.set()

    def regenerate(self, temperature: float = 0.2, top_p: float = 0.7, max_new_tokens: int = 512) -> Iterator[str]:
        """Drop the last answer and stream a new one to the same question."""
        if not self.turns:
            raise ValueError("nothing to regenerate: the conversation is empty")
        question = self.turns[-2]
        self.turns = self.turns[:-2]
        return self.ask(question, temperature, top_p, max_new_tokens)


@dataclass
class ChatSession(Turns):
    """A conversation about (at most) one image; all model logic of serving and evaluation.

    `system` replaces the template's system prompt; `last` says what the latest answer cost and why it ended.
    """

    loaded: LoadedModel
    conv_mode: str | None = None
    image: Image.Image | None = None
    turns: list[str] = field(default_factory=list)  # user, assistant, user, assistant, ...
    system: str | None = None
    last: Completion | None = None

    def __post_init__(self) -> None:
        self.conv_mode = self.conv_mode or self.loaded.conv_mode
        self.stop = get_template(self.conv_mode).stop_str
        if self.image is not None:
            self.image = self.image.convert("RGB")
        self._cancel = threading.Event()
        self._prepared: tuple[str, Image.Image | None, dict[str, torch.Tensor]] | None = None

    def reset(self, image: Image.Image | None = None) -> None:
        """Forget the conversation; a new image (if given) replaces the old one."""
        self.turns = []
        if image is not None:
            self.image = image.convert("RGB")

    def prompt(self, question: str) -> str:
        """The full prompt for `question` as the next user turn (the image token goes before the first one), led by
        the tokenizer's BOS token as in training."""
        first = question if self.turns or self.image is None else f"{DEFAULT_IMAGE_TOKEN}\n{question}"
        prompt = generation_prompt(self.conv_mode, [*self._history_with_image(), first], self.system)
        return with_bos(prompt, self.loaded.tokenizer)

    def prompt_tokens(self, question: str) -> int:
        """How many tokens the model reads for `question` (image tokens included)."""
        return self._inputs(self.prompt(question))["input_ids"].shape[1]

    def ask(
        self,
        question: str,
        temperature: float = 0.2,
        top_p: float = 0.7,
        max_new_tokens: int = 512,
        stop: Sequence[str] = (),
    ) -> Iterator[str]:
        """Stream the answer to `question` piece by piece; it joins the history once complete."""
        settings = GenerationSettings(temperature, top_p, max_new_tokens, tuple(stop))
        return self._stream(question, settings)

    def answer(
        self,
        question: str,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_new_tokens: int = 512,
        stop: Sequence[str] = (),
    ) -> str:
        """The whole answer to `question` (greedy by default), added to the history."""
        settings = GenerationSettings(temperature, top_p, max_new_tokens, tuple(stop))
        inputs = self._inputs(self.prompt(question))
        with torch.inference_mode():
            output = self.loaded.model.generate(**inputs, **self._generate_kwargs(settings))
        raw = self.loaded.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return self._finish(question, raw, inputs, output, settings)

    def _history_with_image(self) -> list[str]:
        if not self.turns or self.image is None:
            return list(self.turns)
        return [f"{DEFAULT_IMAGE_TOKEN}\n{self.turns[0]}", *self.turns[1:]]

    def _stops(self, settings: GenerationSettings) -> tuple[str, ...]:
        return (*_as_tuple(self.stop), *settings.stop)

    def _stream(self, question: str, settings: GenerationSettings) -> Iterator[str]:
        inputs = self._inputs(self.prompt(question))
        streamer = TextIteratorStreamer(
            self.loaded.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=STREAM_TIMEOUT_S
        )
        self._cancel = cancel = threading.Event()
        kwargs = {**self._generate_kwargs(settings), "streamer": streamer,
                  "stopping_criteria": StoppingCriteriaList([Cancelled(cancel)])}
        failure: list[BaseException] = []
        output: list[torch.Tensor] = []

        def run() -> None:
            try:
                with torch.inference_mode():
                    output.append(self.loaded.model.generate(**inputs, **kwargs))
            except BaseException as err:  # handed to the consumer below instead of dying silently in the thread
                failure.append(err)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        raw, sent, stops = "", 0, self._stops(settings)
        try:
            for piece in streamer:
                raw += piece
                ready = safe_prefix(raw, stops)
                if len(ready) > sent:
                    yield ready[sent:]
                    sent = len(ready)
        finally:  # also when the consumer stops iterating early: generation stops with it
            cancel.set()
            thread.join()
        if failure:
            raise failure[0]
        text = self._finish(question, raw, inputs, output[0], settings)
        if len(text) > sent:
            yield text[sent:]

    def _finish(self, question: str, raw: str, inputs, output: torch.Tensor, settings: GenerationSettings) -> str:
        """The answer in `raw`, added to the history with its token counts in `last`."""
        stops = self._stops(settings)
        text = final_text(raw, stops)
        new = output[0, inputs["input_ids"].shape[1] :]
        ended = bool(len(new)) and new[-1].item() in _as_ids(self.loaded.model.generation_config.eos_token_id)
        stopped = ended or any(s in raw for s in stops) or len(new) < settings.max_new_tokens
        self.last = Completion(inputs["input_ids"].shape[1], len(new), "stop" if stopped else "length")
        self.turns += [question, text]
        return text

    def _inputs(self, prompt: str) -> dict[str, torch.Tensor]:
        """The model's inputs for `prompt` and the image; the latest are kept, so counting a prompt's tokens and then
        answering it prepares them once."""
        if self._prepared is not None and self._prepared[0] == prompt and self._prepared[1] is self.image:
            return self._prepared[2]
        if self.image is None:
            inputs = to_model(self.loaded.tokenizer(prompt, return_tensors="pt"), self.loaded.model)
        else:
            inputs = to_model(self.loaded.processor(images=self.image, text=prompt, return_tensors="pt"),
                              self.loaded.model)
        self._prepared = (prompt, self.image, inputs)
        return inputs

    def _generate_kwargs(self, settings: GenerationSettings) -> dict:
        config = copy.deepcopy(self.loaded.model.generation_config)
        sampling = settings.temperature > 0
        stops = self._stops(settings)
        config.update(
            do_sample=sampling,
            temperature=settings.temperature if sampling else 1.0,
            top_p=settings.top_p if sampling else 1.0,
            max_new_tokens=settings.max_new_tokens,
            stop_strings=list(stops) or None,
            pad_token_id=self.loaded.tokenizer.pad_token_id,
        )
        return {"generation_config": config, "tokenizer": self.loaded.tokenizer}


def _as_ids(eos: int | list[int] | None) -> set[int]:
    return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)


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
