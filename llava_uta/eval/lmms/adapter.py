"""`--model llava_uta`: an lmms-eval model that answers through the project's chat API.

    python -m lmms_eval --model llava_uta \\
        --model_args pretrained=checkpoints/llava-uta-lora,model_base=lmsys/vicuna-7b-v1.5 --tasks pope

Model arguments (`--model_args k=v,...`): `pretrained` (required) is any folder `llava_uta.serve.loader` loads
(stage 2, LoRA, stage 1); `model_base` its base LLM (LoRA / stage 1; default: from its config.json); `device`,
`dtype`, `conv_mode`, `image_aspect_ratio` (stage-1 folders only) as in `llava-uta-chat`; `batch_size` (or
lmms-eval's `--batch_size`) questions per `generate` call; `multi_image`: what to do with a document that has several
images: `error` (default) or `middle` (answer about the middle one, LLaVA's convention for SEED-Bench video
questions).

Request types: `generate_until` (also what `generate_until_agentic` runs on) and `loglikelihood` (also
`multiple_choice` tasks); `generate_until_multi_round` and `generate_visual_cot` raise UnsupportedRequestError.
A `generate_until` request is answered exactly as `llava-uta-bench answer` answers it: the document's image and
text go to a fresh `ChatSession` (batched: `answer_many`, in request order), greedy when temperature is 0 or
do_sample is false. Its generation kwargs: max_new_tokens (default 1024), temperature (default 0), top_p (default
1), do_sample, num_beams (1 only) and until (the answer is cut before the first stop string; generation itself
ends at the template's stop string or max_new_tokens); image_aspect_ratio is ignored (the model folder's processor
decides the preprocessing) and any other key is an error. A `loglikelihood` request scores the continuation as
the assistant's answer to the context in the same prompt (the template's separator, e.g. the space after
"ASSISTANT:", goes in front of it) and returns its mean negative log-likelihood per token, the LM loss that
lmms-eval's multiple_choice scoring minimises.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from lmms_eval.api.instance import GenerationResult, Instance, unwrap_generation_output
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

from llava_uta.constants import DEFAULT_IMAGE_TOKEN
from llava_uta.conversation import get_template
from llava_uta.serve.chat import ChatSession, GenerationSettings, answer_many, to_model
from llava_uta.serve.loader import LoadedModel, default_device, folder_kind, load_pretrained_model

SUPPORTED_REQUESTS = ("generate_until", "loglikelihood")
GENERATION_KWARGS = ("max_new_tokens", "temperature", "top_p", "do_sample", "num_beams", "until")
IGNORED_GENERATION_KWARGS = ("image_aspect_ratio",)  # preprocessing comes from the model folder's processor
MULTI_IMAGE_POLICIES = ("error", "middle")
DEFAULT_MAX_NEW_TOKENS = 1024  # as `llava-uta-bench answer`
PAIRS_STRINGIFIED = unwrap_generation_output((0.0, True))[0] != (0.0, True)  # see LlavaUtaLmms.loglikelihood


class ModelLoadError(RuntimeError):
    """The `pretrained` folder of `--model llava_uta` cannot be loaded."""


class UnsupportedRequestError(NotImplementedError):
    """An lmms-eval request type (or a request's input) that the llava_uta model cannot answer."""


@dataclass(frozen=True)
class Generation:
    """The generation settings of one request, hashable so that equal consecutive requests share a batch."""

    temperature: float
    top_p: float
    max_new_tokens: int
    until: tuple[str, ...]


def generation_settings(gen_kwargs: dict, task: str) -> Generation:
    """lmms-eval generation kwargs as chat settings; an unknown key or beam search is an error naming the task."""
    unknown = sorted(set(gen_kwargs) - {*GENERATION_KWARGS, *IGNORED_GENERATION_KWARGS})
    if unknown:
        raise UnsupportedRequestError(
            f"llava_uta: task {task!r} sets generation kwargs {unknown}; supported: {list(GENERATION_KWARGS)}"
        )
    if int(gen_kwargs.get("num_beams") or 1) != 1:
        raise UnsupportedRequestError(f"llava_uta: task {task!r} asks for num_beams={gen_kwargs['num_beams']}; "
                                      "the chat API decodes greedily or samples (num_beams=1)")
    until = gen_kwargs.get("until") or []
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, list | tuple) or not all(isinstance(s, str) for s in until):
        raise UnsupportedRequestError(f"llava_uta: task {task!r}: `until` must be a string or a list of strings, "
                                      f"got {until!r}")
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    if gen_kwargs.get("do_sample") is False:
        temperature = 0.0
    top_p = gen_kwargs.get("top_p")
    top_p = 1.0 if top_p is None or temperature == 0 else float(top_p)
    max_new_tokens = int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
    GenerationSettings(temperature, top_p, max_new_tokens)  # validates the ranges
    return Generation(temperature, top_p, max_new_tokens, tuple(s for s in until if s))


def cut_at_stops(text: str, until: tuple[str, ...]) -> str:
    """The answer up to the first of the stop strings (lmms-eval's `until`), without trailing whitespace."""
    cut = min((text.index(stop) for stop in until if stop in text), default=len(text))
    return text[:cut].rstrip()


def answer_lead(conv_mode: str) -> str:
    """What the template puts between the generation prompt and the answer (' ' after v1's 'ASSISTANT:')."""
    marker = "\x00answer\x00"
    conv = get_template(conv_mode)
    conv.append_message(conv.roles[0], f"{DEFAULT_IMAGE_TOKEN}\nq")
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()
    conv.messages[-1] = (conv.roles[1], marker)
    full = conv.get_prompt()
    if not full.startswith(prompt):
        raise ValueError(f"template {conv_mode!r}: the answered conversation does not extend the generation prompt")
    return full[len(prompt) : full.index(marker, len(prompt))]


def parse_batch_size(value: int | str) -> int:
    """lmms-eval's batch size as a positive integer ('auto' is not supported)."""
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"llava_uta: batch_size must be a positive integer, got {value!r} "
                         "('auto' is not supported)") from None
    if size < 1:
        raise ValueError(f"llava_uta: batch_size must be a positive integer, got {value!r}")
    return size


class LlavaUtaLmms(lmms):
    """lmms-eval's `llava_uta` model: a LLaVA-UTA training output answered through ChatSession / answer_many."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        model_base: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        conv_mode: str | None = None,
        image_aspect_ratio: str = "square",
        batch_size: int | str = 1,
        multi_image: str = "error",
        max_batch_size: int | None = None,  # lmms-eval passes it for batch_size=auto, which is not supported
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            raise TypeError(f"llava_uta: unknown model_args {sorted(unknown)}; known: pretrained, model_base, device, "
                            "dtype, conv_mode, image_aspect_ratio, batch_size, multi_image")
        if multi_image not in MULTI_IMAGE_POLICIES:
            raise ValueError(f"llava_uta: multi_image must be one of {MULTI_IMAGE_POLICIES}, got {multi_image!r}")
        self.batch_size_per_gpu = parse_batch_size(batch_size)
        self.multi_image = multi_image
        self.loaded = load_model(str(pretrained), model_base, device or rank_device(), dtype, image_aspect_ratio)
        self.conv_mode = conv_mode or self.loaded.conv_mode
        self.lead = answer_lead(self.conv_mode)  # also checks the conv_mode name
        self.pretrained = str(pretrained)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self.loaded.model.device

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    # ---- generate_until ----

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """One answer per request, in order; consecutive requests with equal settings share a batch."""
        answers: list[str] = []
        progress = tqdm(total=len(requests), desc="llava_uta answers", disable=self.rank != 0)
        for settings, batch in self._generation_batches(requests):  # lazily: one batch of images in memory
            contexts = [context for context, _ in batch]
            images = [image for _, image in batch]
            kwargs = {"temperature": settings.temperature, "top_p": settings.top_p,
                      "max_new_tokens": settings.max_new_tokens}
            if self.batch_size == 1 or any(image is None for image in images):
                texts = [ChatSession(self.loaded, self.conv_mode, image).answer(context, **kwargs)
                         for context, image in batch]
            else:
                texts = answer_many(self.loaded, list(zip(images, contexts, strict=True)), self.conv_mode, **kwargs)
            answers += [cut_at_stops(text, settings.until) for text in texts]
            progress.update(len(batch))
        progress.close()
        return answers

    def _generation_batches(
        self, requests: list[Instance]
    ) -> Iterator[tuple[Generation, list[tuple[str, Image.Image | None]]]]:
        """Runs of at most batch_size consecutive requests with the same settings, as (context, image) pairs.

        Request order is kept (not sorted by length), so with the same batch size the batches, and with them the
        left padding, equal those of `llava-uta-bench answer`.
        """
        batch: list[tuple[str, Image.Image | None]] = []
        current: Generation | None = None
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = self._request_args(request, "generate_until", 6)
            settings = generation_settings(dict(gen_kwargs or {}), task)
            pair = (self._context(context, task, doc_id), self._image(doc_to_visual, task, split, doc_id))
            if batch and (settings != current or len(batch) == self.batch_size):
                yield current, batch
                batch = []
            batch.append(pair)
            current = settings
        if batch:
            yield current, batch

    # ---- loglikelihood ----

    def loglikelihood(self, requests: list[Instance]) -> list:
        """(mean negative log-likelihood per continuation token, whether greedy decoding gives it) per request.

        lmms-eval 0.7.3 picks a `multiple_choice` answer by the *smallest* value (its LLaVA models return the LM
        loss), so this returns the loss, as they do, not the log-probability its base class documents; the summed
        log-probability is `score_continuation`'s. Its evaluator passes every response through
        `unwrap_generation_output`, which turns a (float, bool) pair into its string; where it does, each pair
        travels wrapped in a GenerationResult, the one type it hands on unchanged.
        """
        results = []
        for request in tqdm(requests, desc="llava_uta loglikelihood", disable=self.rank != 0):
            context, target, doc_to_visual, doc_id, task, split = self._request_args(request, "loglikelihood", 6)
            if isinstance(target, str):
                continuation = target
            elif callable(target):
                continuation = target(self.task_dict[task][split][doc_id])
            else:
                raise UnsupportedRequestError(f"llava_uta: task {task!r} doc {doc_id}: a loglikelihood target must be "
                                              f"a string or doc_to_target, got {type(target).__name__}")
            if not isinstance(continuation, str) or not continuation.strip():
                raise UnsupportedRequestError(f"llava_uta: task {task!r} doc {doc_id}: the continuation to score must "
                                              f"be a non-empty string, got {continuation!r}")
            image = self._image(doc_to_visual, task, split, doc_id)
            logprob, length, greedy = self.score_continuation(self._context(context, task, doc_id), image, continuation)
            results.append((-logprob / length, greedy))
        return [GenerationResult(text=pair) for pair in results] if PAIRS_STRINGIFIED else results

    def score_continuation(
        self, context: str, image: Image.Image | None, continuation: str
    ) -> tuple[float, int, bool]:
        """(log P(continuation | context, image), its number of tokens, whether greedy decoding produces it).

        The continuation is scored as the assistant's answer: after the generation prompt and the template's lead.
        """
        session = ChatSession(self.loaded, self.conv_mode, image)
        prompt = session.prompt(context)
        prompt_ids = self._encode(prompt, session.image)["input_ids"][0]
        inputs = self._encode(prompt + self.lead + continuation.lstrip(), session.image)
        ids = inputs["input_ids"][0]
        start = common_prefix_length(prompt_ids.tolist(), ids.tolist())
        if start >= len(ids):
            raise UnsupportedRequestError(f"llava_uta: continuation {continuation!r} adds no tokens to the prompt")
        with torch.inference_mode():
            logits = self.loaded.model(**inputs).logits[0, start - 1 : -1].float()
        targets = ids[start:]
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]
        return float(logprobs.sum()), len(targets), bool((logits.argmax(-1) == targets).all())

    def _encode(self, text: str, image: Image.Image | None) -> dict[str, torch.Tensor]:
        if image is None:
            return to_model(self.loaded.tokenizer(text, return_tensors="pt"), self.loaded.model)
        return to_model(self.loaded.processor(images=image, text=text, return_tensors="pt"), self.loaded.model)

    # ---- unsupported request types ----

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise unsupported("generate_until_multi_round", requests)

    def generate_visual_cot(self, requests: list[Instance]) -> list[str]:
        raise unsupported("generate_visual_cot", requests)

    # ---- request parts ----

    def _request_args(self, request: Instance, kind: str, size: int) -> tuple:
        if len(request.args) != size:
            raise UnsupportedRequestError(
                f"llava_uta: a {kind} request of task {request.task_name!r} has {len(request.args)} arguments, "
                f"expected {size} (context, target or generation kwargs, doc_to_visual, doc_id, task, split); "
                "unconditional loglikelihoods (acc_mutual_info) are not supported"
            )
        return request.args

    def _context(self, context: str, task: str, doc_id: int) -> str:
        if not isinstance(context, str):
            raise UnsupportedRequestError(f"llava_uta: task {task!r} doc {doc_id}: the context must be a string, "
                                          f"got {type(context).__name__} (chat-message tasks are not supported)")
        if DEFAULT_IMAGE_TOKEN in context:
            raise UnsupportedRequestError(f"llava_uta: task {task!r} doc {doc_id}: the context already holds "
                                          f"{DEFAULT_IMAGE_TOKEN}; the chat template places the image itself")
        return context

    def _image(self, doc_to_visual: Callable | None, task: str, split: str, doc_id: int) -> Image.Image | None:
        """The one image of a document (None for a text-only one), following the multi_image policy."""
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None
        visuals = list(visuals or [])
        if len(visuals) > 1:
            if self.multi_image == "error":
                raise UnsupportedRequestError(
                    f"llava_uta: task {task!r} doc {doc_id} has {len(visuals)} images; the chat API answers about "
                    "one. Pass multi_image=middle in --model_args to use the middle one (LLaVA's SEED-Bench video "
                    "convention)"
                )
            visuals = [visuals[len(visuals) // 2]]
        if not visuals:
            return None
        if not isinstance(visuals[0], Image.Image):
            raise UnsupportedRequestError(f"llava_uta: task {task!r} doc {doc_id} gives a {type(visuals[0]).__name__} "
                                          "visual; only images (PIL) are supported, not video or audio")
        return visuals[0]


def unsupported(kind: str, requests: list[Instance]) -> UnsupportedRequestError:
    tasks = sorted({str(r.task_name) for r in requests})
    return UnsupportedRequestError(
        f"llava_uta does not support lmms-eval request type {kind!r} (asked by task(s) {tasks}); "
        f"supported: {', '.join(SUPPORTED_REQUESTS)} (task output_type generate_until, loglikelihood, "
        "multiple_choice or generate_until_agentic)"
    )


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def rank_device() -> str:
    """This process's device: cuda:LOCAL_RANK under a multi-process launcher (accelerate, torchrun)."""
    device = default_device()
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


def load_model(
    pretrained: str, model_base: str | None, device: str, dtype: str | None, image_aspect_ratio: str
) -> LoadedModel:
    """load_pretrained_model, with an error naming the folder instead of a trace from inside transformers."""
    try:
        folder_kind(pretrained)
    except FileNotFoundError as err:
        raise ModelLoadError(f"llava_uta: cannot load model folder {pretrained!r}: {err}") from None
    try:
        return load_pretrained_model(pretrained, model_base, device, dtype, image_aspect_ratio)
    except Exception as err:
        base = f" (model_base {model_base!r})" if model_base else ""
        raise ModelLoadError(
            f"llava_uta: cannot load model folder {pretrained!r}{base}: {type(err).__name__}: {err}"
        ) from err

