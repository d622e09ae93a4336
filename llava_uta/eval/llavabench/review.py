"""Review model answers against reference answers with a judge (LLaVA's eval_gpt_review_bench / _visual).

Questions and both answer files are paired by question_id (LLaVA pairs by line order) and must cover the same
ids. Reviews are appended one by one in LLaVA's record format (`id, question_id, answer1_id, answer2_id,
category, content, tuple`), plus the judge model and the rule file's path and sha256; a rerun skips the questions
already reviewed and refuses a file made with another judge or rule. A judge failure or a review without a score
line is recorded with `"error"` and `tuple` [-1, -1], LLaVA's marker, and counted apart by the summary; `tuple`
is read leniently (`parse_score`), the summary re-reads `content` as LLaVA does for its `LLaVA rel.` column.

The prompts come from a rule file in LLaVA's rule.json format. For LLaVA's protocol pass LLaVA's own
`llava/eval/table/rule.json` with `--rule` (required with `--judge http`). The packaged `llava_uta_rule.json`
holds this project's own prompts, NOT LLaVA's: HTTP-judge scores made with it are not comparable with LLaVA's; it
is the default only for the offline ShapesWorld judge, which reads no prompt. The rule key of a question is
`llava_bench_` + category (eval_gpt_review_bench, In-the-Wild) or, for a COCO context with captions and boxes,
the bare category (eval_gpt_review_visual); `--category-prefix` overrides both.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from llava_uta.eval.llavabench.jsonl import AppendLog, by_question_id, read_jsonl
from llava_uta.eval.llavabench.judges import (
    FAILED,
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

OWN_RULE = Path(__file__).with_name("llava_uta_rule.json")  # this project's prompts, not LLaVA's
WILD_PREFIX = "llava_bench_"


@dataclass(frozen=True)
class RuleFile:
    """Judge prompts in LLaVA's rule.json format ({key: {"role", "prompt"}}), with the file's path and sha256."""

    path: str
    sha256: str
    rules: dict

    @classmethod
    def load(cls, path: str | os.PathLike) -> RuleFile:
        data = Path(path).read_bytes()
        try:
            rules = json.loads(data)
        except ValueError as err:
            raise ValueError(f"rule file {path}: not valid JSON ({err})") from err
        if not isinstance(rules, dict):
            raise ValueError(f"rule file {path}: expected a JSON object of rules by key, got {type(rules).__name__}")
        return cls(os.fspath(path), hashlib.sha256(data).hexdigest(), rules)

    def rule(self, key: str) -> dict:
        """The entry for `key`, checked to hold the 'role' and 'prompt' strings of LLaVA's format."""
        if key not in self.rules:
            raise ValueError(f"rule file {self.path} has no {key!r} entry (it has {', '.join(self.rules)})")
        rule = self.rules[key]
        if not (isinstance(rule, dict) and all(isinstance(rule.get(field), str) for field in ("role", "prompt"))):
            raise ValueError(f"rule file {self.path}: entry {key!r} needs 'role' and 'prompt' strings")
        return rule


def rule_key(category: str, context: dict, prefix: str | None = None) -> str:
    """LLaVA's rule key: bare category for a COCO context (captions + boxes), else `llava_bench_` + category."""
    if prefix is None:
        prefix = "" if "captions" in context else WILD_PREFIX
    return prefix + category


def source_key(record: dict) -> tuple:
    """What makes scores comparable: the judge model and the rule file's content (None where not recorded)."""
    return record.get("judge"), record.get("rule_sha256")


def is_failed(record: dict) -> bool:
    """A review without scores: our `error` field, or LLaVA's [-1, -1] tuple (review files written by LLaVA)."""
    return "error" in record or list(record["tuple"]) == FAILED


def review_source(record: dict) -> str:
    """'judge J, rule PATH (sha256 0123456789ab)'; 'not recorded' for what a review lacks (files written by LLaVA)."""
    rule = f"{record['rule']} (sha256 {record['rule_sha256'][:12]})" if "rule_sha256" in record else "not recorded"
    return f"judge {record.get('judge', 'not recorded')}, rule {rule}"


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
    return {"content": content, "tuple": list(FAILED), "error": error}


def review_all(
    judge: Judge,
    questions: list[dict],
    contexts: dict[str, dict],
    answers1: list[dict],
    answers2: list[dict],
    rules: RuleFile,
    output: str | Path,
    category_prefix: str | None = None,
    names: tuple[str, str] = ("answers 1", "answers 2"),
    retry_failed: bool = False,
) -> AppendLog:
    """Append a review for every question not yet in `output`; returns the log with all records.

    With `retry_failed`, the failed reviews already in `output` are asked again: they are taken out of the file first
    (atomically), each new review is appended as it comes, and the file is finally rewritten in question order. An
    interruption loses nothing: a review not yet re-asked is missing, and the next run asks it.
    """
    triples = pair_by_id(questions, answers1, answers2, names)
    log = AppendLog(output)
    if retry_failed and any(map(is_failed, log.records)):
        log.rewrite([r for r in log.records if not is_failed(r)])
    source = {"judge": judge.name, "rule": rules.path, "rule_sha256": rules.sha256}
    if others := {review_source(r) for r in log.records if source_key(r) != source_key(source)}:
        raise ValueError(
            f"{output} holds reviews made with {'; '.join(sorted(others))}, not {review_source(source)}: "
            "their scores are not comparable, write to another --output"
        )
    done = log.done_ids
    for position, (question, answer1, answer2) in enumerate(tqdm(triples, desc="reviews", unit="question")):
        if question["question_id"] in done:
            continue
        context = contexts[question["image"]]
        category = rule_key(question["category"], context, category_prefix)
        rule = rules.rule(category)
        messages = build_messages(render_context(context), question["text"], answer1["text"], answer2["text"], rule)
        item = ReviewItem(question, answer1, answer2, category, messages)
        record = {
            "id": position + 1,
            "question_id": question["question_id"],
            "answer1_id": answer1.get("answer_id", answer1["question_id"]),
            "answer2_id": answer2.get("answer_id", answer2["question_id"]),
            "category": category,
            **source,
        }
        record.update(judge_one(judge, item))
        log.append(record)
    if retry_failed:
        order = {question["question_id"]: i for i, (question, _, _) in enumerate(triples)}
        log.rewrite(sorted(log.records, key=lambda r: order.get(r["question_id"], len(order))))
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
    parser.add_argument(
        "--rule",
        help="judge prompts in LLaVA's rule.json format; LLaVA's own llava/eval/table/rule.json for its protocol "
        "(required with --judge http). Default for --judge shapes, which reads no prompt: llava_uta_rule.json",
    )
    parser.add_argument("--output", required=True, help="reviews .jsonl (appended; reruns resume)")
    parser.add_argument("--retry-failed", action="store_true",
                        help="ask the judge again for the failed reviews in --output (429s, 5xx, unparseable replies) "
                        "and replace them in place")
    parser.add_argument(
        "--category-prefix",
        help="rule key = prefix + category (default as LLaVA: '' for a COCO context, else 'llava_bench_')",
    )
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
    if args.rule is None and args.judge == "http":
        raise SystemExit(
            "--judge http needs --rule: LLaVA's llava/eval/table/rule.json for LLaVA's protocol, or "
            f"{OWN_RULE} for this project's own prompts (not LLaVA's: scores not comparable with LLaVA's)"
        )
    rules = RuleFile.load(args.rule or OWN_RULE)
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
        args.retry_failed,
    )
    failed = sum(map(is_failed, log.records))
    print(f"{len(log.records)} reviews in {args.output} ({failed} failed"
          + (", still failed after --retry-failed)" if args.retry_failed and failed else ")"))
