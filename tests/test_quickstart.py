"""`llava-uta-quickstart`: the stages as data (each stage's flags parsed by its tool's own parser, the orchestration
with stand-in stages, the report and the study tables from canned results) in the fast tier; `--fast --compare` end to
end (every artifact, numbers above chance, resume, budgets) in the slow tier."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel

import llava_uta.model  # noqa: F401  (registers the UTA tower with AutoModel)
from llava_uta.eval.llavabench.jsonl import read_jsonl
from llava_uta.quickstart import study
from llava_uta.quickstart.pipeline import (
    EQUAL_WALL_CLOCK,
    LADDER,
    PROBED,
    STUDENTS,
    TOWERS,
    Layout,
    Pipeline,
    RunState,
    Stage,
    run_stages,
    tool_module,
)
from llava_uta.quickstart.profiles import LANGUAGE_MODELS, PROFILES, get_profile

REPO = Path(__file__).resolve().parents[1]


def quickstart(root: Path, *flags: str) -> str:
    command = [sys.executable, "-m", "llava_uta.quickstart", "--fast", "--compare", "--ladder",
               "--data", str(root / "data"), "--runs", str(root / "runs"), *flags]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Layout, str]:
    root = tmp_path_factory.mktemp("quickstart")
    return Layout(root / "data", root / "runs"), quickstart(root)


@pytest.mark.slow
def test_every_artifact_exists(run):
    paths, _ = run
    expected = [paths.data / "manifest.json", paths.teacher / "open_clip_model.safetensors",
                paths.lm / "model.safetensors", paths.lm / "train_log.jsonl", paths.results,
                paths.plots / "losses.png", paths.plots / "bench.png",
                *(paths.plots / f"masks-{kind}.png" for kind in ("reversed_block", "block", "random"))]
    for name in STUDENTS:
        expected += [paths.student(name) / "summary.json", paths.student(name) / "student.safetensors"]
    expected += [paths.finetuned("uta") / "summary.json", paths.finetuned("uta") / "uta_clip.safetensors"]
    for tower in TOWERS:
        expected += [paths.tower(tower) / "config.json", paths.llava(tower, 1) / "mm_projector.bin",
                     paths.llava(tower, 2) / "model.safetensors", paths.reviews(tower), paths.answers(tower),
                     paths.grounding(tower), paths.grounding_answers(tower)]
    missing = [str(p) for p in expected if not p.is_file()]
    assert not missing
    assert all(p.stat().st_size > 5_000 for p in paths.plots.glob("*.png"))


@pytest.mark.slow
def test_the_ladder_asks_the_same_questions_three_ways(run):
    """(a) stage 2 on the scenes in words, asked in words; (b) the symbolic tower's LLaVA on the symbolic world's
    images; (c) the UTA run; and the probe of the merged tokens."""
    paths, _ = run
    questions = read_jsonl(paths.data / "eval" / "grounding" / "questions.jsonl")
    short = [q for q in questions if q["kind"] != "detail"]
    words, symbolic, uta = (json.loads(paths.grounding(k).read_text()) for k in ("words", "symbolic", "uta"))
    assert len(read_jsonl(paths.grounding_answers("words"))) == len(short) and "detail" not in words
    assert len(read_jsonl(paths.grounding_answers("symbolic"))) == len(questions)
    assert {k: v["n"] for k, v in symbolic["kinds"].items()} == {k: v["n"] for k, v in uta["kinds"].items()}
    assert json.loads((paths.symbolic_data / "manifest.json").read_text())["symbolic_code"]["code_side"] == 4
    assert json.loads((paths.llava("symbolic", 2) / "config.json").read_text())["image_seq_length"] == 4
    probe = json.loads(paths.probe("merged").read_text())
    assert probe["merge"] == 4 and {t["label"] for t in probe["towers"]} == {"uta", "random init (uta)"}
    text = paths.results.read_text()
    assert "## The shape ladder" in text and "| (b) symbolic tokens, one per cell |" in text


@pytest.mark.slow
def test_key_numbers_are_above_chance(run):
    paths, _ = run
    chance = 1 / len(json.loads((paths.data / "zeroshot" / "classnames.json").read_text()))
    uta = json.loads((paths.student("uta") / "summary.json").read_text())
    assert uta["teacher_zeroshot"]["top1"] > 3 * chance
    assert uta["zeroshot"]["top1"] > 2 * chance
    for tower in TOWERS:  # at these budgets LLaVA learns the caption format, not yet the scenes
        for stage in (1, 2):
            log = json.loads((paths.llava(tower, stage) / "trainer_state.json").read_text())["log_history"]
            losses = [r["loss"] for r in log if "loss" in r]
            assert len(losses) >= 3 and losses[-1] < losses[0]
        answers = read_jsonl(paths.answers(tower))
        assert len(answers) == 12 and all(a["text"].strip() for a in answers)
        reviews = read_jsonl(paths.reviews(tower))
        assert len(reviews) == 12 and not any("error" in r for r in reviews)


@pytest.mark.slow
def test_results_report_every_model_and_equal_wall_clock_budgets(run):
    paths, stdout = run
    text = paths.results.read_text()
    assert text in stdout
    for _, title in STUDENTS.values():
        assert f"| {title} |" in text
    for tower in TOWERS.values():  # LLaVA-Bench and grounding rows
        assert text.count(f"| {tower} tower |") == 2
    summaries = {name: json.loads((paths.student(name) / "summary.json").read_text()) for name in STUDENTS}
    budget = summaries["uta"]["train_seconds"]
    assert summaries["uta"]["steps"] == summaries["uta-block"]["steps"] == PROFILES["fast"].student_steps
    for name in EQUAL_WALL_CLOCK:  # UTA's training seconds, give or take the last step
        assert budget <= summaries[name]["train_seconds"] + 0.05 < budget + 3 * budget / summaries[name]["steps"]


@pytest.mark.slow
def test_fine_tuning_starts_from_the_uta_row_and_is_reported(run):
    """Before fine-tuning, the UTA student with the teacher's text tower is exactly the zero-shot table's UTA row."""
    paths, _ = run
    uta = json.loads((paths.student("uta") / "summary.json").read_text())
    finetuned = json.loads((paths.finetuned("uta") / "summary.json").read_text())
    assert finetuned["zeroshot_before"] == pytest.approx(uta["zeroshot"])
    assert finetuned["steps"] == PROFILES["fast"].finetune_steps
    row = f"| UTA + contrastive fine-tuning (its own text tower) | {finetuned['steps']} |"
    assert row in paths.results.read_text()


@pytest.mark.slow
def test_rerun_skips_every_stage(run):
    paths, _ = run
    before = paths.state.read_text()
    stdout = quickstart(paths.data.parent)
    headers = [line for line in stdout.splitlines() if line.startswith("[")]
    assert headers and all(line.endswith(")") and ": done (" in line for line in headers)
    assert paths.state.read_text() == before


@pytest.mark.slow
def test_blind_baseline_is_scored_like_every_tower(run):
    """The blind row: same recipe, same questions, same scoring; its tower gives one set of tokens for all images."""
    paths, _ = run
    questions = read_jsonl(paths.data / "eval" / "grounding" / "questions.jsonl")
    results = {t: json.loads(paths.grounding(t).read_text()) for t in TOWERS}
    for tower, result in results.items():
        assert len(read_jsonl(paths.grounding_answers(tower))) == len(questions)
        assert {k: v["n"] for k, v in result["kinds"].items()} == \
            {k: v["n"] for k, v in results["uta"]["kinds"].items()}
        assert result["detail"]["n"] == results["uta"]["detail"]["n"]
        for kind in result["kinds"].values():
            assert 0 <= kind["accuracy"] <= 1 and 0 < kind["chance"] <= 1
    args = [json.loads((paths.llava(t, 2) / "config.json").read_text()) for t in ("uta", "blind")]
    assert args[0]["text_config"] == args[1]["text_config"]
    blind = AutoModel.from_pretrained(paths.tower("blind")).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        tokens = blind(images, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(tokens[0], tokens[1])


@pytest.mark.slow
def test_the_lm_is_instruction_tuned_in_words_and_asked_in_words(run):
    """The LLM LLaVA starts from: LM steps, then instruction tuning; its in-words row asks the towers' questions."""
    paths, _ = run
    stages = [r["stage"] for r in read_jsonl(paths.lm / "train_log.jsonl")]
    assert stages == ["pretrain"] * PROFILES["fast"].lm_steps + ["instruct"] * PROFILES["fast"].lm_sft_steps
    words, uta = (json.loads(path.read_text()) for path in (paths.lm_in_words, paths.grounding("uta")))
    assert {k: v["n"] for k, v in words["kinds"].items()} == {k: v["n"] for k, v in uta["kinds"].items()}
    assert "detail" not in words
    lm_title = LANGUAGE_MODELS[PROFILES["fast"].lm].title
    assert f"| {lm_title} alone, the scene in words (no image) |" in paths.results.read_text()


@pytest.mark.slow
def test_probes_and_classification_set_each_tower_against_its_random_init_floor(run):
    paths, _ = run
    text = paths.results.read_text()
    for kind in ("patch", "linear"):
        labels = {t["label"] for t in json.loads(paths.probe(kind).read_text())["towers"]}
        assert labels == {"teacher", *PROBED, "random init (teacher)", "random init (uta)"}  # students share a twin
        assert paths.probe(kind).with_suffix(".md").read_text().strip() in text
    top1 = {}
    for init, title in (("uta", "UTA student"), ("random", "random init (same architecture)")):
        summary = json.loads((paths.classifier(init) / "summary.json").read_text())
        assert summary["steps"] == PROFILES["fast"].classify_steps and summary["num_classes"] == 48
        assert f"| {title} | {summary['steps']} |" in text
        top1[init] = summary["val"]["top1"]
    assert top1["uta"] > top1["random"] + 0.05  # fine-tuning the UTA student beats its random-init twin


@pytest.mark.slow
def test_study_draws_curves_over_seeds_from_the_quickstart_teacher(run, capsys):
    paths, _ = run
    names = ["uta", "fd", "uta-m2"]
    base = ["--profile", "fast", "--data", str(paths.data), "--runs", str(paths.runs)]
    argv = [*base, "--only", *names]
    study.main(argv)
    out = paths.runs / "study" / "fast"
    text = (out / "study.md").read_text()
    result = json.loads((out / "study.json").read_text())
    fast = study.PROFILES["fast"]
    for name in names:
        seeds = result["runs"][name]["seeds"]
        assert sorted(seeds) == ["0", "1"]  # the fast profile's 2 seeds
        for seed, points in seeds.items():
            assert [p["step"] for p in points] == [2, 4, 6]  # 3 points over 6 steps
            for a, b in zip(points[:-1], points[1:], strict=True):
                assert a["seconds"] < b["seconds"] and a["tflop"] < b["tflop"]
            summary = json.loads((out / name / f"seed{seed}" / "summary.json").read_text())
            assert summary["zeroshot"]["top1"] == points[-1]["top1"] and summary["steps"] == fast.steps
        mean = result["runs"][name]["mean"]
        for i, point in enumerate(mean):
            top1 = [seeds[s][i]["top1"] for s in seeds]
            assert point["top1"] == pytest.approx(sum(top1) / 2)
            assert point["top1_std"] == pytest.approx(abs(top1[0] - top1[1]) / 2 ** 0.5)
        assert f"| {study.RUNS[name][1]} | 2 |" in text
    # equal steps: feature distillation runs all 64 patches + CLS, UTA the 32 kept + CLS
    ratio = result["runs"]["fd"]["mean"][-1]["tflop"] / result["runs"]["uta"]["mean"][-1]["tflop"]
    assert ratio == pytest.approx(65 / 33)
    # two keep sets per teacher forward: twice the student work per step
    tflop = {name: result["runs"][name]["mean"][-1]["tflop"] for name in ("uta", "uta-m2")}
    assert tflop["uta-m2"] == pytest.approx(2 * tflop["uta"])
    plots = ("study-objectives.png", "study-masking.png", "study-masks-per-view.png")
    assert all((out / "plots" / f).stat().st_size > 5_000 for f in plots)
    assert text in capsys.readouterr().out
    study.main(argv)
    assert capsys.readouterr().out.count(": done") == 6 and (out / "study.md").read_text() == text  # trains nothing
    study.main([*base, "--only", "uta"])
    assert (out / "study.md").read_text() == text  # a subset's report still holds every finished run
    with pytest.raises(SystemExit, match="other budgets"):
        study.main([*argv, "--cache-views", "1"])
    with pytest.raises(SystemExit, match="no teacher CLIP"):
        study.main(["--profile", "fast", "--data", str(paths.data), "--runs", str(paths.runs / "nowhere")])


# ---- fast tier: the stages as data, the orchestration with stand-ins, the report and the study from canned results


def canned_uta_summary(paths: Layout, seconds: float = 12.5) -> None:
    """What llava-uta-pretrain writes at the end of a run, as the later stages' flags read it."""
    folder = paths.student("uta")
    folder.mkdir(parents=True, exist_ok=True)
    zeroshot = {"top1": 0.25, "top5": 0.6}
    (folder / "summary.json").write_text(json.dumps({
        "steps": 60, "train_seconds": seconds, "images_per_s": 300.0, "student_tflops": 0.01,
        "zeroshot": zeroshot, "teacher_zeroshot": {"top1": 0.5, "top5": 0.9}}))


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_stage_is_a_tool_whose_own_parser_takes_its_flags(profile, tmp_path):
    """Flag drift: every stage's argv is parsed by the parser of the console script it runs."""
    paths = Layout(tmp_path / "data", tmp_path / "runs")
    canned_uta_summary(paths)  # the objective baselines' time budget is UTA's measured seconds
    stages = Pipeline(paths, get_profile(profile)).stages(compare=True, ladder=True)
    assert len({s.key for s in stages}) == len(stages)
    for stage in stages:
        parser = tool_module(stage.tool).build_parser()
        parser.parse_args(stage.argv())  # exits (SystemExit) on an unknown or malformed flag
        assert stage.command().startswith(stage.tool + " ")
    budgets = {s.key: s.argv() for s in stages if s.tool == "llava-uta-pretrain"}
    for name in EQUAL_WALL_CLOCK:
        argv = budgets[f"student-{name}"]
        assert argv[argv.index("--max_train_seconds") + 1] == "12.5"


def test_dry_run_prints_every_stage_command_and_runs_nothing(tmp_path, capsys):
    from llava_uta.quickstart.__main__ import main

    main(["--fast", "--dry-run", "--data", str(tmp_path / "data"), "--runs", str(tmp_path / "runs")])
    out = capsys.readouterr().out.splitlines()
    commands = [line for line in out if not line.startswith("# ")]
    stages = Pipeline(Layout(tmp_path / "data", tmp_path / "runs"), get_profile("fast")).stages(compare=False)
    assert commands == [s.command() for s in stages]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()


def test_llava_seeds_train_every_tower_again_with_its_own_seed_folders_and_rows(tmp_path):
    paths = Layout(tmp_path / "data", tmp_path / "runs")
    canned_uta_summary(paths)
    single = Pipeline(paths, get_profile("default"), seed=3).stages(compare=True)
    stages = Pipeline(paths, get_profile("default"), seed=3, llava_seeds=2).stages(compare=True)
    by_key = {s.key: s for s in stages}
    assert len(by_key) == len(stages) == len(single) + 5 * len(TOWERS)
    for tower in TOWERS:
        first, second = by_key[f"stage2-{tower}"].argv(), by_key[f"stage2-{tower}-seed4"].argv()
        assert first[first.index("--seed") + 1] == "3" and second[second.index("--seed") + 1] == "4"
        assert second[second.index("--output_dir") + 1] == str(paths.llava(f"{tower}-seed4", 2))
        assert second[second.index("--pretrain_mm_mlp_adapter") + 1] == str(paths.llava(f"{tower}-seed4", 1)
                                                                              / "mm_projector.bin")
        renamed = [a.replace(f"/{tower}-seed4/", f"/{tower}/") for a in second]
        renamed[renamed.index("--seed") + 1] = "3"
        assert renamed == first  # the same recipe: only the seed and the folders differ
        grounding = by_key[f"grounding-{tower}-seed4"]
        assert grounding.output == paths.grounding(f"{tower}-seed4")
        assert grounding.report == {"grounding": f"{TOWERS[tower]} tower, LLaVA seed 4"}
        assert by_key[f"grounding-{tower}"].report["grounding"] == f"{TOWERS[tower]} tower, LLaVA seed 3"
        assert by_key[f"review-{tower}-seed4"].report == {"bench": f"{TOWERS[tower]} tower, LLaVA seed 4"}
    with pytest.raises(ValueError, match="llava_seeds"):
        Pipeline(paths, get_profile("default"), llava_seeds=0)


class StandIn:
    """Replaces run_stage: writes each stage's output (or fails at one stage) and records what ran."""

    def __init__(self, fail: str | None = None, skip_output: str | None = None):
        self.ran, self.fail, self.skip_output = [], fail, skip_output

    def __call__(self, stage) -> None:
        self.ran.append(stage.key)
        if stage.key == self.fail:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the stage
        if stage.key != self.skip_output:
            stage.output.parent.mkdir(parents=True, exist_ok=True)
            stage.output.write_text("done")


def test_finished_stages_are_skipped_and_an_interrupted_run_resumes(tmp_path, monkeypatch):
    from llava_uta.quickstart import pipeline

    paths = Layout(tmp_path / "data", tmp_path / "runs")
    canned_uta_summary(paths)
    profile = get_profile("fast")
    stages = Pipeline(paths, profile).stages(compare=True, ladder=True)
    keys = [s.key for s in stages]
    interrupted = StandIn(fail="stage2-uta")
    monkeypatch.setattr(pipeline, "run_stage", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_stages(stages, RunState(paths.state, profile, "fast"))
    assert interrupted.ran == keys[: keys.index("stage2-uta") + 1]
    assert list(json.loads(paths.state.read_text())["stages"]) == keys[: keys.index("stage2-uta")]

    resumed = StandIn()
    monkeypatch.setattr(pipeline, "run_stage", resumed)
    run_stages(stages, RunState(paths.state, profile, "fast"))  # a new process would read quickstart.json again
    assert resumed.ran == keys[keys.index("stage2-uta"):]
    record = paths.state.read_text()

    again = StandIn()
    monkeypatch.setattr(pipeline, "run_stage", again)
    run_stages(stages, RunState(paths.state, profile, "fast"))
    assert again.ran == [] and paths.state.read_text() == record
    paths.tower("blind").joinpath("config.json").unlink()  # a deleted output makes its stage run again, alone
    run_stages(stages, RunState(paths.state, profile, "fast"))
    assert again.ran == ["tower-blind"]

    monkeypatch.setattr(pipeline, "run_stage", StandIn(skip_output="world"))
    fresh = Layout(tmp_path / "data2", tmp_path / "runs2")
    with pytest.raises(RuntimeError, match="without writing"):
        run_stages(Pipeline(fresh, profile).stages(compare=False), RunState(fresh.state, profile, "fast"))


def test_other_budgets_or_recipes_are_refused(tmp_path):
    state = tmp_path / "quickstart.json"
    RunState(state, get_profile("fast"), "fast").save()
    RunState(state, get_profile("fast"), "fast")  # the same budgets: accepted
    with pytest.raises(ValueError, match="other budgets"):
        RunState(state, get_profile("fast", student_steps=7), "fast")
    with pytest.raises(ValueError, match="other budgets"):
        RunState(state, get_profile("default"), "default")
    with pytest.raises(ValueError, match="unknown profile"):
        get_profile("huge")


def canned_grounding(accuracy: float) -> dict:
    kinds = {k: {"n": 10, "accuracy": accuracy, "chance": 0.3} for k in ("color", "shape", "count")}
    return {"kinds": kinds, "detail": {"n": 10, "object_f1": 0.5}, "mean_accuracy": accuracy}


def test_report_tables_from_canned_results(tmp_path):
    from llava_uta.quickstart.report import write_report

    paths = Layout(tmp_path / "data", tmp_path / "runs")
    (paths.data / "zeroshot").mkdir(parents=True)
    (paths.data / "zeroshot" / "classnames.json").write_text(json.dumps([f"c{i}" for i in range(48)]))
    canned_uta_summary(paths)
    paths.teacher.mkdir(parents=True)
    (paths.teacher / "open_clip_config.json").write_text("{}")
    (paths.teacher / "train_log.jsonl").write_text("".join(
        json.dumps({"step": i, "loss": 3.0 - i / 10, "seconds": i * 0.5}) + "\n" for i in range(1, 11)))
    for tower, accuracy in (("uta", 0.75), ("blind", 0.25)):
        paths.grounding(tower).parent.mkdir(parents=True, exist_ok=True)
        paths.grounding(tower).write_text(json.dumps(canned_grounding(accuracy)))
        paths.reviews(tower).parent.mkdir(parents=True, exist_ok=True)
        score = 8 if tower == "uta" else 4
        paths.reviews(tower).write_text("".join(json.dumps(
            {"question_id": i, "category": "conv", "tuple": [10, score], "content": f"10 {score}\nreason",
             "judge": "shapes"}) + "\n" for i in range(4)))
    state = {"profile": {"lm": "smollm2"}, "stages": {"world": {"title": "ShapesWorld", "seconds": 12.0},
                        "teacher": {"title": "teacher CLIP", "seconds": 30.0}}}
    stages = Pipeline(paths, get_profile("fast")).stages(compare=True)
    extra = tmp_path / "extra.json"  # a stage added to the list is a row of the sections it names, nothing else
    extra.write_text(json.dumps(canned_grounding(0.5)))
    stages.append(Stage("grounding-extra", "grounding, another tower", "llava-uta-bench", list, extra,
                        {"grounding": "another tower"}))
    text = write_report(paths, stages, state, "fast")
    assert text == paths.results.read_text()
    assert "| another tower | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 |" in text
    assert "| teacher CLIP (frozen) | 10 | 5 |" in text
    assert "| UTA, reversed block masking (kept = blocks) | 60 | 12 | 300 | 0.12 | 0.250 | 0.600 | 50% |" in text
    assert "| UTA student tower | 75.0 | 75.0 | 75.0 | 75.0 | 50.0 |" in text
    assert "| blind (image withheld) tower | 25.0 | 25.0 | 25.0 | 25.0 | 50.0 |" in text
    assert "| chance (most frequent answer) | 30 | 30 | 30 | | |" in text
    assert "| total | 42 |" in text
    assert (paths.plots / "bench.png").stat().st_size > 5_000 and (paths.plots / "losses.png").is_file()


def canned_study_run(folder: Path, top1: list[float], steps: tuple[int, ...] = (2, 4, 6)) -> None:
    folder.mkdir(parents=True)
    records = [{"step": s, "loss": 1.0 / s} for s in steps]
    records += [{"step": s, "train_seconds": 10.0 * s, "student_tflop": 0.1 * s,
                 "eval": {"top1": t, "top5": min(1.0, 2 * t)}} for s, t in zip(steps, top1, strict=True)]
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "summary.json").write_text(json.dumps({"teacher_zeroshot": {"top1": 0.6, "top5": 0.9}}))


def test_study_tables_from_canned_runs(tmp_path):
    root = tmp_path / "study"
    canned_study_run(root / "uta" / "seed0", [0.1, 0.2, 0.3])
    canned_study_run(root / "uta" / "seed1", [0.2, 0.3, 0.5])
    canned_study_run(root / "fd" / "seed0", [0.1, 0.1, 0.2])
    result = study.collect(root)
    assert set(result["runs"]) == {"uta", "fd"} and result["teacher_zeroshot"]["top1"] == 0.6
    mean = result["runs"]["uta"]["mean"]
    assert [p["top1"] for p in mean] == pytest.approx([0.15, 0.25, 0.4])
    assert mean[-1]["top1_std"] == pytest.approx(0.2 / 2**0.5)  # sample sd of 0.3 and 0.5
    assert result["runs"]["fd"]["mean"][-1]["top1_std"] == 0.0  # one seed
    text = study.write_report(root, "fast", study.PROFILES["fast"], result)
    assert f"| {study.RUNS['uta'][1]} | 2 | 0.150 ± 0.071 (20 s, 0.20 TFLOP) |" in text
    assert f"| {study.RUNS['fd'][1]} | 1 | 0.100 ± 0.000 (20 s, 0.20 TFLOP) |" in text
    assert (root / "plots" / "study-objectives.png").stat().st_size > 5_000
    assert json.loads((root / "study.json").read_text())["runs"]["uta"]["mean"] == mean


def test_the_shape_ladder_is_reported_once_its_three_steps_ran(tmp_path):
    from llava_uta.quickstart.report import write_report

    paths = Layout(tmp_path / "data", tmp_path / "runs")
    (paths.data / "zeroshot").mkdir(parents=True)
    (paths.data / "zeroshot" / "classnames.json").write_text(json.dumps(["a", "b"]))
    state = {"profile": {"lm": "smollm2"}, "stages": {}}
    stages = Pipeline(paths, get_profile("default")).stages(compare=False, ladder=True)
    for i, key in enumerate(LADDER):
        assert "The shape ladder" not in write_report(paths, stages, state, "default")  # not before all three ran
        paths.grounding(key).parent.mkdir(parents=True, exist_ok=True)
        paths.grounding(key).write_text(json.dumps(canned_grounding(0.9 - 0.3 * i)))
    text = write_report(paths, stages, state, "default")
    assert "## The shape ladder" in text and "| (a) scene in words (stage 2 on words) | 90.0 |" in text
    assert "| (c) UTA tower, merged tokens | 30.0 |" in text
    assert "symbolic (each cell's facts, no pixels) tower" not in text  # a ladder row, not a tower row
