"""Does the assistant look at the image? Short-answer accuracy per attribute on held-out ShapesWorld images.

    llava-uta-bench grounding --model-path runs/shapes/llava/uta/stage2 \\
        --question-file playground/data/shapes/eval/grounding/questions.jsonl \\
        --image-folder playground/data/shapes/eval/grounding/images \\
        --answers-file runs/grounding/answers.jsonl --output runs/grounding/result.json

Every held-out image (`eval/grounding/`, never in a training split) gets one question of each kind: colour of
an object, its shape, a count, an object's position, whether an object exists, and a left/right/above/below
relation (scenes with two objects or more), each asked LLaVA-1.5's short-answer way ("Answer the question using
a single word or phrase."); plus a detailed description. An answer is right when it names the true value and no
other value of that attribute ("It is red." is right for red; "red or blue" is not), the count it settles on is
the true count, or its first yes / no is the true one. Descriptions are scored by object F1: an object counts as
found when one sentence names its colour, shape and position, F1 = 2 x found / (true objects + described
objects). Each kind's *chance* is the share of its most frequent true answer (what a model that always gives
that answer scores), the floor an image-blind model can reach from the question alone.

With `--scene-in-words`, `--model-path` is a text-only causal LM, folder or GGUF file (the LM LLaVA is built on), or
a LLaVA training output (its LM answers, no image given), and each short question comes after the image's detailed
description in words (the reference answer of its description question) in place of the image: how well the LLM
answers from facts in its context, the ceiling for a LLaVA model on it. The descriptions themselves are not asked
for in this mode.

    llava-uta-bench grounding --scene-in-words --model-path runs/shapes/tiny-lm \\
        --question-file playground/data/shapes/eval/grounding/questions.jsonl \\
        --answers-file runs/grounding/answers-lm.jsonl --output runs/grounding/lm.json
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from llava_uta.conversation import generation_prompt, get_template, with_bos
from llava_uta.data.shapes.scene import COLORS
from llava_uta.eval.llavabench.answer import answer_questions, answer_record
from llava_uta.eval.llavabench.jsonl import AppendLog, read_jsonl
from llava_uta.eval.llavabench.shapes_judge import (
    SHAPE_WORDS,
    described_objects,
    matched_objects,
    positions,
    stated_count,
    verdict,
)
from llava_uta.eval.llavabench.shapes_judge import words as answer_words
from llava_uta.io_utils import write_json_atomic
from llava_uta.model.language_model import load_language_model, load_tokenizer
from llava_uta.serve.chat import final_text
from llava_uta.serve.loader import (
    DEFAULT_CONV_MODE,
    add_model_arguments,
    is_llava_output,
    load_from_args,
    load_pretrained_model,
)

KINDS = ("color", "shape", "count", "position", "existence", "relation")
SHORT_MAX_NEW_TOKENS = 16


def named_values(kind: str, answer: str) -> set:
    """The values of the asked attribute that an answer names."""
    if kind == "color":
        return {w for w in answer_words(answer) if w in COLORS}
    if kind == "shape":
        return {SHAPE_WORDS[w] for w in answer_words(answer) if w in SHAPE_WORDS}
    if kind == "position":
        return set(positions(answer))
    if kind == "count":
        return {stated_count(answer)} - {None}
    return {verdict(answer)} - {None}


def truth_value(kind: str, facts: dict):
    return facts[{"count": "count", "existence": "answer", "relation": "answer"}.get(kind, kind)]


def is_correct(kind: str, facts: dict, answer: str) -> bool:
    """True when the answer names the true value of the asked attribute and no other value."""
    if kind not in KINDS:
        raise ValueError(f"unknown grounding question kind {kind!r}; expected one of {KINDS} or 'detail'")
    return named_values(kind, answer) == {truth_value(kind, facts)}


def object_f1(objects: list[dict], answer: str) -> float:
    """F1 of the objects a description names correctly (colour, shape and position in one sentence)."""
    described = described_objects(answer)
    return 2 * matched_objects(objects, described) / (len(objects) + len(described))


def score(questions: list[dict], answers: list[dict]) -> dict:
    """Accuracy and chance per kind, the description F1 and the mean accuracy over kinds."""
    by_id = {a["question_id"]: a["text"] for a in answers}
    missing = [q["question_id"] for q in questions if q["question_id"] not in by_id]
    if missing:
        raise ValueError(f"{len(missing)} questions have no answer (first ids: {missing[:5]})")
    result: dict = {"kinds": {}}
    for kind in KINDS:
        rows = [q for q in questions if q["kind"] == kind]
        if not rows:
            continue
        truths = Counter(str(truth_value(kind, q["facts"])) for q in rows)
        right = sum(is_correct(kind, q["facts"], by_id[q["question_id"]]) for q in rows)
        result["kinds"][kind] = {"n": len(rows), "accuracy": right / len(rows),
                                 "chance": truths.most_common(1)[0][1] / len(rows)}
    details = [q for q in questions if q["kind"] == "detail"]
    if details:
        f1 = [object_f1(q["facts"]["objects"], by_id[q["question_id"]]) for q in details]
        result["detail"] = {"n": len(details), "object_f1": sum(f1) / len(f1)}
    accuracies = [k["accuracy"] for k in result["kinds"].values()]
    result["mean_accuracy"] = sum(accuracies) / len(accuracies) if accuracies else None
    return result


def format_table(results: dict[str, dict]) -> str:
    """A markdown table, one row per model, accuracy per kind with the chance row first."""
    kinds = [k for k in KINDS if any(k in r["kinds"] for r in results.values())]
    first = next(iter(results.values()))
    head = "| model | " + " | ".join(kinds) + " | mean | description F1 |"
    lines = [head, "| --- |" + " ---: |" * (len(kinds) + 2)]
    chance = [f"{first['kinds'][k]['chance'] * 100:.0f}" if k in first["kinds"] else "" for k in kinds]
    lines.append("| chance (most frequent answer) | " + " | ".join(chance) + " | | |")
    for name, r in results.items():
        cells = [f"{r['kinds'][k]['accuracy'] * 100:.1f}" if k in r["kinds"] else "" for k in kinds]
        f1 = f"{r['detail']['object_f1'] * 100:.1f}" if "detail" in r else ""
        mean = "" if r["mean_accuracy"] is None else f"{r['mean_accuracy'] * 100:.1f}"  # descriptions only: no mean
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean} | {f1} |")
    return "\n".join(lines)


def scene_descriptions(questions: list[dict], where: str) -> dict[str, str]:
    """image -> its detailed description in words (the reference answer of its description question)."""
    descriptions = {q["image"]: q["answer"] for q in questions if q["kind"] == "detail"}
    missing = sorted({q["image"] for q in questions} - set(descriptions))
    if missing:
        raise ValueError(f"{where}: no description question (kind 'detail') for image(s) {missing[:5]}, which "
                         "--scene-in-words puts in place of the image")
    return descriptions


def answer_in_words(model_path: str, questions: list[dict], descriptions: dict[str, str], answers_file: str,
                    model_id: str, conv_mode: str | None, batch_size: int) -> None:
    """Greedy short answers of a text-only LM to each question after its image's description (appended, resumable);
    `conv_mode` defaults to a LLaVA output's own template, else v1."""
    if is_llava_output(model_path):  # e.g. a stage 2 trained on the scenes in words: its LM, no image
        loaded = load_pretrained_model(model_path, device="cpu")
        model, tokenizer, conv_mode = loaded.model, loaded.tokenizer, conv_mode or loaded.conv_mode
        tokenizer.padding_side = "left"  # answers follow every prompt
    else:
        tokenizer = load_tokenizer(model_path, padding_side="left")
        model, conv_mode = load_language_model(model_path).eval(), conv_mode or DEFAULT_CONV_MODE
    stop = get_template(conv_mode).stop_str
    log = AppendLog(answers_file)
    todo = [q for q in questions if q["question_id"] not in log.done_ids]
    for start in tqdm(range(0, len(todo), batch_size), desc="answers", unit="batch"):
        chunk = todo[start : start + batch_size]
        prompts = [with_bos(generation_prompt(conv_mode, [f"{descriptions[q['image']]}\n{q['text']}"]), tokenizer)
                   for q in chunk]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.inference_mode():
            output = model.generate(**inputs, do_sample=False, max_new_tokens=SHORT_MAX_NEW_TOKENS,
                                    stop_strings=[stop] if stop else None, tokenizer=tokenizer,
                                    pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for question, text in zip(chunk, texts, strict=True):
            log.append(answer_record(question, final_text(text, stop), model_id,
                                     {"conv_mode": conv_mode, "context": "scene in words", "temperature": 0.0}))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--question-file", required=True, help="eval/grounding/questions.jsonl of a ShapesWorld")
    parser.add_argument("--image-folder", help="the question file's images (not used with --scene-in-words)")
    parser.add_argument("--scene-in-words", action="store_true",
                        help="a text-only LM answers with each image's description in its place (see above)")
    parser.add_argument("--answers-file", required=True, help="answers are appended here (resumable)")
    parser.add_argument("--output", required=True, help="result JSON (accuracy and chance per kind, F1)")
    parser.add_argument("--model-id", help="recorded with each answer (default: the model folder's name)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="for descriptions; short answers get 16")
    parser.add_argument("--batch-size", type=int, default=8, help="questions per generate call (left-padded)")


def run(args: argparse.Namespace) -> None:
    questions = read_jsonl(args.question_file)
    unknown = sorted({q.get("kind") for q in questions} - {*KINDS, "detail"}, key=str)
    if unknown:
        raise ValueError(f"{args.question_file}: unknown question kind(s) {unknown}; expected {KINDS} or 'detail'")
    model_id = args.model_id or Path(args.model_path).name
    short = [q for q in questions if q["kind"] != "detail"]
    detail = [q for q in questions if q["kind"] == "detail"]
    if args.scene_in_words:
        descriptions = scene_descriptions(questions, args.question_file)
        answer_in_words(args.model_path, short, descriptions, args.answers_file, model_id, args.conv_mode,
                        args.batch_size)
        questions = short
    else:
        if args.image_folder is None:
            raise ValueError("--image-folder is required (unless --scene-in-words)")
        loaded = load_from_args(args)
        for rows, max_new_tokens in ((short, SHORT_MAX_NEW_TOKENS), (detail, args.max_new_tokens)):
            answer_questions(loaded, rows, args.image_folder, args.answers_file, model_id, args.conv_mode,
                             max_new_tokens=max_new_tokens, batch_size=args.batch_size)
    result = {"model_id": model_id, **score(questions, read_jsonl(args.answers_file))}
    write_json_atomic(args.output, result)
    print(format_table({model_id: result}))
