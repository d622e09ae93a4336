"""A tiny sentencepiece tokenizer and LlamaForCausalLM trained on text: the embedded-default LLM.

    llava-uta-tiny-lm --corpus playground/data/shapes/text/corpus.txt \\
        --chat_json playground/data/shapes/llava/instruct.json \\
        --sft_json playground/data/shapes/llava/text_instruct.json --sft_steps 2400 --out checkpoints/tiny-lm

The tokenizer is a byte-fallback BPE with `<image>` as a user-defined symbol (always one token) and `<pad>`,
`<unk>`, `<s>`, `</s>` at ids 0-3, its vocabulary fitted to the corpus: `--vocab_size` is an upper bound (a small
corpus gives fewer pieces, with a printed note), raised when the corpus has more distinct characters than it
allows. It is saved as a folder that `AutoTokenizer.from_pretrained` loads (checked against sentencepiece itself,
docs/environment.md#sentencepiece-tokenizers-in-transformers-5). The LM is then trained briefly (minutes on a CPU)
on the corpus, plus the text of LLaVA conversations rendered with a chat template if `--chat_json` is given, so
that it is not random. With `--sft_json` it is then instruction-tuned on text-only conversations, loss on the
answers only, as LLaVA starts from Vicuna (a chat model) rather than a plain LM: on ShapesWorld, the scenes written
in words, so that the LM learns to answer from facts in its context before it meets image tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from collections.abc import Callable
from pathlib import Path

import sentencepiece as spm
import torch
from tqdm import tqdm
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from llava_uta.argparsing import ArgumentParser
from llava_uta.constants import DEFAULT_IMAGE_TOKEN
from llava_uta.conversation import get_template
from llava_uta.data.llava_dataset import DataCollatorForSupervisedDataset, LazySupervisedDataset
from llava_uta.data.preprocess import build_conversation
from llava_uta.io_utils import write_jsonl_atomic
from llava_uta.model.llava_builder import add_image_token

SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


def chat_texts(chat_json: str | Path, version: str) -> list[str]:
    """LLaVA conversations rendered with the template, image tokens removed (the LM never sees pixels)."""
    texts = []
    for sample in json.loads(Path(chat_json).read_text()):
        conv = build_conversation(sample["conversations"], get_template(version), has_image="image" in sample)
        texts.append(conv.get_prompt().replace(DEFAULT_IMAGE_TOKEN + "\n", "").replace(DEFAULT_IMAGE_TOKEN, ""))
    return texts


def train_sentencepiece(texts: list[str], model_prefix: str, vocab_size: int) -> None:
    """Byte-fallback BPE with the pipeline's special tokens; `vocab_size` is an upper bound (hard_vocab_limit off)."""
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small corpus yields fewer pieces instead of an error
        model_type="bpe",
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        user_defined_symbols=[DEFAULT_IMAGE_TOKEN],
        byte_fallback=True,
        normalization_rule_name="identity",  # keep newlines and spaces as written (as Llama's tokenizer does)
        remove_extra_whitespaces=False,
        minloglevel=2,
    )


def train_tokenizer(texts: list[str], out_dir: str | Path, vocab_size: int = 1000):
    """Train the sentencepiece model, fitted to the corpus, save it as a transformers tokenizer folder, and load it.

    The vocabulary holds at most `vocab_size` pieces (fewer when the corpus has no more merges to offer) and at
    least what the corpus requires (its characters, 256 byte pieces and the 5 special tokens); a note is printed
    whenever the size differs from `vocab_size`.
    """
    if not texts:
        raise ValueError("no text to train the tokenizer on: the corpus is empty")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = str(out_dir / "tokenizer")
    try:
        train_sentencepiece(texts, prefix, vocab_size)
    except RuntimeError as err:
        required = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(err))
        if required is None:
            raise ValueError(f"sentencepiece could not train a tokenizer on this corpus: {err}") from None
        print(f"note: --vocab_size {vocab_size} is below the {required[1]} pieces this corpus requires (its "
              f"characters, 256 byte pieces, 5 special tokens): using {required[1]}")
        vocab_size = int(required[1])
        train_sentencepiece(texts, prefix, vocab_size)
    pieces = spm.SentencePieceProcessor(model_file=prefix + ".model").get_piece_size()
    if pieces < vocab_size:
        print(f"note: this corpus yields only {pieces} sentencepiece pieces: the vocabulary has {pieces}, "
              f"not --vocab_size {vocab_size}")
    (out_dir / "tokenizer.vocab").unlink()
    tokenizer = AutoTokenizer.from_pretrained(out_dir, add_bos_token=True, add_eos_token=False, **SPECIAL_TOKENS)
    specials = [*SPECIAL_TOKENS.values(), DEFAULT_IMAGE_TOKEN]  # sentencepiece reads these as text
    check_tokenizer(
        tokenizer, str(out_dir / "tokenizer.model"), [t for t in texts[:400] if not any(map(t.__contains__, specials))]
    )
    add_image_token(tokenizer)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def check_tokenizer(tokenizer, spm_file: str, texts: list[str]) -> None:
    """The transformers tokenizer must split plain text exactly as sentencepiece does."""
    reference = spm.SentencePieceProcessor(model_file=spm_file)
    for text in [*texts, "What is it?\n  Two  spaces."]:
        if tokenizer(text, add_special_tokens=False)["input_ids"] != reference.encode(text):
            raise RuntimeError(f"transformers and sentencepiece tokenize {text!r} differently")


def token_stream(texts: list[str], tokenizer) -> torch.Tensor:
    """Every text as <s> text </s>, concatenated."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return torch.tensor([t for seq in ids for t in (tokenizer.bos_token_id, *seq, tokenizer.eos_token_id)])


def tiny_llama_config(tokenizer, hidden_size: int = 128, num_layers: int = 4, max_len: int = 2048) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=num_layers,
        num_attention_heads=max(hidden_size // 32, 1),
        num_key_value_heads=max(hidden_size // 32, 1),
        max_position_embeddings=max_len,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def fit(model: LlamaForCausalLM, next_batch: Callable[[], dict], steps: int, lr: float, desc: str,
        betas: tuple[float, float], weight_decay: float) -> list[float]:
    """AdamW with warm-up and cosine decay, one `next_batch()` (model keyword arguments, labels included) a step;
    returns the per-step losses."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=betas)
    warmup = max(steps // 20, 1)
    schedule = lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / steps)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    losses = []
    progress = tqdm(range(steps), desc=desc, unit="step")
    for _ in progress:
        loss = model(**next_batch()).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        progress.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    return losses


def pretrain_lm(
    model: LlamaForCausalLM,
    stream: torch.Tensor,
    steps: int = 300,
    batch_size: int = 32,
    seq_len: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
) -> list[float]:
    """Next-token training on random windows of the token stream; returns the per-step losses."""
    gen = torch.Generator().manual_seed(seed)

    def next_batch() -> dict:
        starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=gen)
        batch = torch.stack([stream[s : s + seq_len] for s in starts.tolist()])
        return {"input_ids": batch, "labels": batch}

    return fit(model, next_batch, steps, lr, "tiny LM", betas=(0.9, 0.95), weight_decay=0.01)  # GPT-style


def instruction_tune(
    model: LlamaForCausalLM,
    dataset: LazySupervisedDataset,
    pad_token_id: int,
    steps: int,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
) -> list[float]:
    """Supervised fine-tuning on chat samples, loss on the answers only, with the optimiser settings of LLaVA's (and
    Vicuna's) Trainer runs: AdamW betas (0.9, 0.999), no weight decay; the samples reshuffled each epoch."""
    gen = torch.Generator().manual_seed(seed)
    collate = DataCollatorForSupervisedDataset(pad_token_id)
    order: list[int] = []

    def next_batch() -> dict:
        if len(order) < batch_size:
            order[:] = torch.randperm(len(dataset), generator=gen).tolist()
        batch = collate([dataset[i] for i in order[:batch_size]])
        del order[:batch_size]
        return batch

    return fit(model, next_batch, steps, lr, "instruction tuning", betas=(0.9, 0.999), weight_decay=0.0)


def text_only_samples(path: str | Path) -> int:
    """The number of samples in a text-only LLaVA JSON (instruction tuning has no tower); a clear error otherwise."""
    try:
        samples = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--sft_json {path}: cannot read it as JSON ({err})") from None
    if not isinstance(samples, list) or not samples:
        raise ValueError(f"--sft_json {path}: expected a non-empty JSON list of LLaVA samples")
    for i, sample in enumerate(samples):
        if not isinstance(sample, dict) or "conversations" not in sample:
            raise ValueError(f"--sft_json {path}: sample #{i} is not an object with 'conversations'")
        if "image" in sample:
            raise ValueError(f"--sft_json {path}: sample {sample.get('id', f'#{i}')!r} has an 'image'; the LM is "
                             "instruction-tuned on text-only samples (the scene in words)")
    return len(samples)


def mean_ends(losses: list[float]) -> str:
    """'first -> last', each the mean of up to 10 steps."""
    k = min(10, len(losses))
    return f"{sum(losses[:k]) / k:.3f} -> {sum(losses[-k:]) / k:.3f}"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True, help="text file, one passage per line")
    parser.add_argument("--chat_json", help="LLaVA conversation JSON to add, rendered with --version")
    parser.add_argument("--version", default="v1", help="chat template for --chat_json and --sft_json")
    parser.add_argument("--out", required=True, help="folder for the tokenizer and the model")
    parser.add_argument("--vocab_size", type=int, default=1000, help="at most (fitted to the corpus)")
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--sft_json", help="text-only LLaVA conversations to instruction-tune on after --steps "
                        "(loss on the answers, --version template), as LLaVA's LLM is a chat model")
    parser.add_argument("--sft_steps", type=int, default=0, help="instruction-tuning steps on --sft_json")
    parser.add_argument("--sft_batch_size", type=int, default=16)
    parser.add_argument("--sft_lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.sft_json) != (args.sft_steps > 0):
        parser.error("--sft_json and --sft_steps (> 0) go together")
    if args.sft_json:
        try:
            num_sft = text_only_samples(args.sft_json)
        except ValueError as err:
            parser.error(str(err))

    texts = [line for line in Path(args.corpus).read_text().splitlines() if line.strip()]
    if args.chat_json:
        texts += chat_texts(args.chat_json, args.version)
    if not texts:
        parser.error(f"--corpus {args.corpus} has no non-empty line (and --chat_json adds no conversation)")
    random.Random(args.seed).shuffle(texts)
    tokenizer = train_tokenizer(texts, args.out, args.vocab_size)
    stream = token_stream(texts, tokenizer)
    seq_len = min(args.seq_len, len(stream) - 1)
    if seq_len < args.seq_len:
        print(f"note: the corpus is {len(stream)} tokens long: windows of {seq_len}, not --seq_len {args.seq_len}")
    torch.manual_seed(args.seed)
    config = tiny_llama_config(tokenizer, args.hidden_size, args.num_layers)
    model = LlamaForCausalLM(config)
    start = time.time()
    losses = pretrain_lm(model, stream, args.steps, args.batch_size, seq_len, args.lr, args.seed)
    log = [{"step": i + 1, "stage": "pretrain", "loss": x} for i, x in enumerate(losses)]
    summary = f"loss {mean_ends(losses)} in {time.time() - start:.0f} s"
    if args.sft_json:
        start = time.time()
        dataset = LazySupervisedDataset(args.sft_json, tokenizer, None, args.version,
                                        tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN), "",
                                        config.max_position_embeddings)  # text-only conversations
        losses = instruction_tune(model, dataset, tokenizer.pad_token_id, args.sft_steps, args.sft_batch_size,
                                  args.sft_lr, args.seed)
        log += [{"step": len(log) + i + 1, "stage": "instruct", "loss": x} for i, x in enumerate(losses)]
        summary += f"; instruction tuning on {num_sft:,} conversations: answer loss {mean_ends(losses)} in " \
                   f"{time.time() - start:.0f} s"
    model.save_pretrained(args.out)
    write_jsonl_atomic(Path(args.out) / "train_log.jsonl", log)
    print(f"tiny LM: {model.num_parameters():,} params, {summary}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
