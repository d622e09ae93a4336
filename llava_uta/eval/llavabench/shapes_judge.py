"""An offline, deterministic judge for the ShapesWorld bench: scores answers against the ground-truth facts.

Each question of `ground_truth.jsonl` carries `facts`, what a correct answer states: a colour, a shape, a count,
a position, a yes/no verdict, or (detail questions) every object with its colour, shape and position. An answer
earns 1 + 9 x the fraction of facts it states correctly, so 10 is fully right and 1 fully wrong; naming the right
value among wrong ones earns half. For a description that fraction is the objects described correctly (colour,
shape and position in one sentence) over the larger of the true and the described object counts, so invented
objects cost as much as missing ones. The review text is "s1 s2" and a line of reasons, as a GPT-4 judge writes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from llava_uta.data.shapes.language import NUMBERS
from llava_uta.data.shapes.scene import COLORS, PLURALS
from llava_uta.eval.llavabench.judges import ReviewItem

SHAPE_WORDS = {**{s: s for s in PLURALS}, **{p: s for s, p in PLURALS.items()}}
POSITION_RE = re.compile(r"\b(?:(top|bottom|upper|lower)[ -](left|right)|top|bottom|left|right|center|centre|middle)\b")
NUMBER_WORDS = {word: n for n, word in enumerate(NUMBERS)}


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def positions(text: str) -> list[str]:
    """Grid cells named in `text`, in ShapesWorld's vocabulary ('top left', 'top', 'center', ...)."""
    found = []
    for match in POSITION_RE.finditer(text.lower()):
        if match.group(1):
            row = {"upper": "top", "lower": "bottom"}.get(match.group(1), match.group(1))
            found.append(f"{row} {match.group(2)}")
        else:
            found.append({"centre": "center", "middle": "center"}.get(match.group(0), match.group(0)))
    return found


def stated_count(text: str) -> int | None:
    """The number an answer settles on: the first after its last 'answer is', else the last one it names."""
    lowered = text.lower()
    tail = lowered.rsplit("answer is", 1)[-1]
    numbers = [int(w) if w.isdigit() else NUMBER_WORDS[w] for w in words(tail) if w.isdigit() or w in NUMBER_WORDS]
    if not numbers:
        return None
    return numbers[0] if "answer is" in lowered else numbers[-1]


def verdict(text: str) -> str | None:
    """The first yes / no in the answer."""
    return next((w for w in words(text) if w in ("yes", "no")), None)


def credit(true_value: str, named: list[str]) -> float:
    """1 for naming only the true value, 0.5 for naming it among others, 0 otherwise."""
    if true_value not in named:
        return 0.0
    return 1.0 if set(named) == {true_value} else 0.5


def fact_credits(facts: dict, answer: str) -> dict[str, float]:
    """Credit per fact of a non-detail question."""
    found = {
        "color": lambda: [w for w in words(answer) if w in COLORS],
        "shape": lambda: [SHAPE_WORDS[w] for w in words(answer) if w in SHAPE_WORDS],
        "position": lambda: positions(answer),
    }
    credits = {}
    for key, value in facts.items():
        if key in found:
            credits[key] = credit(value, found[key]())
        elif key == "count":
            credits[key] = float(stated_count(answer) == value)
        elif key == "answer":
            credits[key] = float(verdict(answer) == value)
        else:
            raise ValueError(f"unknown ground-truth fact {key!r}")
    return credits


def described_objects(answer: str) -> list[tuple[set, set, set]]:
    """(colours, shapes, positions) named by each sentence of a description that names a shape."""
    described = []
    for sentence in re.split(r"[.;\n]+", answer):
        shapes = {SHAPE_WORDS[w] for w in words(sentence) if w in SHAPE_WORDS}
        if shapes:
            described.append(({w for w in words(sentence) if w in COLORS}, shapes, set(positions(sentence))))
    return described


def matched_objects(objects: list[dict], described: list[tuple[set, set, set]]) -> int:
    """How many true objects a description names correctly (colour, shape and position in one sentence)."""
    unmatched = list(objects)
    for colors, shapes, places in described:
        hit = next(
            (o for o in unmatched if {o["color"]} == colors and {o["shape"]} == shapes and o["position"] in places),
            None,
        )
        if hit is not None:
            unmatched.remove(hit)
    return len(objects) - len(unmatched)


def detail_credit(objects: list[dict], answer: str) -> tuple[float, str]:
    described = described_objects(answer)
    matched = matched_objects(objects, described)
    denominator = max(len(objects), len(described))
    return matched / denominator, f"{matched} of {len(objects)} objects described correctly, {len(described)} described"


def score_answer(facts: dict, answer: str) -> tuple[int, str]:
    """A 1-10 score and the reason."""
    if "objects" in facts:
        fraction, reason = detail_credit(facts["objects"], answer)
    else:
        credits = fact_credits(facts, answer)
        fraction = sum(credits.values()) / len(credits)
        reason = ", ".join(f"{k} {facts[k]!r}: {c:g}" for k, c in credits.items())
    return 1 + math.floor(9 * fraction + 0.5), reason  # halves round up


@dataclass
class ShapesJudge:
    """Scores both answers of a ShapesWorld question from its ground truth (question_id -> truth record)."""

    truth: dict
    name: str = "shapesworld-facts"

    def review(self, item: ReviewItem) -> str:
        qid = item.question["question_id"]
        if qid not in self.truth:
            raise KeyError(f"question_id {qid!r} is not in the ground truth")
        facts = self.truth[qid]["facts"]
        (s1, why1), (s2, why2) = (score_answer(facts, a["text"]) for a in (item.answer1, item.answer2))
        return f"{s1} {s2}\nAssistant 1: {why1}. Assistant 2: {why2}."
