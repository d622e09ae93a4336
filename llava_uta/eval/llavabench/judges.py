"""The judge request (LLaVA's message layout), its score line, and the HTTP chat-completions judge.

A judge turns one `ReviewItem` into review text whose first line holds the two scores ("8 6"). `HttpJudge`
posts the messages to any OpenAI-compatible `/chat/completions` endpoint with the standard library; rate limits
(429), server errors (5xx), timeouts and connection errors are retried with exponential backoff up to a limit,
after which a `JudgeError` is raised for the caller to record, never an endless loop.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Protocol

logger = logging.getLogger(__name__)

SYSTEM_PROMPT = "You are a helpful and precise assistant for checking the quality of the answer."  # LLaVA's
FAILED = [-1, -1]  # LLaVA's score tuple for a review it could not parse


class JudgeError(RuntimeError):
    """The judge gave no usable review for one question."""


@dataclass
class ReviewItem:
    """Everything a judge may look at for one question: the records and the rendered messages."""

    question: dict
    answer1: dict
    answer2: dict
    category: str  # rule key, e.g. llava_bench_conv
    messages: list[dict]


class Judge(Protocol):
    name: str

    def review(self, item: ReviewItem) -> str: ...


def render_context(context: dict) -> str:
    """In-the-Wild: the caption(s); COCO: the five captions, a blank line, then `category: [bbox]` lines."""
    if "captions" in context:
        boxes = "\n".join(f"{inst['category']}: {inst['bbox']}" for inst in context.get("instances", []))
        return "\n".join(context["captions"]) + "\n\n" + boxes
    caption = context["caption"]
    return "\n".join(caption) if isinstance(caption, list) else caption


def build_messages(context: str, question: str, answer1: str, answer2: str, rule: dict) -> list[dict]:
    """System + user messages in LLaVA's layout: context, question, both answers, then the rule prompt."""
    content = (
        f"[Context]\n{context}\n\n"
        f"[Question]\n{question}\n\n"
        f"[{rule['role']} 1]\n{answer1}\n\n[End of {rule['role']} 1]\n\n"
        f"[{rule['role']} 2]\n{answer2}\n\n[End of {rule['role']} 2]\n\n"
        f"[System]\n{rule['prompt']}\n\n"
    )
    return [{"role": "system", "content": rule.get("system", SYSTEM_PROMPT)}, {"role": "user", "content": content}]


def parse_score(review: str) -> tuple[float, float]:
    """The two scores on the first non-blank line ("8 6", "8, 6", spaces ignored); ValueError for anything else."""
    first = review.strip().split("\n", 1)[0] if review.strip() else ""
    parts = first.replace(",", " ").split()
    if len(parts) != 2:
        raise ValueError(f"no score line of two numbers: {first[:80]!r}")
    return float(parts[0]), float(parts[1])


def llava_parse_score(review: str) -> list[float]:
    """LLaVA's parse_score exactly: raw first line, ',' -> ' ', split on one space, two floats, else [-1, -1].

    Stricter than `parse_score`: "8, 6" (three parts), "8 6 " and a leading blank line all give [-1, -1].
    """
    parts = review.split("\n")[0].replace(",", " ").split(" ")
    if len(parts) != 2:
        return list(FAILED)
    try:
        return [float(parts[0]), float(parts[1])]
    except ValueError:
        return list(FAILED)


def _retryable(err: Exception) -> bool:
    if isinstance(err, urllib.error.HTTPError):
        return err.code == 429 or err.code >= 500
    return isinstance(err, urllib.error.URLError | TimeoutError | socket.timeout | ConnectionError | ValueError)


def _retry_after(err: Exception) -> float | None:
    value = err.headers.get("Retry-After") if isinstance(err, urllib.error.HTTPError) and err.headers else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


@dataclass
class HttpJudge:
    """An OpenAI-compatible chat-completions judge (e.g. gpt-4 at https://api.openai.com/v1)."""

    base_url: str
    model: str
    api_key: str | None = None
    temperature: float = 0.2
    max_tokens: int = 1024
    timeout: float = 120.0
    max_retries: int = 6
    backoff: float = 1.0  # seconds before the first retry, doubled for each further one
    max_backoff: float = 60.0

    @property
    def name(self) -> str:
        return self.model

    @classmethod
    def from_env(cls, key_env: str = "OPENAI_API_KEY", **kwargs) -> HttpJudge:
        return cls(api_key=os.environ.get(key_env), **kwargs)

    def review(self, item: ReviewItem) -> str:
        body = {
            "model": self.model,
            "messages": item.messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        for attempt in range(self.max_retries + 1):
            try:
                return self._post(body)
            except Exception as err:
                if not _retryable(err):
                    raise JudgeError(f"judge request failed: {err}") from err
                if attempt == self.max_retries:
                    raise JudgeError(f"judge still failing after {self.max_retries} retries: {err}") from err
                wait = _retry_after(err)
                delay = min(self.max_backoff, self.backoff * 2**attempt if wait is None else wait)
                delay *= 1 + 0.1 * random.random()  # jitter: parallel runs do not retry in lockstep
                logger.warning("judge: %s; retry %d/%d in %.2f s", err, attempt + 1, self.max_retries, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _post(self, body: dict) -> str:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = self.base_url.rstrip("/") + "/chat/completions"
        request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            payload = json.loads(response.read())  # a malformed body raises ValueError: retried
        try:
            content = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            content = None
        if not isinstance(content, str):
            raise ValueError(f"unexpected response shape: {str(payload)[:200]}")
        return content
