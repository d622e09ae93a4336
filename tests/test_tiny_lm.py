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
