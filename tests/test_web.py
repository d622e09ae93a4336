"""The Gradio app in a subprocess: the /chat API (streamed = greedy), concurrency, bad uploads, a real browser
(Playwright driving the system Chromium: upload, chat, Stop), and the examples chosen for the model (ShapesWorld or
photos)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from PIL import Image

try:
    from playwright.sync_api import Page, expect, sync_playwright
except ImportError:  # the browser tests skip below
    sync_playwright = None

from serving_helpers import free_port, wait_until_serving

from llava_uta.data.shapes.writer import BENCH_DIR
from llava_uta.serve.chat import ChatSession
from llava_uta.serve.examples import PHOTO_QUESTIONS, example_rows, shapes_source
from llava_uta.serve.images import MAX_PIXELS, open_upload, prepare
from llava_uta.serve.loader import load_pretrained_model
from llava_uta.serve.web import main as web_main

QUESTION = "What is in the image?"
MAX_NEW_TOKENS = 12
REPO = Path(__file__).resolve().parents[1]

CHROMIUM = Path("/usr/bin/chromium")  # the system Chromium: Playwright drives it, nothing is downloaded
if not CHROMIUM.exists():
    NO_BROWSER = f"no {CHROMIUM}: `make browser` installs it (tests/install_chromium.sh; Debian/Ubuntu, as root)"
elif sync_playwright is None:
    NO_BROWSER = "no playwright: `pip install -e '.[dev]'` (the Python package only; it drives the system Chromium)"
else:
    NO_BROWSER = ""
    expect.set_options(timeout=60_000)  # a busy 2-core machine: the first answer can take a while
needs_browser = pytest.mark.skipif(bool(NO_BROWSER), reason=NO_BROWSER)


@contextmanager
def serving(folders, name: str, launcher: list[str], *options: str):
    """The URL of `llava-uta-web` serving the tiny stage-2 folder, started by `launcher` (killed at the end)."""
    port, log = free_port(), folders["root"] / f"{name}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, *launcher, "--model-path", str(folders["stage2"]), "--device", "cpu",
               "--port", str(port), *options]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_serving(url, process, log)
        yield url
    finally:
        process.kill()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def app(folders) -> str:
    """The URL of `llava-uta-web` serving the tiny stage-2 folder."""
    with serving(folders, "web", ["-m", "llava_uta.serve.web"], "--concurrency", "2") as url:
        yield url


PACE_S = 0.05  # seconds per forward pass of the paced app
PACED_TOKENS = 1024  # the slider's maximum: an answer the paced app streams for PACE_S * 1024 = 51 s or more

# llava-uta-web whose model waits PACE_S before each forward pass (one per generated token) and never ends an answer
# early (no end of sequence before max_new_tokens): an answer of PACED_TOKENS streams for most of a minute, so a
# click on Stop lands mid-stream however slow the machine is.
PACED_LAUNCHER = f"""
import sys, time
from llava_uta.serve import web

load = web.load_from_args

def paced(args):
    loaded = load(args)
    loaded.model.register_forward_pre_hook(lambda module, inputs: time.sleep({PACE_S}))
    loaded.model.generation_config.min_new_tokens = {PACED_TOKENS}
    return loaded

web.load_from_args = paced
web.main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def paced_app(folders) -> str:
    """The URL of a paced `llava-uta-web` (PACED_LAUNCHER) serving the tiny stage-2 folder."""
    with serving(folders, "web-paced", ["-c", PACED_LAUNCHER], "--concurrency", "2") as url:
        yield url


@pytest.fixture(scope="module")
def greedy_answer(folders) -> str:
    """The non-streamed greedy answer to QUESTION about the test image, preprocessed as the app does."""
    loaded = load_pretrained_model(folders["stage2"], device="cpu")
    session = ChatSession(loaded, image=prepare(open_upload(folders["image"]), "crop"))
    return session.answer(QUESTION, max_new_tokens=MAX_NEW_TOKENS)


def ask(url: str, image: Path) -> list[str]:
    """Every streamed value of the /chat endpoint for QUESTION, greedy."""
    job = Client(url, verbose=False).submit(handle_file(str(image)), QUESTION, 0.0, 1.0, MAX_NEW_TOKENS, "crop",
                                            api_name="/chat")
    job.result(timeout=60)
    return job.outputs()


def test_preprocessing_modes_make_squares():
    image = Image.new("RGB", (60, 40), (200, 10, 10))
    assert prepare(image, "crop").size == prepare(image, "resize").size == (40, 40)
    padded = prepare(image, "pad", fill=(1, 2, 3))
    assert padded.size == (60, 60) and padded.getpixel((0, 0)) == (1, 2, 3) and padded.getpixel((30, 30))[0] == 200
    with pytest.raises(ValueError, match="mode"):
        prepare(image, "stretch")


def test_streamed_api_answer_equals_the_greedy_answer(app, folders, greedy_answer):
    assert list(Client(app, verbose=False).view_api(return_format="dict", print_info=False)["named_endpoints"]) == [
        "/chat"
    ]
    streamed = ask(app, folders["image"])
    assert streamed[-1] == greedy_answer and greedy_answer
    assert all(greedy_answer.startswith(part) for part in streamed)


def test_eight_concurrent_clients_all_get_answers(app, folders, greedy_answer):
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: ask(app, folders["image"])[-1], range(8)))
    assert answers == [greedy_answer] * 8


def _not_an_image(path: Path) -> None:
    path.write_text("this is not an image\n")


def _truncated(path: Path) -> None:
    Image.effect_noise((64, 64), 60).convert("RGB").save(path.with_suffix(".full.png"))
    data = path.with_suffix(".full.png").read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _huge(path: Path) -> None:
    Image.new("1", (10_000, MAX_PIXELS // 10_000 + 1)).save(path)  # a few KB on disk, just over the limit


@pytest.mark.parametrize(("make", "name", "error"), [(_not_an_image, "note.png", "not an image"),
                                                     (_truncated, "cut.png", "damaged or truncated"),
                                                     (_huge, "huge.png", "too large")])
def test_bad_upload_shows_an_error_and_the_app_keeps_serving(app, folders, greedy_answer, tmp_path, make, name, error):
    make(tmp_path / name)
    with pytest.raises(Exception, match=error):
        ask(app, tmp_path / name)
    assert ask(app, folders["image"])[-1] == greedy_answer


@pytest.fixture(scope="module")
def browser():
    """The system Chromium, headless, driven by Playwright; closed (and its profile removed by Playwright) at the
    end of the module."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                             args=["--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser):
    """A fresh page (its own browser context: cookies, Gradio session) with generous timeouts for a busy machine."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    context.set_default_timeout(60_000)
    try:
        yield context.new_page()
    finally:
        context.close()


ANY_TEXT = re.compile(r"\S")


def open_app(page: Page, url: str, image: Path) -> None:
    """The app at `url` with `image` uploaded through the image input."""
    page.goto(url)
    page.locator("#image input[type=file]").set_input_files(image)
    expect(page.locator("#image img")).to_be_visible()


def set_max_tokens(page: Page, tokens: int) -> None:
    """Type `tokens` into the "Max output tokens" box under Parameters (opened if closed)."""
    box = page.get_by_label("number input for Max output tokens")
    if not box.is_visible():
        page.get_by_text("Parameters").click()
    box.fill(str(tokens))
    box.press("Enter")
    expect(page.get_by_label("range slider for Max output tokens")).to_have_value(str(tokens))


def send(page: Page, question: str) -> None:
    page.locator("#message textarea").fill(question)
    page.locator("#send").click()


def chat_messages(page: Page) -> list[tuple[str, str]]:
    """The chat as (role, text) pairs in order, role "user" or "bot"."""
    messages = page.locator("#chat [data-testid=user], #chat [data-testid=bot]")
    return [(m.get_attribute("data-testid"), m.inner_text().strip()) for m in messages.all()]


def wait_until_answered(page: Page, question: str) -> None:
    """Until the chat ends with `question` and a non-empty answer, and the answer has stopped streaming (the chat's
    progress tracker is hidden again)."""
    expect(page.locator("#chat [data-testid=user]").last).to_have_text(question)  # shown with its (empty) answer
    expect(page.locator("#chat [data-testid=bot]").last).to_have_text(ANY_TEXT)
    expect(page.locator("#chat [data-testid=status-tracker]")).to_have_class(re.compile(r"\bhide\b"))


@needs_browser
def test_browser_upload_chat_and_screenshot(app, folders, page):
    open_app(page, app, folders["image"])
    send(page, QUESTION)
    wait_until_answered(page, QUESTION)
    [(user, question), (bot, answer)] = chat_messages(page)
    assert (user, question, bot) == ("user", QUESTION, "bot") and answer
    page.screenshot(path=folders["root"] / "web.png")
    assert (folders["root"] / "web.png").stat().st_size > 10_000


@needs_browser
def test_browser_stop_keeps_the_partial_answer_and_the_chat_goes_on(paced_app, folders, page):
    """Stop mid-stream: the answer stops, stays in the conversation as it was, and the next question is answered."""
    open_app(page, paced_app, folders["image"])
    set_max_tokens(page, PACED_TOKENS)
    send(page, QUESTION)
    expect(page.locator("#chat [data-testid=bot]").first).to_have_text(ANY_TEXT)  # streaming, for 51 s or more
    page.locator("#stop").click()
    expect(page.locator("#chat [data-testid=status-tracker]")).to_have_class(re.compile(r"\bhide\b"))  # idle

    follow_up = "What color is it?"
    set_max_tokens(page, 16)
    send(page, follow_up)
    wait_until_answered(page, follow_up)
    chat = chat_messages(page)  # the first turn comes from the server's conversation, not from this page
    assert [role for role, _ in chat] == ["user", "bot", "user", "bot"], f"the stopped turn is gone: {chat}"
    [(_, first_question), (_, partial), (_, second_question), (_, answer)] = chat
    assert (first_question, second_question) == (QUESTION, follow_up)
    assert partial and answer
    # stopped mid-stream: a whole answer of PACED_TOKENS tokens is about a thousand characters
    assert len(partial) < 300, partial


@pytest.fixture(scope="module")
def folders(llava_runs) -> dict[str, Path]:
    """Tiny trained folders (stage 2 + a test image), shared through conftest.py."""
    return llava_runs


@pytest.fixture(scope="module")
def world(tiny_world) -> Path:
    return tiny_world


def _model_trained_on(tmp_path: Path, folders, data_path: Path, image_folder: Path | None) -> Path:
    """A copy of the stage-2 config.json that records other training data."""
    config = json.loads((folders["stage2"] / "config.json").read_text())
    config |= {"train_data_path": str(data_path), "train_image_folder": str(image_folder) if image_folder else None}
    tmp_path.mkdir()
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_training_records_its_data_in_config(folders):
    for kind, data in (("stage1", "pretrain.json"), ("stage2", "instruct.json"), ("lora", "instruct.json")):
        config = json.loads((folders[kind] / "config.json").read_text())
        assert config["train_data_path"] == str((folders["data"] / data).resolve())
        assert config["train_image_folder"] == str(folders["data"].resolve())


def test_examples_are_photos_unless_the_model_learned_shapes_world(folders, world, tmp_path):
    shapes_dir, why = shapes_source(folders["stage2"], None)  # trained on a folder that is not ShapesWorld
    assert shapes_dir is None and "photo" in why
    photos = example_rows(tmp_path / "cache", shapes_dir)
    assert [Path(image).stem for image, _ in photos] == list(PHOTO_QUESTIONS)

    questions = [json.loads(line) for line in (world / BENCH_DIR / "questions.jsonl").read_text().splitlines()]
    first = {q["image"]: q["text"] for q in reversed(questions)}  # each image's first question
    expected = [[str(world / BENCH_DIR / "images" / name), first[name]] for name in sorted(first)[:4]]
    for model in (
        _model_trained_on(tmp_path / "by-folder", folders, world / "llava" / "instruct.json", world),
        _model_trained_on(tmp_path / "by-json", folders, world / "llava" / "instruct.json", None),
    ):
        shapes_dir, why = shapes_source(model, None)
        assert shapes_dir == world and "training data" in why
        assert example_rows(tmp_path / "cache", shapes_dir) == expected
    assert shapes_source(folders["stage2"], world)[0] == world  # --shapes-dir decides for any model


def test_web_refuses_a_shapes_dir_that_is_not_shapes_world(folders, capsys):
    with pytest.raises(SystemExit):
        web_main(["--model-path", str(folders["stage2"]), "--shapes-dir", str(folders["data"])])
    assert "not a ShapesWorld folder" in capsys.readouterr().err


def test_app_shows_the_examples_chosen_for_its_model(app):
    with urllib.request.urlopen(app + "config", timeout=10) as response:
        components = json.load(response)["components"]
    samples = next(c["props"]["samples"] for c in components if c["type"] == "dataset")
    assert [(image["orig_name"], question) for image, question in samples] == [
        (f"{name}.jpg", question) for name, question in PHOTO_QUESTIONS.items()
    ]
