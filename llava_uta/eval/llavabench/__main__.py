"""llava-uta-bench: LLaVA-Bench evaluation in LLaVA's three steps (answer, review, summarize).

    llava-uta-bench answer --model-path checkpoints/llava-uta --question-file B/questions.jsonl \\
        --image-folder B/images --answers-file B/answers/llava-uta.jsonl
    llava-uta-bench review --question B/questions.jsonl --context B/context.jsonl \\
        --answer-list B/answers_gpt4.jsonl B/answers/llava-uta.jsonl --output B/reviews/llava-uta.jsonl \\
        --rule LLaVA/llava/eval/table/rule.json \\
        --judge http --judge-base-url https://api.openai.com/v1 --judge-model gpt-4-0613
    llava-uta-bench summarize B/reviews/*.jsonl --plot B/reviews/summary.png

`--rule` takes LLaVA's own rule.json (its judge prompts); scores are comparable only between reviews made by the
same judge model with the same rule file, which the summary names. For the ShapesWorld bench, `review --judge
shapes` scores offline against ground_truth.jsonl, and `grounding` measures, on held-out ShapesWorld images,
whether a model reads colour, shape, count and position off the image (accuracy per attribute, with chance):

    llava-uta-bench grounding --model-path M --question-file G/questions.jsonl --image-folder G/images \
        --answers-file runs/grounding/answers.jsonl --output runs/grounding/result.json
"""

from __future__ import annotations

import argparse
import logging

from llava_uta.argparsing import ArgumentParser
from llava_uta.eval.llavabench import answer, grounding, review, summarize

COMMANDS = {
    "answer": (answer, "answer the questions with a model"),
    "review": (review, "judge model answers against the reference answers"),
    "summarize": (summarize, "relative scores per category, tables and a chart"),
    "grounding": (grounding, "ShapesWorld: short-answer accuracy per attribute on held-out images"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="llava-uta-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=module.__doc__)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.run(args)


if __name__ == "__main__":
    main()
