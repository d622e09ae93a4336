"""An OpenAI-compatible API over one loaded model, as vLLM and SGLang serve theirs.

    llava-uta-serve --model-path checkpoints/llava-uta                          # http://127.0.0.1:8000/v1
    llava-uta-serve --model-path checkpoints/llava-uta --host 0.0.0.0 --api-key "$KEY" --concurrency 2

`POST /v1/chat/completions` (text and `image_url` parts; `stream` with server-sent events), `GET /v1/models`,
`GET /health`. Any OpenAI client works with `base_url="http://127.0.0.1:8000/v1"`; so do lmms-eval's
`openai_compatible` model and `llava-uta-web --api-url`.

Images come as data URLs (`data:image/png;base64,...`) or `file://` paths; nothing is fetched from the network.
A `file://` path is read when the server listens on the loopback interface only, or when it lies under
`--allowed-local-media-path`. One image per conversation, in the first user message, as LLaVA-1.5 takes it (it goes
before the first question, wherever its part is in the message). A system message replaces the template's system
prompt. Greedy decoding when `temperature` is 0; the defaults are OpenAI's (temperature 1, top_p 1), with
`max_tokens` at most DEFAULT_MAX_TOKENS unless asked for. `--concurrency` requests generate at a time; up to
`--queue-size` more wait, and beyond that a request gets 503 with `Retry-After`. Errors are OpenAI's error object.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hmac
import io
import ipaddress
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

import anyio
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image
from starlette.background import BackgroundTask
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException

from llava_uta.argparsing import ArgumentParser
from llava_uta.serve.chat import ChatSession, Completion
from llava_uta.serve.images import UploadError, open_upload
from llava_uta.serve.loader import LoadedModel, add_model_arguments, load_from_args

DEFAULT_MAX_TOKENS = 512
MAX_STOP_STRINGS = 4  # OpenAI's limit
ROLES = ("system", "developer", "user", "assistant")
REFUSED_FIELDS = {  # fields that would change the answer and that this server does not implement
    "tools": "tool calls", "functions": "function calls", "response_format": "structured output",
    "logprobs": "log probabilities", "top_logprobs": "log probabilities",
}


class ApiError(Exception):
    """A request the server answers with OpenAI's error object."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, code=code, param=param)


@dataclass
class ServerSettings:
    """What the API allows besides the model itself."""

    model_name: str
    api_key: str | None = None
    concurrency: int = 1
    queue_size: int = 128
    max_image_bytes: int = 20 * 2**20
    local_media_root: Path | None = None  # file:// images are read below it; None: refused


@dataclass
class ChatRequest:
    """A validated chat-completions request, in the terms of a ChatSession."""

    turns: list[str]  # user, assistant, ..., the question
    image: Image.Image | None
    system: str | None
    temperature: float
    top_p: float
    max_tokens: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


# ---------------------------------------------------------------------------------------------------- the request


def parse_request(body: object, settings: ServerSettings) -> ChatRequest:
    """The request in `body`, or ApiError naming the field that is wrong and what was expected."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise bad(f"'model' must be a string: this server serves {settings.model_name!r}", "model")
    if model != settings.model_name:
        raise ApiError(404, f"The model {model!r} does not exist; this server serves {settings.model_name!r}",
                       code="model_not_found", param="model")
    for field, what in REFUSED_FIELDS.items():
        if body.get(field) not in (None, False, []):
            raise bad(f"{what} ('{field}') are not supported by this server", field)
    if body.get("n", 1) != 1:
        raise bad("'n' must be 1: this server returns one choice", "n")
    system, turns, image = parse_messages(body.get("messages"), settings)
    stream = body.get("stream") or False
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise bad("'stream' must be a boolean and 'stream_options' an object", "stream")
    return ChatRequest(
        turns, image, system,
        temperature=number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        max_tokens=max_tokens(body),
        stop=stop_strings(body.get("stop")),
        stream=stream,
        include_usage=bool(options.get("include_usage")),
    )


def number(body: dict, field: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high or (
            low_open and value == low):
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise bad(f"'{field}' must be a number in {bounds}, got {value!r}", field)
    return float(value)


def max_tokens(body: dict) -> int | None:
    for field in ("max_completion_tokens", "max_tokens"):
        value = body.get(field)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(f"'{field}' must be a positive integer, got {value!r}", field)
            return value
    return None


def stop_strings(stop: object) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOP_STRINGS:
        raise bad(f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} strings", "stop")
    return tuple(s for s in stops if s)


def parse_messages(messages: object, settings: ServerSettings) -> tuple[str | None, list[str], Image.Image | None]:
    """(system prompt, alternating user/assistant turns ending with the question, the image)."""
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    system: list[str] = []
    turns: list[str] = []
    images: list[tuple[int, Image.Image]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise bad(f"{where} must be an object with a 'role' of {', '.join(ROLES)}", where)
        role = message["role"]
        text, found = message_content(message.get("content"), f"{where}.content", settings)
        if found and role != "user":
            raise bad(f"{where}: only user messages may carry an image", where)
        images += [(i, image) for image in found]
        if role in ("system", "developer"):
            if turns:
                raise bad(f"{where}: a system message must come before the conversation", where)
            system.append(text)
            continue
        expected = ("user", "assistant")[len(turns) % 2]
        if role != expected:
            raise bad(f"{where}: expected a {expected} message (user and assistant messages alternate, starting "
                      f"with the user), got {role}", where)
        turns.append(text)
    if len(turns) % 2 == 0:
        raise bad("the last message must be a user message: the question to answer", "messages")
    if len(images) > 1:
        raise bad(f"this model takes one image per conversation (LLaVA-1.5); got {len(images)}", "messages")
    first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
    if images and images[0][0] != first_user:
        raise bad("the image must be in the first user message: LLaVA reads it before the first question",
                  f"messages[{images[0][0]}]")
    return ("\n".join(system) if system else None), turns, (images[0][1] if images else None)


def message_content(content: object, where: str, settings: ServerSettings) -> tuple[str, list[Image.Image]]:
    """The text of a message (its text parts joined by newlines) and its images."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise bad(f"{where} must be a string or a list of content parts", where)
    texts, images = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise bad(f"{where}[{j}].image_url must be an object with a 'url' string", f"{where}[{j}]")
            images.append(read_image(url, f"{where}[{j}]", settings))
        else:
            raise bad(f"{where}[{j}] must be a text part ({{'type': 'text', 'text': ...}}) or an image_url part",
                      f"{where}[{j}]")
    return "\n".join(texts), images


def read_image(url: str, where: str, settings: ServerSettings) -> Image.Image:
    """The image a data URL or a file:// URL holds; never fetched from the network."""
    scheme = url.split(":", 1)[0].lower()
    if scheme == "data":
        header, _, payload = url.partition(",")
        if not header.endswith(";base64"):
            raise bad(f"{where}: a data URL must be base64 encoded (data:image/png;base64,...)", where, "invalid_image")
        if len(payload) * 3 // 4 > settings.max_image_bytes:
            raise too_large(where, len(payload) * 3 // 4, settings)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as err:
            raise bad(f"{where}: the data URL is not valid base64 ({err})", where, "invalid_image") from err
        return decode(io.BytesIO(data), "the image", where)
    if scheme == "file":
        path = Path(url2pathname(unquote(urlparse(url).path))).resolve()
        root = settings.local_media_root
        if root is None or not path.is_relative_to(root):
            raise bad(f"{where}: file:// images are read only below --allowed-local-media-path "
                      f"({root or 'not set'}); send a data URL instead", where, "invalid_image")
        if not path.is_file():
            raise bad(f"{where}: no file {path}", where, "invalid_image")
        if path.stat().st_size > settings.max_image_bytes:
            raise too_large(where, path.stat().st_size, settings)
        return decode(path, path.name, where)
    raise bad(f"{where}: this server does not fetch images from the network; send a data URL "
              "(data:image/png;base64,...) or a file:// path", where, "invalid_image")


def decode(source, name: str, where: str) -> Image.Image:
    try:
        return open_upload(source, name)
    except UploadError as err:
        raise bad(f"{where}: {err}", where, "invalid_image") from err


def too_large(where: str, size: int, settings: ServerSettings) -> ApiError:
    return bad(f"{where}: the image is {size / 2**20:.1f} MiB; the limit is {settings.max_image_bytes / 2**20:.1f} MiB",
               where, "image_too_large")


# ------------------------------------------------------------------------------------------------------ the server


class Admission:
    """At most `concurrency` requests generate; up to `queue_size` wait; the rest are turned away with 503."""

    def __init__(self, concurrency: int, queue_size: int):
        self.slots = anyio.Semaphore(concurrency)
        self.queue_size, self.waiting = queue_size, 0
        self.mean_s = 0.0  # running mean of how long a request holds a slot: the Retry-After estimate
        self.concurrency = concurrency

    async def enter(self) -> float:
        if self.slots.value == 0 and self.waiting >= self.queue_size:
            wait = max(1, math.ceil(self.mean_s * (self.waiting + 1) / self.concurrency))
            raise ApiError(503, f"the server is busy ({self.concurrency} generating, {self.waiting} waiting); "
                           f"retry in {wait} s", "server_error", "server_busy", headers={"Retry-After": str(wait)})
        self.waiting += 1
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
        return time.monotonic()

    def leave(self, started: float) -> None:
        self.mean_s = 0.8 * self.mean_s + 0.2 * (time.monotonic() - started) if self.mean_s else \
            time.monotonic() - started
        self.slots.release()


def create_app(loaded: LoadedModel, settings: ServerSettings, conv_mode: str | None = None) -> FastAPI:
    """The FastAPI app serving `loaded` under `settings.model_name`."""
    app = FastAPI(title="llava-uta-serve")
    admission = Admission(settings.concurrency, settings.queue_size)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return err.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return ApiError(err.status_code, f"{request.method} {request.url.path}: {err.detail}",
                        code="not_found" if err.status_code == 404 else None).response()

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise ApiError(401, "Incorrect API key provided: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": created,
                                            "owned_by": "llava-uta", "max_model_len": loaded.context_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise bad(f"the request body is not valid JSON: {err}") from err
        chat = await run_in_threadpool(parse_request, body, settings)  # decodes the image off the event loop
        session = ChatSession(loaded, conv_mode, chat.image, chat.turns[:-1], chat.system)
        question = chat.turns[-1]
        limit = await run_in_threadpool(token_budget, session, question, chat.max_tokens, loaded.context_len)
        started = await admission.enter()
        reply = Reply(settings.model_name)
        if chat.stream:
            pieces = session.ask(question, chat.temperature, chat.top_p, limit, chat.stop)
            stream = Stream(session, pieces, lambda: admission.leave(started))
            return StreamingResponse(stream.events(reply, chat.include_usage), media_type="text/event-stream",
                                     background=BackgroundTask(stream.close))
        try:
            text = await run_in_threadpool(session.answer, question, chat.temperature, chat.top_p, limit, chat.stop)
        finally:
            admission.leave(started)
        return reply.completion(text, session.last)

    return app


def token_budget(session: ChatSession, question: str, asked: int | None, context_len: int) -> int:
    """max_new_tokens for the request: what was asked (or the default) if prompt and answer fit the context."""
    prompt = session.prompt_tokens(question)
    room = context_len - prompt
    if room < 1 or (asked is not None and asked > room):
        raise bad(f"this model's context is {context_len} tokens; the messages take {prompt} (image included) and "
                  f"{asked or 1} more were asked for", "messages", "context_length_exceeded")
    return asked if asked is not None else min(DEFAULT_MAX_TOKENS, room)


@dataclass
class Reply:
    """OpenAI's response objects for one request."""

    model: str

    def __post_init__(self) -> None:
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def completion(self, text: str, done: Completion) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": done.finish_reason, "logprobs": None}],
                "usage": usage(done)}

    def chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}

    def usage_chunk(self, done: Completion) -> dict:
        return {**self.chunk({}), "choices": [], "usage": usage(done)}


def usage(done: Completion) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def event(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


@dataclass
class Stream:
    """One streamed answer: its server-sent events, and the cleanup that runs however the stream ends."""

    session: ChatSession
    pieces: Iterator[str]
    leave: Callable[[], None]
    closed: bool = False

    async def events(self, reply: Reply, include_usage: bool) -> AsyncIterator[str]:
        try:
            yield event(reply.chunk({"role": "assistant", "content": ""}))
            async for piece in iterate_in_threadpool(self.pieces):
                yield event(reply.chunk({"content": piece}))
            yield event(reply.chunk({}, self.session.last.finish_reason))
            if include_usage:
                yield event(reply.usage_chunk(self.session.last))
            yield event("[DONE]")
        except Exception as err:  # the status line is sent already: the error goes in the stream, as OpenAI does
            yield event(ApiError(500, f"generation failed: {err}", "server_error").body())
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop the generation (a client that went away) and free the slot; once, from the stream or after it."""
        if self.closed:
            return
        self.closed = True
        self.session.cancel()
        try:
            with anyio.CancelScope(shield=True):  # also when the stream was cancelled by a client going away
                await run_in_threadpool(self.pieces.close)  # the generator's own cleanup joins the generation thread
        finally:
            self.leave()


# --------------------------------------------------------------------------------------------------------- the CLI


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(
        prog="llava-uta-serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (others need --api-key)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", help="key every /v1 request must send as 'Authorization: Bearer KEY'")
    parser.add_argument("--served-model-name", help="the model's id in the API (default: the folder's name)")
    parser.add_argument("--concurrency", type=int, default=1, help="requests generating at the same time")
    parser.add_argument("--queue-size", type=int, default=128, help="requests that may wait for a slot; more get 503")
    parser.add_argument("--max-image-mb", type=float, default=20.0, help="largest image accepted, in MiB")
    parser.add_argument("--allowed-local-media-path", type=Path,
                        help="folder below which file:// images are read (default: anywhere when the server "
                        "listens on the loopback interface only, nowhere otherwise)")
    args = parser.parse_args(argv)
    if not is_loopback(args.host) and not args.api_key:
        parser.error(f"--host {args.host} makes the API reachable from other machines: set --api-key too")
    if args.concurrency < 1 or args.queue_size < 0:
        parser.error("--concurrency must be >= 1 and --queue-size >= 0")
    root = args.allowed_local_media_path or (Path("/") if is_loopback(args.host) else None)
    settings = ServerSettings(
        model_name=args.served_model_name or Path(args.model_path).resolve().name,
        api_key=args.api_key,
        concurrency=args.concurrency,
        queue_size=args.queue_size,
        max_image_bytes=int(args.max_image_mb * 2**20),
        local_media_root=root.resolve() if root else None,
    )
    app = create_app(load_from_args(args), settings, args.conv_mode)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
