"""Answer the bench questions with a model (LLaVA's model_vqa): one image per question, greedy by default.

Each answer is appended (and fsync'ed) as soon as it exists; a rerun skips the question ids already in the file,
so an interrupted run resumes. `--num-chunks N --chunk-idx K` answers the K-th of N contiguous slices (LLaVA's
split), for one process per GPU; concatenate the chunk files afterwards (the reviewer pairs by question_id).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import uuid
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from llava_uta.eval.llavabench.jsonl import AppendLog, read_jsonl
from llava_uta.serve.chat import ChatSession, answer_many
from llava_uta.serve.loader import LoadedModel, add_model_arguments, load_from_args

logger = logging.getLogger(__name__)


def get_chunk(rows: list, num_chunks: int, chunk_idx: int) -> list:
    """The chunk_idx-th of num_chunks contiguous slices of ceil(len / num_chunks) rows."""
    if not 0 <= chunk_idx < num_chunks:
        raise ValueError(f"--chunk-idx {chunk_idx} is not in [0, {num_chunks})")
    size = math.ceil(len(rows) / num_chunks)
    return rows[chunk_idx * size : (chunk_idx + 1) * size]


def answer_questions(
    loaded: LoadedModel,
    questions: list[dict],
    image_folder: str | os.PathLike,
    answers_file: str | os.PathLike,
    model_id: str,
    conv_mode: str | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 1024,
    batch_size: int = 1,
) -> int:
    """Append an answer record for every question not answered yet; returns how many were written.

    With batch_size > 1, questions are answered `batch_size` at a time in one left-padded generate call.
    """
    log = AppendLog(answers_file)
    todo = [q for q in questions if q["question_id"] not in log.done_ids]
    logger.info("%d questions, %d already answered in %s", len(questions), len(questions) - len(todo), answers_file)
    conv_mode = conv_mode or loaded.conv_mode
    settings = {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens}
    for start in tqdm(range(0, len(todo), batch_size), desc="answers", unit="batch"):
        chunk = todo[start : start + batch_size]
        images = [Image.open(Path(image_folder, q["image"])).convert("RGB") for q in chunk]
        pairs = list(zip(images, [q["text"] for q in chunk], strict=True))
        if batch_size == 1:
            texts = [ChatSession(loaded, conv_mode, images[0]).answer(chunk[0]["text"], **settings)]
        else:
            texts = answer_many(loaded, pairs, conv_mode, **settings)
        for question, text in zip(chunk, texts, strict=True):
            log.append(answer_record(question, text, model_id, {"conv_mode": conv_mode, **settings}))
    return len(todo)


def answer_record(question: dict, text: str, model_id: str, metadata: dict) -> dict:
    """One line of an answers file (LLaVA's model_vqa fields)."""
    return {"question_id": question["question_id"], "prompt": question["text"], "text": text,
            "answer_id": uuid.uuid4().hex, "model_id": model_id, "metadata": metadata}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--question-file", required=True)
    parser.add_argument("--image-folder", required=True)
    parser.add_argument("--answers-file", required=True)
    parser.add_argument("--model-id", help="recorded with each answer (default: the model folder's name)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (LLaVA's evaluation setting)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--num-chunks", type=int, default=1)
    parser.add_argument("--chunk-idx", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=1, help="questions per generate call (left-padded)")


def run(args: argparse.Namespace) -> None:
    questions = get_chunk(read_jsonl(args.question_file), args.num_chunks, args.chunk_idx)
    written = answer_questions(
        load_from_args(args),
        questions,
        args.image_folder,
        args.answers_file,
        args.model_id or Path(args.model_path).name,
        args.conv_mode,
        args.temperature,
        args.top_p,
        args.max_new_tokens,
        args.batch_size,
    )
    print(f"answered {written} questions -> {args.answers_file}")
