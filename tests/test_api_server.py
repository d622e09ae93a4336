"""llava-uta-serve on a free localhost port, driven by the official `openai` client and raw HTTP: the same greedy
answer as `llava-uta-bench answer`, streamed and not; multi-turn; 16 concurrent clients; a full queue gives 503;
bad input gives OpenAI's error object and the server goes on; the API key; and the web page over the API."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from PIL import Image
from serving_helpers import free_port, wait_until_serving

from llava_uta.eval.llavabench.__main__ import main as bench
from llava_uta.serve.api_server import ApiError, ServerSettings, create_app, main, parse_request
from llava_uta.serve.chat import ChatSession
from llava_uta.serve.loader import load_pretrained_model

openai = pytest.importorskip("openai", reason="the dev extra installs the openai client")

QUESTION = "What is in the image?"
MAX_TOKENS = 12
MODEL = "tiny-llava"
REPO = Path(__file__).resolve().parents[1]


@contextmanager
def running(app) -> str:
    """The base URL of `app` served by uvicorn on a free localhost port, in a thread."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def loaded(llava_runs):
    return load_pretrained_model(llava_runs["stage2"], device="cpu")


@pytest.fixture(scope="module")
def server(loaded, llava_runs) -> str:
    settings = ServerSettings(MODEL, concurrency=2, queue_size=32, max_image_bytes=2**20,
                              local_media_root=llava_runs["image"].parent.resolve())
    with running(create_app(loaded, settings)) as url:
        yield url


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def user(text: str, image_url: str | None = None) -> dict:
    parts = [{"type": "text", "text": text}]  # text first, image after: how lmms-eval's openai_compatible sends it
    return {"role": "user", "content": parts + ([{"type": "image_url", "image_url": {"url": image_url}}]
                                                  if image_url else [])}


@pytest.fixture(scope="module")
def bench_answer(llava_runs, tmp_path_factory) -> str:
    """`llava-uta-bench answer`'s greedy answer to QUESTION about the test image."""
    root = tmp_path_factory.mktemp("bench")
    image = llava_runs["image"]
    (root / "q.jsonl").write_text(json.dumps({"question_id": 0, "image": image.name, "text": QUESTION}) + "\n")
    bench(["answer", "--model-path", str(llava_runs["stage2"]), "--device", "cpu", "--question-file",
           str(root / "q.jsonl"), "--image-folder", str(image.parent), "--answers-file", str(root / "a.jsonl"),
           "--max-new-tokens", str(MAX_TOKENS)])
    return json.loads((root / "a.jsonl").read_text())["text"]


def test_the_openai_client_gets_the_bench_answer_streamed_and_not(server, llava_runs, bench_answer, loaded):
    messages = [user(QUESTION, data_url(llava_runs["image"]))]
    reply = client(server).chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=MAX_TOKENS)
    assert reply.choices[0].message.content == bench_answer and bench_answer
    assert reply.choices[0].message.role == "assistant" and reply.model == MODEL
    session = ChatSession(loaded, image=Image.open(llava_runs["image"]))
    assert reply.usage.prompt_tokens == session.prompt_tokens(QUESTION)  # image tokens included
    assert 1 <= reply.usage.completion_tokens <= MAX_TOKENS
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.choices[0].finish_reason == ("length" if reply.usage.completion_tokens == MAX_TOKENS else "stop")

    chunks = list(client(server).chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=MAX_TOKENS, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == bench_answer
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == reply.usage.model_dump()


def test_a_file_url_below_the_allowed_folder_is_read(server, llava_runs, bench_answer):
    messages = [user(QUESTION, llava_runs["image"].resolve().as_uri())]
    reply = client(server).chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=MAX_TOKENS)
    assert reply.choices[0].message.content == bench_answer


def test_multi_turn_answers_as_a_chat_session_does(server, llava_runs, loaded):
    session = ChatSession(loaded, image=Image.open(llava_runs["image"]), system="Answer briefly.")
    first = session.answer(QUESTION, max_new_tokens=MAX_TOKENS)
    second = session.answer("What color is it?", max_new_tokens=MAX_TOKENS)
    messages = [{"role": "system", "content": "Answer briefly."}, user(QUESTION, data_url(llava_runs["image"])),
                {"role": "assistant", "content": first}, {"role": "user", "content": "What color is it?"}]
    reply = client(server).chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=MAX_TOKENS)
    assert reply.choices[0].message.content == second


def test_sixteen_concurrent_clients_are_all_answered(server, llava_runs, bench_answer):
    messages = [user(QUESTION, data_url(llava_runs["image"]))]

    def ask(i: int) -> str:
        stream = i % 2 == 1
        reply = client(server).chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                                       max_tokens=MAX_TOKENS, stream=stream)
        return "".join(c.choices[0].delta.content or "" for c in reply) if stream else reply.choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    assert answers == [bench_answer] * 16


def png_bytes(size: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), "red").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(("change", "status", "code", "says"), [
    ({"model": "gpt-4o"}, 404, "model_not_found", "tiny-llava"),
    ({"image": "https://example.com/cat.png"}, 400, "invalid_image", "does not fetch"),
    ({"image": "data:image/png;base64," + base64.b64encode(b"not an image").decode()}, 400, "invalid_image",
     "not an image"),
    ({"image": "data:image/png;base64,%%%"}, 400, "invalid_image", "base64"),
    ({"image": "data:image/png;base64," + base64.b64encode(b"\0" * (2**20 + 10)).decode()}, 400, "image_too_large",
     "limit is 1.0 MiB"),
    ({"image": "file:///etc/hostname"}, 400, "invalid_image", "allowed-local-media-path"),
    ({"max_tokens": 10**6}, 400, "context_length_exceeded", "context is"),
    ({"max_tokens": 0}, 400, None, "'max_tokens' must be a positive integer"),
    ({"temperature": -1}, 400, None, "'temperature' must be a number in [0, 2]"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, None, "expected a user message"),
    ({"second_image": True}, 400, None, "one image per conversation"),
    ({"n": 2}, 400, None, "'n' must be 1"),
])
def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, llava_runs, bench_answer, change, status,
                                                               code, says):
    image = change.pop("image", data_url(llava_runs["image"]))
    body = {"model": MODEL, "messages": [user(QUESTION, image)], "max_tokens": MAX_TOKENS, "temperature": 0}
    if change.pop("second_image", False):
        body["messages"][0]["content"].append({"type": "image_url", "image_url": {"url": image}})
    body.update(change)
    response = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    error = response.json()["error"]
    assert response.status_code == status and error["code"] == code and says in error["message"], error
    assert set(error) == {"message", "type", "param", "code"}
    with pytest.raises(openai.APIStatusError) as raised:  # the client raises it as OpenAI's own errors
        client(server).chat.completions.create(**body)
    assert raised.value.status_code == status
    ok = client(server).chat.completions.create(model=MODEL, messages=[user(QUESTION, data_url(llava_runs["image"]))],
                                                temperature=0, max_tokens=MAX_TOKENS)
    assert ok.choices[0].message.content == bench_answer


def test_a_body_that_is_not_json_and_an_unknown_path_get_openai_errors(server):
    response = httpx.post(f"{server}/v1/chat/completions", content=b"{not json", timeout=30)
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    response = httpx.get(f"{server}/v1/nothing", timeout=30)
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert httpx.get(f"{server}/health", timeout=30).json() == {"status": "ok"}
    models = client(server).models.list().data
    assert [m.id for m in models] == [MODEL]


@pytest.fixture(scope="module")
def paced(llava_runs):
    """A second copy of the model that sleeps before each forward pass and never ends an answer early."""
    loaded = load_pretrained_model(llava_runs["stage2"], device="cpu")
    loaded.model.register_forward_pre_hook(lambda module, inputs: time.sleep(0.05))
    loaded.model.generation_config.min_new_tokens = 400
    return loaded


def test_a_full_queue_gives_503_with_retry_after_and_stopping_a_stream_frees_the_slot(paced, llava_runs):
    settings = ServerSettings(MODEL, concurrency=1, queue_size=0)
    body = {"model": MODEL, "messages": [user(QUESTION, data_url(llava_runs["image"]))], "max_tokens": 400}
    with running(create_app(paced, settings)) as url:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as first:
            lines = first.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))  # the only slot is generating
            busy = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
            assert busy.status_code == 503 and int(busy.headers["Retry-After"]) >= 1
            assert busy.json()["error"]["code"] == "server_busy"
        # the client went away mid-answer: the generation stops and the slot is free again within seconds
        short = {**body, "max_tokens": 3}
        closed = time.monotonic()
        deadline = closed + 10  # the whole answer would take 400 x 0.05 = 20 s
        while (reply := httpx.post(f"{url}/v1/chat/completions", json=short, timeout=60)).status_code == 503:
            assert time.monotonic() < deadline, "the slot of the abandoned stream was never freed"
            time.sleep(0.2)
        done = reply.json()
        assert done["choices"][0]["finish_reason"] == "length" and done["usage"]["completion_tokens"] == 3


def test_the_api_key_is_enforced(loaded, llava_runs):
    settings = ServerSettings(MODEL, api_key="sesame")
    with running(create_app(loaded, settings)) as url:
        for key in ("none", "sesame2"):
            with pytest.raises(openai.AuthenticationError):
                client(url, key).models.list()
        assert client(url, "sesame").models.list().data[0].id == MODEL
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200  # health checks need no key


def test_binding_beyond_localhost_needs_a_key(llava_runs, capsys):
    with pytest.raises(SystemExit):
        main(["--model-path", str(llava_runs["stage2"]), "--host", "0.0.0.0"])
    assert "--api-key" in capsys.readouterr().err


def test_an_image_after_the_first_user_message_is_refused():
    settings = ServerSettings(MODEL)
    image = "data:image/png;base64," + base64.b64encode(png_bytes(8)).decode()
    body = {"model": MODEL, "messages": [user("hi"), {"role": "assistant", "content": "hello"}, user("and?", image)]}
    with pytest.raises(ApiError, match="first user message"):
        parse_request(body, settings)
    request = parse_request({"model": MODEL, "messages": [user("hi", image)], "stop": ["a", "b"]}, settings)
    assert request.turns == ["hi"] and request.image.size == (8, 8) and request.stop == ("a", "b")
    assert (request.temperature, request.top_p, request.max_tokens) == (1.0, 1.0, None)  # OpenAI's defaults


@contextmanager
def child(name: str, root: Path, module: str, *flags: str) -> str:
    """The URL of `python -m module flags --port P` started on a free port (killed at the end)."""
    port, log = free_port(), root / f"{name}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "GRADIO_ANALYTICS_ENABLED": "False"}
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", module, *flags, "--port", str(port)], stdout=out,
                                   stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(f"{url}/" if module.endswith("web") else f"{url}/health", process, log)
        yield url
    finally:
        process.kill()
        process.wait(timeout=10)


def test_the_serve_command_answers_and_the_web_page_talks_to_it(llava_runs, bench_answer, tmp_path):
    """`llava-uta-serve` as a user starts it, and `llava-uta-web --api-url` in front of it and of a second server."""
    from gradio_client import Client, handle_file

    stage2 = str(llava_runs["stage2"])
    with child("serve", tmp_path, "llava_uta.serve.api_server", "--model-path", stage2, "--device", "cpu",
               "--served-model-name", MODEL, "--api-key", "k") as api:
        reply = client(api, "k").chat.completions.create(
            model=MODEL, messages=[user(QUESTION, llava_runs["image"].resolve().as_uri())], temperature=0,
            max_tokens=MAX_TOKENS)
        assert reply.choices[0].message.content == bench_answer
        down = f"http://127.0.0.1:{free_port()}"  # a second server that is down: conversations skip it
        with child("web", tmp_path, "llava_uta.serve.web", "--api-url", api, down, "--api-key", "k") as web:
            chat = Client(f"{web}/", verbose=False)
            for _ in range(2):  # one conversation per server in turn: the one that is down is skipped
                answer = chat.predict(handle_file(str(llava_runs["image"])), QUESTION, 0.0, 1.0, MAX_TOKENS, "crop",
                                      api_name="/chat")
                assert answer == bench_answer
