"""lmms-eval adapter (llava_uta/eval/lmms): the local ShapesWorld tasks run through `python -m lmms_eval --model
llava_uta` give the answers of `llava-uta-bench answer`, loglikelihoods match the model's loss, and unloadable
folders / unsupported requests fail naming what is wrong. Skipped without lmms-eval (`pip install -e ".[lmms]"`),
except the checks that the core package never needs it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from serving_helpers import free_port

from llava_uta.eval.llavabench.__main__ import main as bench_main
from llava_uta.eval.llavabench.grounding import KINDS, score
from llava_uta.eval.llavabench.jsonl import read_jsonl

REPO = Path(__file__).resolve().parents[1]
HAS_LMMS = importlib.util.find_spec("lmms_eval") is not None
needs_lmms = pytest.mark.skipif(not HAS_LMMS, reason="lmms-eval is not installed (pip install -e '.[lmms]')")


# ---- the core package works without lmms-eval (run with or without it) ----

def test_only_the_adapter_package_imports_lmms_eval():
    adapter = REPO / "llava_uta" / "eval" / "lmms"
    importing = [p.relative_to(REPO) for p in (REPO / "llava_uta").rglob("*.py")
                 if adapter not in p.parents and re.search(r"^\s*(from|import)\s+lmms_eval\b", p.read_text(), re.M)]
    assert importing == []
    code = "import sys, llava_uta.eval.lmms as m; assert 'lmms_eval' not in sys.modules; print(m.TASKS_DIR)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip(), "shapesworld", "shapesworld_grounding.yaml").is_file()


# ---- fixtures: a tiny ShapesWorld, a tiny trained stage-2 folder, llava-uta-bench answers ----

@pytest.fixture(scope="module")
def world(tiny_world) -> Path:
    """The tiny ShapesWorld of conftest.py: 8 held-out grounding images (6 or 5 short questions each, a description)."""
    return tiny_world


@pytest.fixture(scope="module")
def model_dir(llava_runs, tmp_path_factory) -> Path:
    """A stage-2 folder after two steps at lr 1e-4 from conftest's stage 1: its answers differ from question to
    question (at conftest's stage-2 rate, 1e-3, the tiny model gives one answer to everything)."""
    from llava_helpers import llava_args

    from llava_uta.train.train import train

    out = tmp_path_factory.mktemp("lmms_model") / "stage2"
    train(llava_args(llava_runs, out, stage=2, pretrain_mm_mlp_adapter=llava_runs["stage1"] / "mm_projector.bin",
                     max_steps=2, learning_rate=1e-4))
    return out


def _questions(world: Path) -> list[dict]:
    return read_jsonl(world / "eval" / "grounding" / "questions.jsonl")


def _bench_answers(world: Path, model_dir: Path, out: Path, detail: bool, max_new_tokens: int,
                   batch_size: int) -> dict[int, str]:
    """`llava-uta-bench answer` on the short (or detail) grounding questions: question_id -> answer."""
    rows = [q for q in _questions(world) if (q["kind"] == "detail") == detail]
    out.mkdir(parents=True, exist_ok=True)
    question_file = out / "questions.jsonl"
    question_file.write_text("".join(json.dumps(q) + "\n" for q in rows))
    bench_main(["answer", "--model-path", str(model_dir), "--device", "cpu", "--question-file", str(question_file),
                "--image-folder", str(world / "eval" / "grounding" / "images"), "--answers-file",
                str(out / "answers.jsonl"), "--max-new-tokens", str(max_new_tokens), "--batch-size", str(batch_size)])
    return {a["question_id"]: a["text"] for a in read_jsonl(out / "answers.jsonl")}


@pytest.fixture(scope="module")
def env(world, tmp_path_factory) -> dict[str, str]:
    """The environment of an offline lmms-eval run on the tiny world (any hub access would fail)."""
    hf = tmp_path_factory.mktemp("hf_home")
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "HF_HOME": str(hf), "LMMS_EVAL_DATASETS_CACHE": str(hf / "datasets"), "LLAVA_UTA_SHAPES_DIR": str(world)}


@pytest.fixture(scope="module")
def lmms_api(env):
    """lmms-eval imported in this process, with the world's environment variables set."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager

    from llava_uta.eval.lmms import TASKS_DIR

    yield evaluator, TaskManager("WARNING", include_path=str(TASKS_DIR))
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def lm(model_dir, lmms_api):
    from llava_uta.eval.lmms.adapter import LlavaUtaLmms

    return LlavaUtaLmms(pretrained=str(model_dir), device="cpu", batch_size=1)


def _task(name: str, **overrides):
    """A ShapesWorld task object from the shipped grounding YAML, with fields replaced (for request-type tests)."""
    from lmms_eval import utils

    from llava_uta.eval.lmms import TASKS_DIR
    from llava_uta.eval.lmms.shapes_task import ShapesWorldTask

    config = utils.load_yaml_config(str(TASKS_DIR / "shapesworld" / "shapesworld_grounding.yaml"))
    return ShapesWorldTask(config={**config, "task": name, **overrides})


def _run(lmms_api, lm, tasks: list, **kwargs) -> dict:
    evaluator, task_manager = lmms_api
    return evaluator.simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager, log_samples=True,
                                     bootstrap_iters=0, verbosity="WARNING", **kwargs)


# ---- end to end: the CLI, offline, equals llava-uta-bench ----

@needs_lmms
def test_cli_answers_equal_llava_uta_bench_answers(world, model_dir, env, tmp_path):
    out = tmp_path / "lmms"
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "llava_uta", "--model_args",
           f"pretrained={model_dir},device=cpu", "--include_path", str(REPO / "llava_uta/eval/lmms/tasks"),
           "--tasks", "shapesworld", "--batch_size", "2", "--output_path", str(out), "--log_samples"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert "Error during evaluation" not in run.stdout, run.stdout[-4000:] + run.stderr[-4000:]
    samples = {task: [json.loads(line) for path in out.rglob(f"*_samples_{task}.jsonl")
                      for line in path.read_text().splitlines()]
               for task in ("shapesworld_grounding", "shapesworld_detail")}
    ours = {s["mean_accuracy"]["question_id"]: s["filtered_resps"] for s in samples["shapesworld_grounding"]}
    ours_detail = {s["object_f1"]["question_id"]: s["filtered_resps"] for s in samples["shapesworld_detail"]}

    short = _bench_answers(world, model_dir, tmp_path / "short", detail=False, max_new_tokens=16, batch_size=2)
    detail = _bench_answers(world, model_dir, tmp_path / "detail", detail=True, max_new_tokens=128, batch_size=2)
    questions = _questions(world)
    assert len(ours) == sum(q["kind"] != "detail" for q in questions) > 8
    assert len(ours_detail) == sum(q["kind"] == "detail" for q in questions) == 8
    assert ours == short and ours_detail == detail
    assert len(set(short.values())) > 1  # the tiny model does not give one answer to everything

    results = json.loads(next(out.rglob("*_results.json")).read_text())["results"]
    expected = score(_questions(world), [{"question_id": k, "text": v} for k, v in {**short, **detail}.items()])
    grounding = results["shapesworld_grounding"]
    assert grounding["mean_accuracy,none"] == pytest.approx(expected["mean_accuracy"])
    for kind, row in expected["kinds"].items():
        assert grounding[f"{kind}_accuracy,none"] == pytest.approx(row["accuracy"])
    assert results["shapesworld_detail"]["object_f1,none"] == pytest.approx(expected["detail"]["object_f1"])


# lmms-eval's CLI in one rank of `accelerate launch`, recording which questions this rank's model answered
RECORDING_LAUNCHER = """
import json, os, sys
from llava_uta.eval.lmms.adapter import LlavaUtaLmms
answer = LlavaUtaLmms.generate_until

def recorded(self, requests):
    with open(os.environ["ANSWERED_LOG"], "a") as log:
        for request in requests:
            doc = self.task_dict[request.args[4]][request.args[5]][request.args[3]]
            log.write(json.dumps({"rank": self.rank, "world_size": self.world_size, "id": doc["question_id"]}) + "\\n")
    return answer(self, requests)

LlavaUtaLmms.generate_until = recorded
from lmms_eval.__main__ import cli_evaluate
sys.argv = ["lmms_eval", *sys.argv[1:]]
cli_evaluate()
"""


@needs_lmms
def test_two_ranks_split_the_documents_and_gather_every_answer_once(world, model_dir, env, tmp_path):
    """Two CPU processes (torchrun, gloo): each question answered by one rank, the results gathered on rank 0.

    lmms-eval (0.7.3) gives the model its rank and world size from the launcher's RANK / WORLD_SIZE and splits the
    documents itself; this guards that the adapter keeps to its share (no collective of its own, no second copy)."""
    out, log, launcher = tmp_path / "lmms", tmp_path / "answered.jsonl", tmp_path / "launch.py"
    launcher.write_text(RECORDING_LAUNCHER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(launcher),
           "--model", "llava_uta", "--model_args", f"pretrained={model_dir},device=cpu",
           "--include_path", str(REPO / "llava_uta/eval/lmms/tasks"), "--tasks", "shapesworld_grounding",
           "--batch_size", "2", "--output_path", str(out), "--log_samples"]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**env, "ANSWERED_LOG": str(log)}, cwd=tmp_path,
                         timeout=900)
    assert run.returncode == 0 and "Error during evaluation" not in run.stdout, run.stdout[-4000:] + run.stderr[-4000:]
    answered = [json.loads(line) for line in log.read_text().splitlines()]
    short = [q["question_id"] for q in _questions(world) if q["kind"] != "detail"]
    assert {a["world_size"] for a in answered} == {2} and {a["rank"] for a in answered} == {0, 1}
    ranks = {}
    for a in answered:
        ranks.setdefault(a["id"], set()).add(a["rank"])
    assert sorted(ranks) == sorted(short) and all(len(r) == 1 for r in ranks.values())  # each by one rank
    assert len(answered) <= len(short) + 1  # lmms-eval repeats one request to even out the ranks' counts
    samples = [json.loads(line) for path in out.rglob("*_samples_shapesworld_grounding.jsonl")
               for line in path.read_text().splitlines()]
    ours = {s["mean_accuracy"]["question_id"]: s["filtered_resps"] for s in samples}
    assert ours == _bench_answers(world, model_dir, tmp_path / "bench", detail=False, max_new_tokens=16,
                                  batch_size=2)


@needs_lmms
def test_cli_names_an_unloadable_model_folder(env, tmp_path):
    missing = tmp_path / "no-such-run"
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "llava_uta", "--model_args", f"pretrained={missing}",
           "--include_path", str(REPO / "llava_uta/eval/lmms/tasks"), "--tasks", "shapesworld_grounding"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert f"Error during evaluation: llava_uta: cannot load model folder '{missing}'" in run.stdout, run.stdout


# ---- the Python API: batch size 1, stop strings, log-likelihoods, unsupported requests ----

@needs_lmms
def test_api_batch_size_one_equals_llava_uta_bench_answers(world, model_dir, lmms_api, lm, tmp_path):
    result = _run(lmms_api, lm, ["shapesworld_grounding"])
    ours = {s["mean_accuracy"]["question_id"]: s["filtered_resps"][0]
            for s in result["samples"]["shapesworld_grounding"]}
    assert ours == _bench_answers(world, model_dir, tmp_path, detail=False, max_new_tokens=16, batch_size=1)


@needs_lmms
def test_until_cuts_the_answer_before_the_first_stop_string(world, model_dir, lmms_api, lm, tmp_path):
    whole = _bench_answers(world, model_dir, tmp_path, detail=False, max_new_tokens=16, batch_size=1)[0]
    assert len(whole) >= 4
    stop = whole[2:4]
    task = _task("shapes_until", generation_kwargs={"max_new_tokens": 16, "temperature": 0, "until": [stop]})
    result = _run(lmms_api, lm, [task], limit=1)
    assert result["samples"]["shapes_until"][0]["filtered_resps"][0] == whole[: whole.index(stop)].rstrip()


@needs_lmms
def test_score_continuation_is_the_model_loss(world, lm):
    from llava_uta.serve.chat import ChatSession, to_model

    image = Image.open(world / "eval" / "grounding" / "images" / "000.png")
    question, answer = "What color is the circle?", "It is red."
    for picture in (image, None):
        session = ChatSession(lm.loaded, image=picture)
        prompt = session.prompt(question)
        encode = (lambda text, s=session: lm.loaded.processor(images=s.image, text=text, return_tensors="pt")) \
            if picture else (lambda text: lm.loaded.tokenizer(text, return_tensors="pt"))
        inputs = to_model(encode(prompt + " " + answer), lm.loaded.model)
        start = encode(prompt)["input_ids"].shape[1]
        labels = inputs["input_ids"].clone()
        labels[:, :start] = -100
        with torch.no_grad():
            out = lm.loaded.model(**inputs, labels=labels)
        n = labels.shape[1] - start
        greedy = bool((out.logits[0, start - 1 : -1].argmax(-1) == inputs["input_ids"][0, start:]).all())
        logprob, length, is_greedy = lm.score_continuation(question, picture, answer)
        assert length == n and is_greedy == greedy
        assert -logprob / n == pytest.approx(out.loss.item(), abs=1e-4)


@needs_lmms
def test_multiple_choice_picks_the_likeliest_answer(world, lmms_api, lm):
    yes_no = ("existence", "relation")
    task = _task("shapes_yes_no", output_type="multiple_choice", doc_to_choice=["yes", "no"], process_results=None,
                 generation_kwargs=None, metric_list=[{"metric": "acc", "aggregation": "mean",
                                                       "higher_is_better": True}],
                 process_docs=lambda docs: docs.filter(lambda d: d["kind"] in yes_no))
    result = _run(lmms_api, lm, [task])
    samples = result["samples"]["shapes_yes_no"]
    docs = [q for q in _questions(world) if q["kind"] in yes_no]
    assert len(samples) == len(docs) > 0
    right = []
    for sample, doc in zip(sorted(samples, key=lambda s: s["doc_id"]), docs, strict=True):
        image = Image.open(world / "eval" / "grounding" / "images" / doc["image"])
        scores = [lm.score_continuation(doc["text"], image, f" {choice}") for choice in ("yes", "no")]
        losses = [-logprob / n for logprob, n, _ in scores]
        assert [pair[0] for pair in sample["filtered_resps"]] == pytest.approx(losses, abs=1e-5)
        right.append(("yes", "no")[losses.index(min(losses))] == doc["answer"])
    assert result["results"]["shapes_yes_no"]["acc,none"] == pytest.approx(sum(right) / len(right))


@needs_lmms
@pytest.mark.parametrize("output_type", ["generate_until_multi_round", "generate_visual_cot"])
def test_unsupported_request_type_is_named(lmms_api, lm, output_type):
    from llava_uta.eval.lmms.adapter import UnsupportedRequestError

    with pytest.raises(UnsupportedRequestError, match=f"request type '{output_type}'.*shapes_unsupported"):
        _run(lmms_api, lm, [_task("shapes_unsupported", output_type=output_type)], limit=2)


@needs_lmms
def test_unloadable_folders_are_named(model_dir, lmms_api, tmp_path):
    from lmms_eval.models import get_model

    from llava_uta.eval.lmms.adapter import ModelLoadError

    model_class = get_model("llava_uta")
    missing = tmp_path / "missing"
    with pytest.raises(ModelLoadError, match=rf"cannot load model folder '{re.escape(str(missing))}'.*no config"):
        model_class.create_from_arg_string(f"pretrained={missing},device=cpu")
    broken = tmp_path / "broken"  # a config.json without weights or projector
    broken.mkdir()
    (broken / "config.json").write_text((model_dir / "config.json").read_text())
    with pytest.raises(ModelLoadError, match=rf"cannot load model folder '{re.escape(str(broken))}'"):
        model_class.create_from_arg_string(f"pretrained={broken},device=cpu")
    with pytest.raises(TypeError, match=r"unknown model_args \['temprature'\]"):
        model_class.create_from_arg_string(f"pretrained={model_dir},temprature=0")


@needs_lmms
def test_missing_shapes_folder_is_named(lmms_api, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVA_UTA_SHAPES_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"nowhere/eval/grounding/questions.jsonl.*LLAVA_UTA_SHAPES_DIR"):
        _task("shapes_missing")


# ---- request parts, without running a task ----

@needs_lmms
def test_generation_kwargs_are_honoured_or_refused():
    from llava_uta.eval.lmms.adapter import Generation, UnsupportedRequestError, cut_at_stops, generation_settings

    settings = generation_settings({"max_new_tokens": 16, "temperature": 0.7, "top_p": 0.9, "do_sample": False,
                                    "until": "\n\n", "image_aspect_ratio": "original", "num_beams": 1}, "t")
    assert settings == Generation(temperature=0.0, top_p=1.0, max_new_tokens=16, until=("\n\n",))
    assert generation_settings({"temperature": 0.5, "top_p": 0.9}, "t") == Generation(0.5, 0.9, 1024, ())
    with pytest.raises(UnsupportedRequestError, match=r"task 'mme' sets generation kwargs \['top_k'\]"):
        generation_settings({"top_k": 5}, "mme")
    with pytest.raises(UnsupportedRequestError, match="num_beams=3"):
        generation_settings({"num_beams": 3}, "t")
    assert cut_at_stops("yes ASSISTANT: no\n\nmore", ("\n\n", "ASSISTANT:")) == "yes"
    assert cut_at_stops("yes", ()) == "yes"


@needs_lmms
def test_documents_need_one_image_and_no_image_token(lm):
    from llava_uta.eval.lmms.adapter import UnsupportedRequestError

    images = [Image.new("RGB", (8, 8), c) for c in ("red", "green", "blue")]
    frames = lambda doc: doc["frames"]  # noqa: E731
    lm.task_dict["t"] = {"test": [{"frames": images}]}
    try:
        with pytest.raises(UnsupportedRequestError, match="task 't' doc 0 has 3 images.*multi_image=middle"):
            lm._image(frames, "t", "test", 0)
        lm.multi_image = "middle"
        assert lm._image(frames, "t", "test", 0) is images[1]
        assert lm._image(lambda doc: [], "t", "test", 0) is None
    finally:
        lm.multi_image = "error"
        del lm.task_dict["t"]
    with pytest.raises(UnsupportedRequestError, match="already holds <image>"):
        lm._context("<image>\nWhat is it?", "t", 0)


@needs_lmms
def test_aggregations_are_the_grounding_scores(world):
    from llava_uta.eval.lmms import shapes_task

    docs = shapes_task.load_questions(world, "short") + shapes_task.load_questions(world, "detail")
    answers = {d["question_id"]: d["answer"] if d["question_id"] % 3 else "no idea" for d in docs}
    items: dict[str, list] = {}
    for doc in docs:
        for metric, item in shapes_task.process_results(doc, [answers[doc["question_id"]]]).items():
            items.setdefault(metric, []).append(item)
    expected = score(_questions(world), [{"question_id": k, "text": v} for k, v in answers.items()])
    assert shapes_task.aggregate_mean_accuracy(items["mean_accuracy"]) == pytest.approx(expected["mean_accuracy"])
    assert set(expected["kinds"]) <= set(KINDS) and len(expected["kinds"]) >= 5
    for kind in expected["kinds"]:
        aggregate = getattr(shapes_task, f"aggregate_{kind}_accuracy")
        assert aggregate(items[f"{kind}_accuracy"]) == pytest.approx(expected["kinds"][kind]["accuracy"])
    assert shapes_task.aggregate_object_f1(items["object_f1"]) == pytest.approx(expected["detail"]["object_f1"])
    assert 0 < expected["mean_accuracy"] < 1
