"""llava-uta-tiny-lm on a user's small corpus: the vocabulary is fitted to the corpus, the special tokens stay."""

from __future__ import annotations

import json

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer, LlamaForCausalLM

from llava_uta.train.tiny_lm import main, train_tokenizer

SMALL_CORPUS = ["A red circle is at the top left.", "Two blue squares.", "What is it?\nA green cross."] * 5


def _run(tmp_path, lines: list[str], *flags: str):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    out = tmp_path / "lm"
    main(["--corpus", str(corpus), "--out", str(out), "--hidden_size", "32", "--num_layers", "1", "--steps", "2",
          "--batch_size", "2", *flags])
    return out


def test_small_corpus_trains_with_a_vocabulary_fitted_to_it(tmp_path, capsys):
    out = _run(tmp_path, SMALL_CORPUS)  # default --vocab_size 1000: sentencepiece alone stops at this corpus
    pieces = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model")).get_piece_size()
    assert 261 < pieces < 1000  # 256 bytes + 5 specials + the corpus' characters and merges
    assert f"only {pieces} sentencepiece pieces" in capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<pad>", "<unk>", "<s>", "</s>")] == [0, 1, 2, 3]
    assert len(tokenizer("<image>", add_special_tokens=False)["input_ids"]) == 1
    assert LlamaForCausalLM.from_pretrained(out).config.vocab_size == len(tokenizer) == pieces
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2]


def test_a_reachable_vocab_size_is_met_exactly(tmp_path, capsys):
    train_tokenizer(SMALL_CORPUS, tmp_path, vocab_size=300)
    assert spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model")).get_piece_size() == 300
    assert "note" not in capsys.readouterr().out


def test_too_small_vocab_size_is_raised_to_what_the_corpus_requires(tmp_path, capsys):
    train_tokenizer(SMALL_CORPUS, tmp_path, vocab_size=100)
    required = 5 + 256 + len(set("".join(SMALL_CORPUS)))  # specials, bytes, characters
    assert spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model")).get_piece_size() == required
    assert f"--vocab_size 100 is below the {required} pieces" in capsys.readouterr().out


def test_corpus_shorter_than_seq_len_trains_on_shorter_windows(tmp_path, capsys):
    out = _run(tmp_path, ["Two blue squares."], "--seq_len", "128")
    assert "windows of" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file()


def test_empty_corpus_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _run(tmp_path, ["", "  "])
    assert "has no non-empty line" in capsys.readouterr().err


def _text_chat(tmp_path, samples: list[dict]):
    path = tmp_path / "text_instruct.json"
    path.write_text(json.dumps(samples))
    return path


TEXT_CHAT = [{"id": f"t{i}", "conversations": [
    {"from": "human", "value": f"There is a {color} circle.\nWhat colour is the circle?"},
    {"from": "gpt", "value": f"The circle is {color}."}]} for i, color in enumerate(["red", "blue", "green"] * 4)]


def test_instruction_tuning_follows_pretraining_and_fits_the_answers(tmp_path, capsys):
    sft = _text_chat(tmp_path, TEXT_CHAT)
    out = _run(tmp_path, SMALL_CORPUS, "--sft_json", str(sft), "--sft_steps", "40", "--sft_batch_size", "6",
               "--sft_lr", "1e-2")
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 43))
    assert [r["stage"] for r in log] == ["pretrain"] * 2 + ["instruct"] * 40
    losses = [r["loss"] for r in log[2:]]
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])
    assert "instruction tuning on 12 conversations" in capsys.readouterr().out
    assert LlamaForCausalLM.from_pretrained(out).config.vocab_size == len(AutoTokenizer.from_pretrained(out))


@pytest.mark.parametrize("samples, flags, message", [
    ([{**TEXT_CHAT[0], "image": "x.png"}], ("--sft_steps", "2"), "sample 't0' has an 'image'"),
    ({"conversations": []}, ("--sft_steps", "2"), "expected a non-empty JSON list"),
    (TEXT_CHAT, (), "--sft_json and --sft_steps"),
])
def test_bad_instruction_data_is_a_clear_error_before_training(tmp_path, capsys, samples, flags, message):
    sft = _text_chat(tmp_path, samples)
    with pytest.raises(SystemExit):
        _run(tmp_path, SMALL_CORPUS, "--sft_json", str(sft), *flags)
    assert message in capsys.readouterr().err
    assert not (tmp_path / "lm").exists()  # nothing trained, nothing written
