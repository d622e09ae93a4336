"""The grounding measure: held-out short-answer questions, scored per attribute against hand-written answers."""

from __future__ import annotations

import json
import random

import pytest
from llava_helpers import make_lm_dir, make_tokenizer_dir

from llava_uta.data.shapes import language as lang
from llava_uta.data.shapes.scene import sample_scene
from llava_uta.data.shapes.writer import grounding_questions
from llava_uta.eval.llavabench import grounding
from llava_uta.eval.llavabench.__main__ import main as bench_main
from llava_uta.eval.llavabench.grounding import format_table, is_correct, object_f1, score

SCENE = {"objects": [
    {"shape": "circle", "color": "red", "size": "large", "row": 0, "col": 0, "position": "top left"},
    {"shape": "star", "color": "blue", "size": "small", "row": 1, "col": 1, "position": "center"},
    {"shape": "square", "color": "red", "size": "small", "row": 2, "col": 2, "position": "bottom right"},
]}


@pytest.mark.parametrize(("kind", "facts", "answer", "right"), [
    ("color", {"color": "red"}, "red", True),
    ("color", {"color": "red"}, "It is red.", True),
    ("color", {"color": "red"}, "Blue.", False),
    ("color", {"color": "red"}, "red or blue", False),  # partly right: names the truth among others
    ("color", {"color": "red"}, "I cannot tell.", False),
    ("shape", {"shape": "star"}, "stars", True),
    ("shape", {"shape": "star"}, "A small blue star.", True),
    ("shape", {"shape": "star"}, "a star and a circle", False),
    ("count", {"count": 3}, "three", True),
    ("count", {"count": 3}, "3", True),
    ("count", {"count": 3}, "There are two objects.", False),
    ("count", {"count": 3}, "Two, no, the answer is three.", True),  # the count it settles on
    ("position", {"position": "top left"}, "top left", True),
    ("position", {"position": "top left"}, "In the upper left corner.", True),
    ("position", {"position": "top left"}, "top", False),
    ("position", {"position": "top left"}, "top left or bottom right", False),
    ("existence", {"answer": "yes"}, "Yes", True),
    ("existence", {"answer": "yes"}, "No, there is none.", False),
    ("relation", {"answer": "no"}, "no", True),
    ("relation", {"answer": "no"}, "maybe", False),
])
def test_short_answers_are_right_only_when_they_name_the_truth_alone(kind, facts, answer, right):
    assert is_correct(kind, facts, answer) is right


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown grounding question kind 'size'"):
        is_correct("size", {"size": "large"}, "large")


def test_description_f1_counts_missing_and_invented_objects():
    objects = SCENE["objects"]
    full = "There is a large red circle in the top left corner. There is a small blue star in the center. " \
           "There is a small red square in the bottom right corner."
    assert object_f1(objects, full) == 1.0
    one_wrong = full.replace("blue star", "green star")  # 2 of 3 found, 3 described
    assert object_f1(objects, one_wrong) == pytest.approx(2 * 2 / 6)
    invented = full + " There is a white cross at the top."  # 3 found, 4 described
    assert object_f1(objects, invented) == pytest.approx(2 * 3 / 7)
    assert object_f1(objects, "A picture.") == 0.0


def test_score_gives_accuracy_and_majority_chance_per_kind():
    questions = [
        {"question_id": 0, "kind": "color", "facts": {"color": "red"}},
        {"question_id": 1, "kind": "color", "facts": {"color": "red"}},
        {"question_id": 2, "kind": "color", "facts": {"color": "blue"}},
        {"question_id": 3, "kind": "count", "facts": {"count": 2}},
        {"question_id": 4, "kind": "detail", "facts": {"objects": SCENE["objects"][:1]}},
    ]
    answers = [{"question_id": 0, "text": "red"}, {"question_id": 1, "text": "blue"},
               {"question_id": 2, "text": "blue"}, {"question_id": 3, "text": "two"},
               {"question_id": 4, "text": "There is a large red circle in the top left corner."}]
    result = score(questions, answers)
    assert result["kinds"]["color"] == {"n": 3, "accuracy": pytest.approx(2 / 3), "chance": pytest.approx(2 / 3)}
    assert result["kinds"]["count"] == {"n": 1, "accuracy": 1.0, "chance": 1.0}
    assert result["detail"] == {"n": 1, "object_f1": 1.0}
    assert result["mean_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    table = format_table({"model": result})
    assert "| model | 66.7 | 100.0 | 83.3 | 100.0 |" in table
    assert "| chance (most frequent answer) | 67 | 100 |" in table
    with pytest.raises(ValueError, match="1 questions have no answer"):
        score(questions, answers[:-1])


def test_held_out_questions_carry_their_short_answer_which_scores_right():
    rng = random.Random(0)
    scenes = [sample_scene(rng, 64) for _ in range(40)]
    for i, s in enumerate(scenes):
        s["image"] = f"eval/grounding/images/{i:03d}.png"
    rows = grounding_questions(scenes, random.Random(1))
    kinds = {r["kind"] for r in rows}
    assert kinds == {"color", "shape", "count", "position", "existence", "relation", "detail"}
    for r in rows:
        if r["kind"] == "detail":
            assert object_f1(r["facts"]["objects"], r["answer"]) == 1.0  # the reference description is perfect
        else:
            assert r["text"].endswith("\n" + lang.SHORT_ANSWER_PROMPT)
            assert is_correct(r["kind"], r["facts"], r["answer"]), r
    per_image = [sum(r["image"] == f"{i:03d}.png" for r in rows) for i in range(40)]
    assert all(n == (7 if len(s["objects"]) > 1 else 6) for n, s in zip(per_image, scenes, strict=True))


def test_colour_questions_never_name_the_colour_they_ask_for():
    rng = random.Random(0)
    for _ in range(300):
        scene = sample_scene(rng, 64)
        qa = lang.ask_color(scene, rng)
        assert qa.facts["color"] not in qa.question.lower().split()


def test_scene_in_words_asks_a_text_lm_each_short_question_after_the_description(tmp_path, monkeypatch):
    lm = make_lm_dir(tmp_path / "lm", make_tokenizer_dir(tmp_path / "tok"))
    rng = random.Random(0)
    scenes = [sample_scene(rng, 64, grid=2) for _ in range(2)]
    for i, scene in enumerate(scenes):
        scene["image"] = f"eval/grounding/images/{i:03d}.png"
    rows = grounding_questions(scenes, rng)
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = []
    original = grounding.generation_prompt

    def spy(mode: str, turns: list[str]) -> str:
        prompts.append(turns)
        return original(mode, turns)

    monkeypatch.setattr(grounding, "generation_prompt", spy)
    args = lambda answers: ["grounding", "--scene-in-words", "--model-path", str(lm), "--question-file",
                            str(questions), "--answers-file", str(tmp_path / answers),
                            "--output", str(tmp_path / "result.json"), "--batch-size", "4"]
    bench_main(args("answers.jsonl"))

    short = [r for r in rows if r["kind"] != "detail"]
    described = {r["image"]: r["answer"] for r in rows if r["kind"] == "detail"}
    assert sorted(prompts) == sorted([[f"{described[r['image']]}\n{r['text']}"] for r in short])
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert sorted(a["question_id"] for a in answers) == [r["question_id"] for r in short]
    assert all(a["metadata"]["context"] == "scene in words" for a in answers)
    result = json.loads((tmp_path / "result.json").read_text())
    assert "detail" not in result and set(result["kinds"]) == {r["kind"] for r in short}

    bench_main(args("answers.jsonl"))  # resumes: every question is answered already
    assert len((tmp_path / "answers.jsonl").read_text().splitlines()) == len(short)

    questions.write_text("".join(json.dumps(r) + "\n" for r in rows if r["kind"] != "detail"))
    with pytest.raises(ValueError, match="no description question .*'000.png'"):
        bench_main(args("other.jsonl"))


@pytest.mark.parametrize("source", ["llava", "gguf"])
def test_scene_in_words_takes_a_llava_output_or_a_gguf_lm(source, llava_runs, chat_gguf, tmp_path):
    """A LLaVA folder answers with its LM and its own template (the ladder's words step); a GGUF LM with --conv-mode."""
    rng = random.Random(1)
    scenes = [sample_scene(rng, 64, grid=2) for _ in range(2)]
    for i, scene in enumerate(scenes):
        scene["image"] = f"eval/grounding/images/{i:03d}.png"
    rows = grounding_questions(scenes, rng)
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model, mode = (llava_runs["stage2"], []) if source == "llava" else (chat_gguf, ["--conv-mode", "chatml"])
    bench_main(["grounding", "--scene-in-words", "--model-path", str(model), *mode, "--question-file", str(questions),
                "--answers-file", str(tmp_path / "answers.jsonl"), "--output", str(tmp_path / "result.json")])
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == sum(r["kind"] != "detail" for r in rows)
    assert {a["metadata"]["conv_mode"] for a in answers} == {"v1" if source == "llava" else "chatml"}
