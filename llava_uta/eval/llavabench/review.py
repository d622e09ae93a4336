"""Review model answers against reference answers with a judge (LLaVA's eval_gpt_review_bench / _visual).

Questions and both answer files are paired by question_id (LLaVA pairs by line order) and must cover the same
ids. Reviews are appended one by one in LLaVA's record format (`id, question_id, answer1_id, answer2_id,
category, content, tuple`); a rerun skips the questions already reviewed. A judge failure or a review without a
score line is recorded with `"error"` and `tuple` [-1, -1], LLaVA's marker, and counted apart by the summary.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from tqdm import tqdm

from llava_uta.eval.llavabench.jsonl import AppendLog, by_question_id, read_jsonl
from llava_uta.eval.llavabench.judges import (
    HttpJudge,
    Judge,
    JudgeError,
    ReviewItem,
    build_messages,
    parse_score,
    render_context,
)
from llava_uta.eval.llavabench.shapes_judge import ShapesJudge

logger = logging.getLogger(__name__)

DEFAULT_RULE = Path(__file__).with_name("rule.json")
FAILED = [-1, -1]


def _ids(ids: set) -> str:
    shown = sorted(ids, key=str)
    return ", ".join(map(str, shown[:20])) + (f" ... ({len(shown)} in all)" if len(shown) > 20 else "")


def pair_by_id(questions: list[dict], answers1: list[dict], answers2: list[dict], names: tuple[str, str]) -> list:
    """(question, answer1, answer2) per question, in question order; ValueError naming ids that do not match."""
    index1, index2 = by_question_id(answers1, names[0]), by_question_id(answers2, names[1])
    wanted = set(by_question_id(questions, "questions"))
    problems = []
    for name, index in zip(names, (index1, index2), strict=True):
        if missing := wanted - set(index):
            problems.append(f"{name} lacks question ids {_ids(missing)}")
        if extra := set(index) - wanted:
            problems.append(f"{name} has ids that are not questions: {_ids(extra)}")
    if problems:
        raise ValueError("answer files do not cover the same questions: " + "; ".join(problems))
    return [(q, index1[q["question_id"]], index2[q["question_id"]]) for q in questions]


def judge_one(judge: Judge, item: ReviewItem) -> dict:
    """`content` and `tuple` of one review; a failed request or a missing score line adds `error`."""
    try:
        content = judge.review(item)
    except JudgeError as err:
        content, error = "", str(err)
    else:
        try:
            return {"content": content, "tuple": list(parse_score(content))}
        except ValueError as err:
            error = f"unparseable review: {err}"
    logger.warning("question %s: %s", item.question["question_id"], error)
    return {"content": content, "tuple": FAILED, "error": error}


def review_all(
    judge: Judge,
    questions: list[dict],
    contexts: dict[str, dict],
    answers1: list[dict],
    answers2: list[dict],
    rules: dict,
    output: str | Path,
    category_prefix: str = "llava_bench_",
    names: tuple[str, str] = ("answers 1", "answers 2"),
) -> AppendLog:
    """Append a review for every question not yet in `output`; returns the log with all records."""
    triples = pair_by_id(questions, answers1, answers2, names)
    log = AppendLog(output)
    done = log.done_ids
    for position, (question, answer1, answer2) in enumerate(tqdm(triples, desc="reviews", unit="question")):
        if question["question_id"] in done:
            continue
        category = category_prefix + question["category"]
        if category not in rules:
            raise KeyError(f"the rule file has no {category!r} entry (see --category-prefix)")
        context = render_context(contexts[question["image"]])
        messages = build_messages(context, question["text"], answer1["text"], answer2["text"], rules[category])
        item = ReviewItem(question, answer1, answer2, category, messages)
        record = {
            "id": position + 1,
            "question_id": question["question_id"],
            "answer1_id": answer1.get("answer_id", answer1["question_id"]),
            "answer2_id": answer2.get("answer_id", answer2["question_id"]),
            "category": category,
            "judge": judge.name,
        }
        record.update(judge_one(judge, item))
        log.append(record)
    return log


def make_judge(args: argparse.Namespace) -> Judge:
    if args.judge == "shapes":
        truth = Path(args.ground_truth or Path(args.question).with_name("ground_truth.jsonl"))
        return ShapesJudge(by_question_id(read_jsonl(truth), str(truth)))
    if not args.judge_base_url or not args.judge_model:
        raise SystemExit("--judge http needs --judge-base-url and --judge-model")
    return HttpJudge.from_env(
        args.judge_api_key_env,
        base_url=args.judge_base_url,
        model=args.judge_model,
        timeout=args.judge_timeout,
        max_retries=args.judge_retries,
        backoff=args.judge_backoff,
        max_tokens=args.max_tokens,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--question", required=True, help="questions.jsonl")
    parser.add_argument("--context", required=True, help="context.jsonl (captions) or COCO caps_boxes .jsonl")
    parser.add_argument("--answer-list", nargs=2, required=True, metavar=("REFERENCE", "MODEL"))
    parser.add_argument("--rule", default=str(DEFAULT_RULE), help="LLaVA rule.json format (default: ours)")
    parser.add_argument("--output", required=True, help="reviews .jsonl (appended; reruns resume)")
    parser.add_argument("--category-prefix", default="llava_bench_", help="rule key = prefix + category ('' for COCO)")
    parser.add_argument("--judge", choices=("http", "shapes"), default="http")
    parser.add_argument("--ground-truth", help="ShapesWorld ground_truth.jsonl (default: next to --question)")
    parser.add_argument("--judge-base-url", help="OpenAI-compatible API root, e.g. https://api.openai.com/v1")
    parser.add_argument("--judge-model", help="e.g. gpt-4-0613")
    parser.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="environment variable with the key")
    parser.add_argument("--judge-timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--judge-retries", type=int, default=6)
    parser.add_argument("--judge-backoff", type=float, default=1.0, help="first retry delay, doubled each time")
    parser.add_argument("--max-tokens", type=int, default=1024)


def run(args: argparse.Namespace) -> None:
    with open(args.rule) as f:
        rules = json.load(f)
    contexts = {row["image"]: row for row in read_jsonl(args.context)}
    answers1, answers2 = (read_jsonl(path) for path in args.answer_list)
    log = review_all(
        make_judge(args),
        read_jsonl(args.question),
        contexts,
        answers1,
        answers2,
        rules,
        args.output,
        args.category_prefix,
        tuple(args.answer_list),
    )
    failed = sum("error" in record for record in log.records)
    print(f"{len(log.records)} reviews in {args.output} ({failed} failed)")
