"""ShapesWorld language: captions, questions and answers, all computed from a scene graph.

Every generated answer carries `facts`, a machine-checkable summary of what a correct answer states,
so that an offline judge can score free-form answers against the ground truth.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from llava_uta.data.shapes.scene import COLS, PLURALS, ROWS

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_PREFIXES = ("", "", "a photo of ", "a picture of ", "an image of ", "a drawing of ", "a rendering of ")
ZEROSHOT_TEMPLATES = (
    "a {}.",
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a drawing of a {}.",
    "a rendering of a {}.",
)
BRIEF_PROMPTS = (
    "Describe the image briefly.",
    "Give a short caption for this picture.",
    "What does this image show? Answer in a few words.",
    "Write a one-line summary of the picture.",
    "Summarize the scene in a short sentence.",
    "Provide a brief description of what you see.",
    "Caption this image.",
    "Tell me, briefly, what is in the picture.",
)
DETAIL_PROMPTS = (
    "Describe the image in detail.",
    "Give a thorough description of this picture.",
    "What is in this image? Describe every object you can see.",
    "Explain in detail what the picture shows.",
    "Walk me through everything that appears in the image.",
    "Provide a detailed account of the scene.",
)


@dataclass
class QA:
    """One question with its reference answer and the facts a correct answer must state."""

    question: str
    answer: str
    kind: str
    facts: dict = field(default_factory=dict)


def where(position: str) -> str:
    """A phrase locating a grid cell: 'in the top left corner', 'at the top', 'on the left', 'in the center'."""
    if position == "center":
        return "in the center"
    if position in ("top", "bottom"):
        return f"at the {position}"
    if position in ("left", "right"):
        return f"on the {position}"
    return f"in the {position} corner"


def noun(obj: dict, size: bool = True) -> str:
    return f"{obj['size']} {obj['color']} {obj['shape']}" if size else f"{obj['color']} {obj['shape']}"


def plural(shape: str, n: int) -> str:
    return shape if n == 1 else PLURALS[shape]


def count_phrase(n: int, words: str, shape: str) -> str:
    """'a red circle', 'two red circles': `words` precede the shape name."""
    head = "a" if n == 1 else NUMBERS[n]
    return " ".join(p for p in (head, words, plural(shape, n)) if p)


def join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def reading_order(scene: dict) -> list[dict]:
    return sorted(scene["objects"], key=lambda o: (o["row"], o["col"]))


def caption(scene: dict, rng: random.Random, prefix: bool = True) -> str:
    """A short caption naming every object; sizes and positions only sometimes, so shape carries weight."""
    use_size = rng.random() < 0.5
    objects = list(scene["objects"])
    rng.shuffle(objects)
    if rng.random() < 0.3:
        parts = [f"a {noun(o, use_size)} {where(o['position'])}" for o in objects]
    else:
        groups: dict[tuple, int] = {}
        for o in objects:
            key = (o["size"] if use_size else "", o["color"], o["shape"])
            groups[key] = groups.get(key, 0) + 1
        parts = [count_phrase(n, " ".join(p for p in key[:2] if p), key[2]) for key, n in groups.items()]
    head = rng.choice(CAPTION_PREFIXES) if prefix else ""
    return f"{head}{join(parts)}."


def detailed_description(scene: dict) -> str:
    """A complete, deterministic description: count, then every object in reading order."""
    objects = reading_order(scene)
    n = len(objects)
    lines = [f"The image shows {NUMBERS[n]} object{'s' if n > 1 else ''} on a dark, slightly noisy background."]
    for o in objects:
        lines.append(f"There is a {noun(o)} {where(o['position'])}.")
    colors = {o["color"] for o in objects}
    if n > 1 and len(colors) == 1:
        lines.append(f"All of the objects are {objects[0]['color']}.")
    return " ".join(lines)


def describe(obj: dict, scene: dict) -> str:
    """The shortest phrase that singles `obj` out in the scene: 'star', 'red star', 'small red star', ..."""
    others = [o for o in scene["objects"] if o is not obj]
    for keys in (("shape",), ("color", "shape"), ("size", "color", "shape")):
        if not any(all(o[k] == obj[k] for k in keys) for o in others):
            return " ".join(obj[k] for k in keys)
    return f"{noun(obj, size=False)} {where(obj['position'])}"


# ---- conversation questions: color, shape, count, position, existence ----


def ask_color(scene: dict, rng: random.Random) -> QA:
    o = rng.choice(scene["objects"])
    d = describe(o, scene)
    if rng.random() < 0.5 and o["color"] not in d.split():  # never name the colour asked for
        q = rng.choice(("What color is the {d}?", "Which color does the {d} have?", "Tell me the color of the {d}."))
        q = q.format(d=d)
    else:
        q = rng.choice(("What color is the object {w}?", "What is the color of the shape {w}?")).format(
            w=where(o["position"])
        )
    a = rng.choice(("It is {c}.", "The {s} is {c}.", "{C}.")).format(
        c=o["color"], s=o["shape"], C=o["color"].capitalize()
    )
    return QA(q, a, "color", {"color": o["color"]})


def ask_shape(scene: dict, rng: random.Random) -> QA:
    o = rng.choice(scene["objects"])
    q = rng.choice(("What shape is {w}?", "Which shape can you see {w}?", "What kind of shape is {w}?"))
    q = q.format(w=where(o["position"]))
    a = rng.choice(("It is a {n}.", "A {n}.", "There is a {n} there.")).format(n=noun(o))
    return QA(q, a, "shape", {"shape": o["shape"], "color": o["color"]})


def ask_count(scene: dict, rng: random.Random) -> QA:
    objects = scene["objects"]
    mode = rng.choice(("all", "color", "shape"))
    if mode == "all":
        n = len(objects)
        q = rng.choice(
            ("How many objects are there?", "How many shapes are in the picture?", "Count the objects in the image.")
        )
        a = f"There {'is' if n == 1 else 'are'} {NUMBERS[n]} object{'s' if n != 1 else ''}."
    elif mode == "color":
        color = rng.choice(objects)["color"] if rng.random() < 0.8 else rng.choice(("red", "blue", "white"))
        n = sum(o["color"] == color for o in objects)
        q = rng.choice(("How many {c} objects are there?", "How many things in the image are {c}?")).format(c=color)
        a = f"There {'is' if n == 1 else 'are'} {NUMBERS[n]} {color} object{'s' if n != 1 else ''}."
    else:
        shape = rng.choice(objects)["shape"] if rng.random() < 0.8 else rng.choice(("circle", "star", "cross"))
        n = sum(o["shape"] == shape for o in objects)
        q = rng.choice(("How many {p} can you see?", "How many {p} are in the image?")).format(p=PLURALS[shape])
        a = f"There {'is' if n == 1 else 'are'} {NUMBERS[n]} {plural(shape, n)}."
    return QA(q, a, "count", {"count": n})


def ask_position(scene: dict, rng: random.Random) -> QA:
    o = rng.choice(scene["objects"])
    d = describe(o, scene)
    q = rng.choice(("Where is the {d}?", "Where is the {d} located?", "In which part of the image is the {d}?"))
    a = rng.choice(("The {d} is {w}.", "It is {w}.", "You can find it {w}."))
    return QA(q.format(d=d), a.format(d=d, w=where(o["position"])), "position", {"position": o["position"]})


def ask_existence(scene: dict, rng: random.Random) -> QA:
    objects = scene["objects"]
    if rng.random() < 0.5:
        o = rng.choice(objects)
        color, shape = o["color"], o["shape"]
    else:
        present = {(o["color"], o["shape"]) for o in objects}
        color, shape = rng.choice(
            [(c, s) for c in ("red", "green", "blue", "yellow", "white") for s in PLURALS if (c, s) not in present]
        )
    matches = [o for o in objects if (o["color"], o["shape"]) == (color, shape)]
    q = rng.choice(
        ("Is there a {c} {s} in the image?", "Can you see a {c} {s}?", "Does the picture contain a {c} {s}?")
    )
    if matches:
        a = f"Yes, there is a {noun(matches[0])} {where(matches[0]['position'])}."
    else:
        a = f"No, there is no {color} {shape} in the image."
    return QA(q.format(c=color, s=shape), a, "existence", {"answer": "yes" if matches else "no"})


CONVERSATION_QUESTIONS = (ask_color, ask_shape, ask_count, ask_position, ask_existence)


# ---- complex reasoning: relations, conditional counts, comparisons ----

RELATIONS = {  # name: (question phrase, test on (a, b), axis used in the explanation)
    "above": ("above", lambda a, b: a["row"] < b["row"], "row"),
    "below": ("below", lambda a, b: a["row"] > b["row"], "row"),
    "left": ("to the left of", lambda a, b: a["col"] < b["col"], "col"),
    "right": ("to the right of", lambda a, b: a["col"] > b["col"], "col"),
}


def ask_relation(scene: dict, rng: random.Random) -> QA:
    a, b = rng.sample(scene["objects"], 2)
    phrase, test, axis = RELATIONS[rng.choice(list(RELATIONS))]
    da, db = describe(a, scene), describe(b, scene)
    yes = test(a, b)
    names = (ROWS if axis == "row" else COLS)[scene["grid"]]
    kind = "row" if axis == "row" else "column"
    why = f"the {da} is in the {names[a[axis]]} {kind} and the {db} is in the {names[b[axis]]} {kind}"
    q = rng.choice(("Is the {a} {p} the {b}?", "Would you say the {a} is {p} the {b}?")).format(a=da, p=phrase, b=db)
    verdict = f"the {da} is{'' if yes else ' not'} {phrase} the {db}"
    ans = f"{'Yes' if yes else 'No'}. Looking at their positions, {why}, so {verdict}."
    return QA(q, ans, "relation", {"answer": "yes" if yes else "no"})


def ask_conditional_count(scene: dict, rng: random.Random) -> QA:
    objects = scene["objects"]
    o = rng.choice(objects)
    if rng.random() < 0.5:
        n = sum(x["size"] == o["size"] and x["color"] == o["color"] for x in objects)
        q = f"How many {o['size']} objects are {o['color']}?"
        why = f"Among the {o['size']} objects, {NUMBERS[n]} {'is' if n == 1 else 'are'} {o['color']}"
    else:
        n = sum(x["shape"] != o["shape"] for x in objects)
        q = f"How many objects are not {PLURALS[o['shape']]}?"
        total, m = len(objects), len(objects) - n
        why = (
            f"There {'is' if total == 1 else 'are'} {NUMBERS[total]} object{'' if total == 1 else 's'} in total "
            f"and {NUMBERS[m]} of them {'is a' if m == 1 else 'are'} {plural(o['shape'], m)}, "
            f"which leaves {NUMBERS[n]}"
        )
    return QA(q, f"{why}. The answer is {NUMBERS[n]}.", "conditional_count", {"count": n})


def ask_size_comparison(scene: dict, rng: random.Random) -> QA:
    a, b = rng.sample(scene["objects"], 2)
    da, db = describe(a, scene), describe(b, scene)
    q = rng.choice(("Is the {a} larger than the {b}?", "Is the {a} bigger than the {b}?")).format(a=da, b=db)
    if a["size"] == b["size"]:
        ans, verdict = f"No, they are the same size: both are {a['size']}.", "no"
    elif a["size"] == "large":
        ans, verdict = f"Yes. The {da} is large while the {db} is small.", "yes"
    else:
        ans, verdict = f"No. The {da} is small while the {db} is large, so it is the other way round.", "no"
    return QA(q, ans, "size_comparison", {"answer": verdict})


def ask_count_comparison(scene: dict, rng: random.Random) -> QA:
    objects = scene["objects"]
    s1 = rng.choice(objects)["shape"]
    s2 = rng.choice([s for s in PLURALS if s != s1])
    n1, n2 = sum(o["shape"] == s1 for o in objects), sum(o["shape"] == s2 for o in objects)
    q = f"Are there more {PLURALS[s1]} than {PLURALS[s2]} in the image?"
    verdict = "yes" if n1 > n2 else "no"
    ans = (
        f"{verdict.capitalize()}. I count {NUMBERS[n1]} {plural(s1, n1)} and {NUMBERS[n2]} {plural(s2, n2)}, "
        f"so there {'are' if n1 > n2 else 'are not'} more {PLURALS[s1]}."
    )
    return QA(q, ans, "count_comparison", {"answer": verdict})


def ask_same_color(scene: dict, rng: random.Random) -> QA:
    colors = sorted({o["color"] for o in scene["objects"]})
    same = len(colors) == 1
    q = rng.choice(("Do all the objects have the same color?", "Are all the shapes the same color?"))
    if same:
        ans = f"Yes. Every object in the image is {colors[0]}."
    else:
        ans = f"No. The objects come in {NUMBERS[len(colors)]} colors: {join(colors)}."
    return QA(q, ans, "same_color", {"answer": "yes" if same else "no"})


def complex_question(scene: dict, rng: random.Random) -> QA:
    """A reasoning question; relations and comparisons need two objects."""
    makers = [ask_conditional_count, ask_count_comparison, ask_same_color]
    if len(scene["objects"]) > 1:
        makers += [ask_relation, ask_relation, ask_size_comparison]
    return rng.choice(makers)(scene, rng)


def detail_question(scene: dict, rng: random.Random) -> QA:
    objects = reading_order(scene)
    facts = {"objects": [{k: o[k] for k in ("shape", "color", "size", "position")} for o in objects]}
    return QA(rng.choice(DETAIL_PROMPTS), detailed_description(scene), "detail", facts)


def conversation(scene: dict, rng: random.Random, turns: int) -> list[QA]:
    """Several different kinds of question about one image, without repeating a question."""
    makers = rng.sample(CONVERSATION_QUESTIONS, turns)
    qas, seen = [], set()
    for make in makers:
        qa = make(scene, rng)
        if qa.question not in seen:
            seen.add(qa.question)
            qas.append(qa)
    return qas


# ---- short answers: LLaVA-1.5's VQA style ("Answer the question using a single word or phrase.") ----

SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
SHORT_QUESTIONS = {  # grounding kind -> question maker; relations need two objects
    "color": ask_color,
    "shape": ask_shape,
    "count": ask_count,
    "position": ask_position,
    "existence": ask_existence,
    "relation": ask_relation,
}


def short_answer(kind: str, facts: dict) -> str:
    """The one word or phrase that answers a question of `kind`: 'red', 'circle', 'three', 'top left', 'yes'."""
    if kind in ("color", "shape", "position"):
        return facts[kind]
    if kind == "count":
        return NUMBERS[facts["count"]]
    return facts["answer"]


def short_question(kind: str, scene: dict, rng: random.Random) -> QA:
    """A question of `kind` with the short-answer prompt, its short answer, and only the fact it asks for."""
    qa = SHORT_QUESTIONS[kind](scene, rng)
    key = {"count": "count", "existence": "answer", "relation": "answer"}.get(kind, kind)
    facts = {key: qa.facts[key]}
    return QA(f"{qa.question}\n{SHORT_ANSWER_PROMPT}", short_answer(kind, facts), kind, facts)


def short_kinds(scene: dict) -> list[str]:
    """The short-answer kinds a scene supports (relations need two objects)."""
    return [k for k in SHORT_QUESTIONS if k != "relation" or len(scene["objects"]) > 1]


def short_conversation(scene: dict, rng: random.Random, turns: int) -> list[QA]:
    """Several short-answer questions of different kinds about one image."""
    kinds = short_kinds(scene)
    return [short_question(k, scene, rng) for k in rng.sample(kinds, min(turns, len(kinds)))]
