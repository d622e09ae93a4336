"""A chat session over OpenAI-compatible servers (`llava-uta-serve`): the web page without a model of its own.

    servers = ApiServers(["http://gpu1:8000", "http://gpu2:8000"], api_key="...")
    session = RemoteChatSession(servers, image=Image.open("cat.png"))
    for piece in session.ask("What is in the image?", temperature=0):
        print(piece, end="")

It keeps the interface of ChatSession that the web page uses (`turns`, `ask`, `regenerate`, `cancel`). Each new
conversation goes to the next server in turn (LLaVA's controller dispatching to its model workers, with the
standard protocol in between); a server that cannot be reached is skipped.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
from PIL import Image

from llava_uta.serve.chat import Turns

TIMEOUT_S = 600.0


class ApiServers:
    """The servers a page talks to, taken in turn, and the model id each serves."""

    def __init__(self, urls: list[str], api_key: str | None = None):
        if not urls:
            raise ValueError("no server URL given")
        self.urls = [url.rstrip("/").removesuffix("/v1") for url in urls]
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._turn = itertools.cycle(range(len(self.urls)))
        self._models: dict[str, str] = {}
        self._lock = threading.Lock()

    def pick(self) -> tuple[str, str]:
        """(URL, model id) of the next server that answers; ConnectionError if none does."""
        with self._lock:
            start = next(self._turn)
        failures = []
        for i in range(len(self.urls)):
            url = self.urls[(start + i) % len(self.urls)]
            try:
                return url, self.model(url)
            except (httpx.HTTPError, ValueError) as err:
                failures.append(f"{url}: {err}")
        raise ConnectionError("no server answered: " + "; ".join(failures))

    def model(self, url: str) -> str:
        if url not in self._models:
            response = httpx.get(f"{url}/v1/models", headers=self.headers, timeout=30)
            check(response)
            self._models[url] = response.json()["data"][0]["id"]
        return self._models[url]


def check(response: httpx.Response) -> None:
    """ValueError with the server's own message (OpenAI's error object) for a failed request."""
    if response.status_code >= 400:
        response.read()
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        raise ValueError(f"the server answered {response.status_code}: {message}")


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@dataclass
class RemoteChatSession(Turns):
    """A conversation about (at most) one image, answered by one of `servers`."""

    servers: ApiServers
    image: Image.Image | None = None
    turns: list[str] = field(default_factory=list)  # user, assistant, user, assistant, ...

    def __post_init__(self) -> None:
        self.url, self.model = self.servers.pick()
        self._cancel = threading.Event()

    def messages(self, question: str) -> list[dict]:
        turns = [*self.turns, question]
        messages = [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(turns)]
        if self.image is not None:
            messages[0]["content"] = [{"type": "image_url", "image_url": {"url": data_url(self.image)}},
                                      {"type": "text", "text": turns[0]}]
        return messages

    def ask(self, question: str, temperature: float = 0.2, top_p: float = 0.7,
            max_new_tokens: int = 512) -> Iterator[str]:
        """Stream the answer to `question` piece by piece; it joins the history once complete (or stopped)."""
        body = {"model": self.model, "messages": self.messages(question), "temperature": temperature,
                "top_p": top_p, "max_tokens": max_new_tokens, "stream": True}
        self._cancel = cancel = threading.Event()
        return self._stream(question, body, cancel)

    def _stream(self, question: str, body: dict, cancel: threading.Event) -> Iterator[str]:
        answer = ""
        with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=body, headers=self.servers.headers,
                          timeout=TIMEOUT_S) as response:
            check(response)
            for line in response.iter_lines():
                if cancel.is_set():
                    break  # closing the connection stops the server's generation
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                if "error" in chunk:
                    raise ValueError(f"the server failed: {chunk['error']['message']}")
                piece = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
                if piece:
                    answer += piece
                    yield piece
        self.turns += [question, answer]
