"""Serving on tiny trained folders: every folder kind loads, streaming = non-streaming, prompts, and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from llava_uta.conversation import generation_prompt
from llava_uta.serve.chat import ChatSession, final_text, safe_prefix
from llava_uta.serve.loader import folder_kind, load_pretrained_model, resolve_dtype

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folders(llava_runs) -> dict[str, Path]:
    """A stage-1, a stage-2 and a LoRA output of a few training steps each, and a test image (conftest.py)."""
    return llava_runs


@pytest.fixture(scope="module")
def stage2(folders):
    return load_pretrained_model(folders["stage2"], device="cpu")


def _session(loaded, folders, **kwargs) -> ChatSession:
    return ChatSession(loaded, image=Image.open(folders["image"]), **kwargs)


@pytest.mark.parametrize(("kind", "base"), [("stage2", None), ("lora", None), ("stage1", "lm")])
def test_each_folder_kind_loads_and_answers(folders, kind, base):
    expected_kind = {"stage2": "full", "lora": "lora", "stage1": "projector"}[kind]
    assert folder_kind(folders[kind]) == expected_kind
    loaded = load_pretrained_model(folders[kind], folders[base] if base else None, device="cpu")
    trained_with = "plain" if kind == "stage1" else "v1"  # each folder answers with the template it learned
    assert loaded.model.dtype == torch.float32 and loaded.conv_mode == trained_with and not loaded.model.training
    answer = _session(loaded, folders).answer("What is in the image?", max_new_tokens=6)
    assert isinstance(answer, str)


def test_lora_folder_loads_merged_to_the_trained_weights(folders):
    from llava_uta.model.llava_builder import load_lora_model

    loaded = load_pretrained_model(folders["lora"], device="cpu")
    unmerged = load_lora_model(folders["lora"]).eval()
    inputs = _session(loaded, folders)._inputs("USER: <image>\nhi ASSISTANT:")
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**inputs).logits, unmerged(**inputs).logits, atol=1e-5, rtol=1e-5)


def test_dtype_follows_the_device():
    assert resolve_dtype("cpu") == torch.float32
    assert resolve_dtype("cpu", "bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="float16"):
        resolve_dtype("cpu", torch.float16)


def test_streamed_answer_equals_the_greedy_answer(stage2, folders):
    streamed = "".join(_session(stage2, folders).ask("What is in the image?", temperature=0, max_new_tokens=12))
    whole = _session(stage2, folders).answer("What is in the image?", max_new_tokens=12)
    assert streamed == whole and whole


def test_counting_a_prompt_then_answering_it_prepares_the_inputs_once(stage2, folders, monkeypatch):
    session, calls = _session(stage2, folders), []

    class Counting:
        def __init__(self, processor):
            self.processor = processor

        def __call__(self, **kwargs):
            calls.append(kwargs["text"])
            return self.processor(**kwargs)

        def __getattr__(self, name):
            return getattr(self.processor, name)

    monkeypatch.setattr(stage2, "processor", Counting(stage2.processor))
    counted = session.prompt_tokens("What is in the image?")
    answer = session.answer("What is in the image?", max_new_tokens=4)
    assert len(calls) == 1 and session.last.prompt_tokens == counted
    session.answer("And its colour?", max_new_tokens=4)  # a new prompt: prepared again
    session.reset(Image.new("RGB", (32, 32), "red"))
    session.answer("What is in the image?", max_new_tokens=4)  # the same question, another image
    assert len(calls) == 3 and answer == _session(stage2, folders).answer("What is in the image?", max_new_tokens=4)


def test_cancel_stops_generation_and_keeps_the_partial_answer(stage2, folders):
    config = stage2.model.generation_config
    config.min_new_tokens, old = 200, config.min_new_tokens  # no early end of sequence: only cancel can stop it
    try:
        whole = _session(stage2, folders).answer("What is in the image?", max_new_tokens=200)
        session = _session(stage2, folders)
        stream = session.ask("What is in the image?", temperature=0, max_new_tokens=200)
        first = next(stream)
        session.cancel()
        partial = first + "".join(stream)
    finally:
        config.min_new_tokens = old
    assert whole.startswith(partial) and 0 < len(partial) < len(whole)
    assert session.turns == ["What is in the image?", partial]


def test_closing_the_stream_stops_generation(stage2, folders):
    session = _session(stage2, folders)
    stream = session.ask("What is in the image?", temperature=0, max_new_tokens=200)
    next(stream)
    stream.close()  # what a front end does when its user stops listening
    assert session._cancel.is_set() and session.turns == []


def test_multi_turn_prompt_is_the_template_rendering(stage2, folders):
    session = _session(stage2, folders, conv_mode="vicuna_v1")
    first = session.answer("What is in the image?", max_new_tokens=5)
    second = "".join(session.ask("What color is it?", temperature=0, max_new_tokens=5))
    expected = generation_prompt(
        "vicuna_v1", ["<image>\nWhat is in the image?", first, "What color is it?", second, "Is it big?"]
    )
    assert session.prompt("Is it big?") == expected
    regenerated = "".join(session.regenerate(temperature=0, max_new_tokens=5))
    assert regenerated == second and len(session.turns) == 4
    session.reset()
    assert session.prompt("Hi") == generation_prompt("vicuna_v1", ["<image>\nHi"])


def test_sampling_respects_the_seed(stage2, folders):
    answers = []
    for _ in range(2):
        torch.manual_seed(0)
        answers.append(_session(stage2, folders).answer("Describe it.", temperature=1.0, top_p=0.9, max_new_tokens=8))
    assert answers[0] == answers[1]


def test_stop_string_handling():
    assert final_text("  a cat.</s>junk", "</s>") == "a cat."
    assert safe_prefix(" a cat.</", "</s>") == "a cat."  # a partial stop string is held back
    assert safe_prefix(" a cat. ", "</s>") == "a cat."
    assert final_text("a cat\nmore", "\n") == "a cat"


def test_cli_round_trip(folders):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "llava_uta.serve.cli", "--model-path", str(folders["stage2"]),
               "--image-file", str(folders["image"]), "--temperature", "0", "--max-new-tokens", "6"]
    done = subprocess.run(command, input="What is in the image?\nAnd the color?\n", capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("ASSISTANT:") == 2 and done.stdout.rstrip().endswith("USER:")
