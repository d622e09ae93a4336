"""Summarize review files: relative score per category and overall, as LLaVA's summarize_gpt_review.py.

Per category and for `all`: the mean of each score column rounded to 3 decimals, then relative score =
model mean / reference mean x 100, and both means x 10, each rounded to 1 decimal. Failed reviews (an `error`
field, or the [-1, -1] tuple of a review file written by LLaVA) are left out of those figures and counted. The
`LLaVA rel.` column is the relative score as LLaVA computes it: each review's `content` parsed by LLaVA's exact
parse_score (the stored tuple where a record has no content), failures averaged in as -1.

Each table names the judge model and rule file (path, sha256) the reviews were made with: scores are comparable
only between reviews by the same judge with the same rule file. LLaVA's published numbers were judged by
gpt-4-0314, which is retired, with LLaVA's llava/eval/table/rule.json.
"""

from __future__ import annotations

import argparse
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llava_uta.eval.llavabench.jsonl import read_jsonl
from llava_uta.eval.llavabench.judges import llava_parse_score
from llava_uta.eval.llavabench.review import WILD_PREFIX, is_failed, review_source, source_key
from llava_uta.io_utils import save_figure_atomic, write_text_atomic

CATEGORY_ORDER = ("conv", "detail", "complex")
COMPARABILITY = (
    "Scores are comparable only between reviews made by the same judge model with the same rule file (sha256). "
    "LLaVA's published LLaVA-Bench numbers were judged by gpt-4-0314 (retired) with LLaVA's llava/eval/table/rule.json."
)


@dataclass
class CategoryScore:
    category: str
    relative: float
    reference: float  # reference (GPT-4) mean x 10
    model: float  # model mean x 10
    reviews: int
    failed: int
    llava_relative: float  # relative score as LLaVA computes it: its parse of the reviews, failures as -1


def llava_figures(tuples: list[list[float]]) -> tuple[float, float, float]:
    """(relative %, reference x 10, model x 10) exactly as LLaVA rounds them; NaNs for no reviews."""
    if not tuples:
        return math.nan, math.nan, math.nan
    ref, model = (round(x, 3) for x in np.asarray(tuples, dtype=float).mean(0).tolist())
    relative = round(model / ref * 100, 1) if ref else math.nan
    return relative, round(ref * 10, 1), round(model * 10, 1)


def llava_tuple(record: dict) -> list[float]:
    """The score pair LLaVA's scripts would record: its parse_score of `content`, else the stored tuple."""
    return llava_parse_score(record["content"]) if "content" in record else list(record["tuple"])


def _order(category: str) -> tuple:
    name = category.removeprefix(WILD_PREFIX)
    return (name == "all", CATEGORY_ORDER.index(name) if name in CATEGORY_ORDER else len(CATEGORY_ORDER), name)


def summarize_reviews(records: list[dict]) -> list[CategoryScore]:
    """One row per category (conv, detail, complex, others) and `all`, in that order."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        groups[record["category"]].append(record)
        groups["all"].append(record)
    rows = []
    for category in sorted(groups, key=_order):
        group = groups[category]
        valid = [r["tuple"] for r in group if not is_failed(r)]
        relative, reference, model = llava_figures(valid)
        llava_relative = llava_figures([llava_tuple(r) for r in group])[0]
        name = category.removeprefix(WILD_PREFIX)
        rows.append(
            CategoryScore(name, relative, reference, model, len(group), len(group) - len(valid), llava_relative)
        )
    return rows


def _fmt(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.1f}"


def sources(records: list[dict]) -> list[str]:
    """The distinct judge + rule file descriptions of the reviews, in order of appearance."""
    return list(dict.fromkeys(map(review_source, records)))


def markdown_table(name: str, rows: list[CategoryScore], made_with: list[str]) -> str:
    """The per-category table of one review file, headed by the judge(s) and rule file(s) it was made with."""
    mixed = " (MIXED: scores within this file are not comparable)" if len(made_with) > 1 else ""
    lines = [
        f"### {name}",
        "",
        f"Made with {'; '.join(made_with)}{mixed}.",
        "",
        "| category | relative | reference x10 | model x10 | reviews | failed | LLaVA rel. (-1 incl.) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = (_fmt(r.relative), _fmt(r.reference), _fmt(r.model), str(r.reviews), str(r.failed))
        lines.append(f"| {r.category} | " + " | ".join(cells) + f" | {_fmt(r.llava_relative)} |")
    return "\n".join(lines)


def comparison_table(results: dict[str, list[CategoryScore]]) -> str:
    """Relative scores of several review files side by side."""
    categories = sorted({r.category for rows in results.values() for r in rows}, key=_order)
    lines = ["| reviews | " + " | ".join(categories) + " |", "|---|" + "---:|" * len(categories)]
    for name, rows in results.items():
        by_category = {r.category: r.relative for r in rows}
        lines.append(f"| {name} | " + " | ".join(_fmt(by_category.get(c, math.nan)) for c in categories) + " |")
    return "\n".join(lines)


def plot(results: dict[str, list[CategoryScore]], path: str | os.PathLike) -> None:
    """Grouped bars: relative score per category, one bar per review file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    categories = sorted({r.category for rows in results.values() for r in rows}, key=_order)
    width = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(categories) * max(1, len(results) / 2), 3.5))
    for i, (name, rows) in enumerate(results.items()):
        by_category = {r.category: r.relative for r in rows}
        xs = [j + (i - (len(results) - 1) / 2) * width for j in range(len(categories))]
        ax.bar(xs, [by_category.get(c, math.nan) for c in categories], width, label=name)
    ax.set_xticks(range(len(categories)), categories)
    ax.set_ylabel("relative score (%)")
    ax.axhline(100, color="grey", linewidth=0.8, linestyle="--")
    ax.legend(fontsize="small")
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=120)


def review_name(path: str | os.PathLike) -> str:
    return Path(path).name.removesuffix(".jsonl").removeprefix("gpt4_text_")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", help="review .jsonl files")
    parser.add_argument("--markdown", help="also write the tables to this file")
    parser.add_argument("--plot", help="bar chart PNG of the relative scores")


def run(args: argparse.Namespace) -> None:
    files = {review_name(path): read_jsonl(path) for path in args.files}
    results = {name: summarize_reviews(records) for name, records in files.items()}
    tables = [markdown_table(name, results[name], sources(records)) for name, records in files.items()]
    if len(results) > 1:
        same = len({frozenset(map(source_key, records)) for records in files.values()}) == 1
        warning = "" if same else "NOT COMPARABLE: these files were reviewed by different judges or rule files.\n\n"
        tables.append("### relative score (%)\n\n" + warning + comparison_table(results))
    tables.append(COMPARABILITY)
    text = "\n\n".join(tables) + "\n"
    print(text, end="")
    if args.markdown:
        write_text_atomic(args.markdown, text)
    if args.plot:
        plot(results, args.plot)
