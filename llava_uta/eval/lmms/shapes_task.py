"""The local ShapesWorld tasks of lmms-eval (tasks/shapesworld/*.yaml): held-out grounding questions, offline.

    LLAVA_UTA_SHAPES_DIR=playground/data/shapes python -m lmms_eval --model llava_uta \\
        --model_args pretrained=M --include_path llava_uta/eval/lmms/tasks --tasks shapesworld

The questions are those of `llava-uta-bench grounding`: `eval/grounding/questions.jsonl` and its images under the
ShapesWorld folder written by `llava-uta-shapes --out DIR`, found through the LLAVA_UTA_SHAPES_DIR environment
variable (default: playground/data/shapes, relative to the working directory, as llava-uta-shapes writes it).
Nothing is downloaded: the task class reads the local file instead of calling `datasets.load_dataset` on the hub.
`shapesworld_grounding` asks the short-answer questions (16 new tokens, as the grounding bench) and reports the
accuracy per attribute kind and their mean; `shapesworld_detail` asks for the descriptions (128 new tokens) and
reports the object F1. Both score with `llava_uta.eval.llavabench.grounding.score`, so the numbers are those of
`llava-uta-bench grounding` on the same answers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import datasets
from lmms_eval.api.task import ConfigurableTask
from PIL import Image

from llava_uta.data.shapes.writer import GROUNDING_DIR
from llava_uta.eval.llavabench.grounding import KINDS, score
from llava_uta.eval.llavabench.jsonl import read_jsonl

SHAPES_DIR_ENV = "LLAVA_UTA_SHAPES_DIR"
DEFAULT_SHAPES_DIR = "playground/data/shapes"
QUESTION_FIELDS = ("question_id", "image", "text", "kind", "answer", "facts")
SUBSETS = {"short": KINDS, "detail": ("detail",)}  # the task YAML's dataset_name -> question kinds


def shapes_dir() -> Path:
    """The ShapesWorld folder: $LLAVA_UTA_SHAPES_DIR, or playground/data/shapes."""
    return Path(os.environ.get(SHAPES_DIR_ENV) or DEFAULT_SHAPES_DIR)


def load_questions(root: Path, subset: str) -> list[dict]:
    """The grounding questions of one subset as task documents (image path absolute, facts as JSON text)."""
    if subset not in SUBSETS:
        raise ValueError(f"unknown ShapesWorld subset {subset!r} (the task's dataset_name); expected {list(SUBSETS)}")
    path = root / GROUNDING_DIR / "questions.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"ShapesWorld grounding questions not found: {path}. Write a ShapesWorld with "
            f"`llava-uta-shapes --out DIR` and set {SHAPES_DIR_ENV}=DIR (default: {DEFAULT_SHAPES_DIR})"
        )
    docs = []
    for row in read_jsonl(path):
        missing = [f for f in QUESTION_FIELDS if f not in row]
        if missing:
            raise ValueError(f"{path}: question {row.get('question_id')!r} has no field(s) {missing}")
        if row["kind"] not in (*KINDS, "detail"):
            raise ValueError(f"{path}: question {row['question_id']!r} has unknown kind {row['kind']!r}; "
                             f"expected one of {KINDS} or 'detail'")
        if row["kind"] not in SUBSETS[subset]:
            continue
        image = (root / GROUNDING_DIR / "images" / row["image"]).resolve()
        if not image.is_file():
            raise FileNotFoundError(f"{path}: question {row['question_id']!r} names image {row['image']!r}, "
                                    f"which is not in {image.parent}")
        docs.append({"question_id": row["question_id"], "image_path": str(image), "question": row["text"],
                     "kind": row["kind"], "answer": row["answer"], "facts": json.dumps(row["facts"])})
    if not docs:
        raise ValueError(f"{path} holds no {subset} questions")
    return docs


class ShapesWorldTask(ConfigurableTask):
    """A ConfigurableTask whose documents are read from the local ShapesWorld folder, not the HF hub."""

    def __init__(self, config: dict | None = None, **kwargs) -> None:
        config = {k: v for k, v in (config or {}).items() if k != "class"}  # `class` is no TaskConfig field
        super().__init__(config=config, **kwargs)

    def download(self, dataset_kwargs: dict | None = None) -> None:
        docs = datasets.Dataset.from_list(load_questions(shapes_dir(), self.config.dataset_name or "short"))
        if self.config.process_docs is not None:
            docs = self.config.process_docs(docs)
        self.dataset = datasets.DatasetDict({self.config.test_split: docs})
        self.dataset_no_image = self.dataset  # documents hold image paths, no image columns to drop


def doc_to_visual(doc: dict) -> list[Image.Image]:
    with Image.open(doc["image_path"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question as `llava-uta-bench` asks it (optionally wrapped in the task's pre_prompt / post_prompt)."""
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def doc_to_target(doc: dict) -> str:
    return doc["answer"]


def process_results(doc: dict, results: list[str]) -> dict[str, dict]:
    """The answer with what scoring it needs, under the task's overall metric and its kind's metric."""
    item = {"question_id": doc["question_id"], "kind": doc["kind"], "facts": json.loads(doc["facts"]),
            "text": results[0]}
    if doc["kind"] == "detail":
        return {"object_f1": item}
    return {"mean_accuracy": item, f"{doc['kind']}_accuracy": item}


def _scored(items: list[dict]) -> dict:
    questions = [{"question_id": i["question_id"], "kind": i["kind"], "facts": i["facts"]} for i in items]
    return score(questions, [{"question_id": i["question_id"], "text": i["text"]} for i in items])


def aggregate_mean_accuracy(items: list[dict]) -> float:
    """The mean over kinds of the per-kind accuracy (llava-uta-bench grounding's `mean_accuracy`)."""
    return _scored(items)["mean_accuracy"]


def aggregate_object_f1(items: list[dict]) -> float:
    return _scored(items)["detail"]["object_f1"]


def _kind_accuracy(kind: str) -> Callable[[list[dict]], float]:
    def aggregate(items: list[dict]) -> float:
        return _scored(items)["kinds"][kind]["accuracy"]

    aggregate.__name__ = f"aggregate_{kind}_accuracy"
    aggregate.__doc__ = f"Accuracy on the {kind} questions."
    return aggregate


aggregate_color_accuracy = _kind_accuracy("color")
aggregate_shape_accuracy = _kind_accuracy("shape")
aggregate_count_accuracy = _kind_accuracy("count")
aggregate_position_accuracy = _kind_accuracy("position")
aggregate_existence_accuracy = _kind_accuracy("existence")
aggregate_relation_accuracy = _kind_accuracy("relation")
