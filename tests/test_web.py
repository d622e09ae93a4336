"""The Gradio app in a subprocess: the /chat API (streamed = greedy), concurrency, bad uploads, a real browser, and
the examples chosen for the model (ShapesWorld or photos)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import test_serve
from browser import CHROMIUM, Browser
from gradio_client import Client, handle_file
from PIL import Image

from llava_uta.data.shapes.writer import BENCH_DIR, ShapesWorldConfig, build
from llava_uta.serve.chat import ChatSession
from llava_uta.serve.examples import PHOTO_QUESTIONS, example_rows, shapes_source
from llava_uta.serve.images import MAX_PIXELS, open_upload, prepare
from llava_uta.serve.loader import load_pretrained_model
from llava_uta.serve.web import main as web_main

QUESTION = "What is in the image?"
MAX_NEW_TOKENS = 12
folders = test_serve.folders  # the module fixture of tiny trained folders (stage 2 + a test image)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(url: str, process: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the app exited:\n{log.read_text()}"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def app(folders) -> str:
    """The URL of `llava-uta-web` serving the tiny stage-2 folder (killed at the end)."""
    port, log = free_port(), folders["root"] / "web.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(test_serve.REPO),
           "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, "-m", "llava_uta.serve.web", "--model-path", str(folders["stage2"]), "--device", "cpu",
               "--port", str(port), "--concurrency", "2"]
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


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium: run tests/install_chromium.sh")
def test_browser_upload_chat_and_screenshot(app, folders):
    browser = Browser()
    try:
        browser.call("Page.navigate", url=app)
        browser.wait_for("document.querySelector('#image input[type=file]') !== null")
        browser.set_files("#image input[type=file]", folders["image"])
        browser.wait_for("document.querySelector('#image img') !== null")
        browser.evaluate("document.querySelector('#message textarea').focus()")
        browser.call("Input.insertText", text=QUESTION)
        browser.evaluate("document.querySelector('#send').click()")
        chat = "document.querySelector('#chat').innerText"
        text = browser.wait_for(f"{chat}.includes({QUESTION!r}) && {chat}.split({QUESTION!r})[1].trim()")
        assert text.strip()
        time.sleep(1.0)  # let the stream finish before the picture
        browser.screenshot(folders["root"] / "web.png")
    finally:
        browser.close()
    assert (folders["root"] / "web.png").stat().st_size > 10_000


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A tiny ShapesWorld folder, as llava-uta-shapes writes it."""
    out = tmp_path_factory.mktemp("web") / "shapes"
    build(ShapesWorldConfig(image_size=32, num_clip=8, num_pretrain=8, num_zeroshot_per_class=1, num_stage1=4,
                            num_stage2=4, num_bench_images=5, clip_group_size=2), out, workers=1)
    return out


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
