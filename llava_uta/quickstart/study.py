"""`llava-uta-study`: the paper's pre-training claims at small scale, as curves over seeds instead of single points.

Every run is a `llava-uta-pretrain` student on the quickstart's ShapesWorld and teacher (run `make demo` first), with
the quickstart's recipe, the same wall-clock budget and several seeds. Each run evaluates zero-shot top-1 at
`eval_points` moments spread over its budget, recording the training seconds and the student's TFLOP there, so
the table and plots show top-1 as a function of training compute. A point before the end is a moment of one
run whose learning rate is still decaying over the whole budget, not a shorter run's result.

- objectives: UTA, MIM, feature distillation and CLS-only (pipeline.STUDENTS' flags);
- masking: UTA with reversed block, block and random keep sets, keeping 1/2 and 3/4 of the patches, and
  `reversed_block_rolled` (reversed blocks rolled by a random shift: the same blocks, with every position kept
  equally often), which isolates the centre bias of reversed blocks;
- masks per view: UTA with 2 keep sets per teacher forward (`--masks_per_view 2`), independent or a set and its
  complement, against one: does more student work per teacher forward pay at equal wall-clock?

The teacher runs live on every step (fresh crops and flips each time, and the teacher's cost counted in every
objective's seconds) unless `--cache-views N` reads N fixed views per image from the quickstart's teacher cache.

    llava-uta-study                                    # default profile: 3 seeds, 2 minutes per run
    llava-uta-study --profile long                     # 10 minutes per run, one seed, objectives only
    llava-uta-study --only uta fd --seeds 2            # a subset

Runs already finished are skipped (an interrupted run resumes), so a rerun only redraws the table and plots,
which hold every finished run of the study folder, whichever command trained it: RUNS/study/PROFILE/study.md,
study.json and plots/.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from llava_uta.argparsing import ArgumentParser
from llava_uta.io_utils import save_figure_atomic, write_json_atomic, write_text_atomic
from llava_uta.quickstart.pipeline import GRID, STUDENTS, FolderState, Layout, Stage, pretrain_argv, run_stages
from llava_uta.quickstart.profiles import RECIPE
from pretrain.masking import KeepIndexGenerator, render_masks

OBJECTIVES = ("uta", "mim", "fd", "cls")


def masking_run(kind: str, keep: float) -> tuple[list[str], str]:
    return ["--masking", kind, "--mask_ratio", str(1 - keep)], f"UTA, {kind.replace('_', ' ')} masking, keep {keep:g}"


# name -> (llava-uta-pretrain flags, title); "uta" is also the masking ablation's reversed-block, keep-1/2 row and the
# one-pass-per-teacher-forward row of the masks-per-view comparison
MASKING_RUNS = {
    f"uta-{kind}-keep{keep:g}": masking_run(kind, keep)
    for kind in ("reversed_block", "block", "random", "reversed_block_rolled") for keep in (0.5, 0.75)
    if (kind, keep) != ("reversed_block", 1 - RECIPE.mask_ratio)
}
MASKS_PER_VIEW_RUNS = {
    "uta-m2": (["--masks_per_view", "2"], "UTA, 2 independent keep sets per teacher forward"),
    "uta-m2-complement": (["--masks_per_view", "2", "--mask_pairing", "complement"],
                          "UTA, a keep set and its complement per teacher forward"),
}
RUNS = {name: STUDENTS[name] for name in OBJECTIVES} | MASKING_RUNS | MASKS_PER_VIEW_RUNS
MASKING = ("uta", *MASKING_RUNS)
MASKS_PER_VIEW = ("uta", *MASKS_PER_VIEW_RUNS)


@dataclass(frozen=True)
class StudyProfile:
    """The budget of every run (seconds, with steps as an upper bound; seconds 0 = by steps) and the seeds."""

    seconds: float = 120.0
    steps: int = 2000
    batch: int = 128
    warmup: int = 20
    eval_points: int = 5
    seeds: int = 3
    runs: tuple[str, ...] = tuple(RUNS)


PROFILES = {
    "default": StudyProfile(),
    "long": StudyProfile(seconds=600.0, steps=20000, seeds=1, runs=OBJECTIVES),
    # the tests': budgets in steps, so every run has its eval points whatever the machine's speed
    "fast": StudyProfile(seconds=0.0, steps=6, batch=32, warmup=2, eval_points=3, seeds=2),
}


def run_folder(study: Path, name: str, seed: int) -> Path:
    return study / name / f"seed{seed}"


def run_stage(paths: Layout, study: Path, profile: StudyProfile, name: str, seed: int, cache_views: int) -> Stage:
    """One student of the study, a `llava-uta-pretrain` run (it resumes an interrupted one)."""
    budget = ["--max_steps", str(profile.steps)]
    if profile.seconds:
        budget += ["--max_train_seconds", str(profile.seconds)]
    cache = ["--teacher_cache", str(paths.teacher_cache), "--cache_views", str(cache_views)] if cache_views else []
    folder = run_folder(study, name, seed)
    argv = [*pretrain_argv(paths, folder, seed, profile.batch, profile.warmup),
            "--save_every", "50", "--eval_points", str(profile.eval_points), *budget, *cache, *RUNS[name][0]]
    return Stage(f"{name}-seed{seed}", f"{RUNS[name][1]}, seed {seed}", "llava-uta-pretrain", lambda: argv,
                 folder / "summary.json")


# ---- reading the runs


def curve(folder: Path) -> list[dict]:
    """The eval points of one finished run: step, training seconds, student TFLOP, top-1, top-5.

    A resumed run may have logged a point twice (before the kill and again after resume): the last one counts."""
    points = {}
    for line in (folder / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "eval" in record and "train_seconds" in record:
            points[record["step"]] = {"step": record["step"], "seconds": record["train_seconds"],
                                      "tflop": record["student_tflop"], **record["eval"]}
    return [points[step] for step in sorted(points)]


def aggregate(curves: dict[int, list[dict]]) -> list[dict]:
    """Per eval point, over seeds: mean seconds and TFLOP, mean and sample sd of top-1 and top-5 (sd 0 for one)."""
    rows = []
    for i in range(min(len(c) for c in curves.values())):
        at = [c[i] for c in curves.values()]
        row = {key: statistics.fmean(p[key] for p in at) for key in ("step", "seconds", "tflop", "top1", "top5")}
        for key in ("top1", "top5"):
            row[f"{key}_std"] = statistics.stdev(p[key] for p in at) if len(at) > 1 else 0.0
        rows.append(row)
    return rows


def collect(study: Path) -> dict:
    """study.json's content: the curve of every finished run in the study folder (whichever command ran it), and
    per run name the aggregate over its seeds."""
    result = {"runs": {}, "teacher_zeroshot": None}
    for name in RUNS:
        curves = {}
        for summary in sorted((study / name).glob("seed*/summary.json"), key=lambda p: int(p.parent.name[4:])):
            curves[int(summary.parent.name[4:])] = curve(summary.parent)
            result["teacher_zeroshot"] = json.loads(summary.read_text())["teacher_zeroshot"]
        if curves:
            result["runs"][name] = {"title": RUNS[name][1], "seeds": curves, "mean": aggregate(curves)}
    return result


# ---- the report


def table(result: dict, names: tuple[str, ...], title: str) -> str:
    """Markdown: top-1 (mean ± sd over seeds) at every eval point, with the seconds and TFLOP spent there."""
    names = [n for n in names if n in result["runs"]]
    if not names:
        return ""
    points = max(len(result["runs"][n]["mean"]) for n in names)
    lines = [f"### {title}", "", "| student | seeds | " + " | ".join(f"point {i + 1}" for i in range(points))
             + " | steps |", "|---|---|" + "---|" * (points + 1)]
    for name in names:
        run = result["runs"][name]
        cells = [f"{p['top1']:.3f} ± {p['top1_std']:.3f} ({p['seconds']:.0f} s, {p['tflop']:.2f} TFLOP)"
                 for p in run["mean"]]
        cells += [""] * (points - len(cells))
        steps = run["mean"][-1]["step"] if run["mean"] else 0
        lines.append(f"| {run['title']} | {len(run['seeds'])} | " + " | ".join(cells) + f" | {steps:.0f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, names: tuple[str, ...], title: str, path: Path) -> None:
    """Top-1 against training seconds and against student TFLOP: mean over seeds, bars = sd."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in (n for n in names if n in result["runs"]):
        rows = result["runs"][name]["mean"]
        for ax, x in zip(axes, ("seconds", "tflop"), strict=True):
            ax.errorbar([r[x] for r in rows], [r["top1"] for r in rows], yerr=[r["top1_std"] for r in rows],
                        marker="o", capsize=3, label=name)
    teacher = result["teacher_zeroshot"]
    for ax, label in zip(axes, ("training seconds", "student TFLOP (forward + backward)"), strict=True):
        if teacher:
            ax.axhline(teacher["top1"], color="grey", linestyle="--", label="teacher")
        ax.set_xlabel(label)
        ax.set_ylabel("zero-shot top-1")
        ax.legend(fontsize="x-small")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure_atomic(fig, path)


def write_report(study: Path, profile_name: str, profile: StudyProfile, result: dict) -> str:
    plots = study / "plots"
    budget = f"{profile.seconds:g} s of training (at most {profile.steps} steps)" if profile.seconds else \
        f"{profile.steps} steps"
    sections = [f"# llava-uta-study ({profile_name} profile)", "",
                f"Budget per run: {budget}, batch {profile.batch}, zero-shot top-1 at {profile.eval_points} points; "
                "mean ± sd over seeds."]
    if result["teacher_zeroshot"]:
        sections.append(f"Teacher CLIP zero-shot top-1: {result['teacher_zeroshot']['top1']:.3f}.")
    for names, title, plot_name in ((OBJECTIVES, "Objectives at equal wall-clock", "study-objectives.png"),
                                    (MASKING, "Masking (UTA)", "study-masking.png"),
                                    (MASKS_PER_VIEW, "Student passes per teacher forward (UTA, --masks_per_view)",
                                     "study-masks-per-view.png")):
        text = table(result, names, title)
        if text:
            plot(result, names, title, plots / plot_name)
            sections += ["", text, f"![{title}](plots/{plot_name})"]
    for kind in ("reversed_block", "reversed_block_rolled"):
        out = plots / f"keep-frequency-{kind}.png"
        if not out.exists():
            render_masks(KeepIndexGenerator(GRID, RECIPE.mask_ratio, kind, seed=0), out, samples=6, draws=1000)
        sections.append(f"![keep frequency, {kind}](plots/keep-frequency-{kind}.png)")
    text = "\n".join(sections) + "\n"
    write_text_atomic(study / "study.md", text)
    write_json_atomic(study / "study.json", {"profile": {"name": profile_name, **asdict(profile)}, **result})
    return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="llava-uta-study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="default")
    parser.add_argument("--data", type=Path, default=Path("playground/data/shapes"), help="the quickstart's world")
    parser.add_argument("--runs", type=Path, default=Path("runs/shapes"),
                        help="the quickstart's runs folder (its teacher); the study writes RUNS/study")
    parser.add_argument("--only", nargs="+", choices=list(RUNS), help="these runs instead of the profile's")
    parser.add_argument("--seeds", type=int, help="seeds 0..N-1 instead of the profile's")
    parser.add_argument("--cache-views", type=int, default=0,
                        help="read N fixed views per image from RUNS/teacher-cache (0: the teacher runs live)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    profile = PROFILES[args.profile]
    profile = replace(profile, runs=tuple(args.only or profile.runs), seeds=args.seeds or profile.seeds)
    paths = Layout(args.data, args.runs)
    if not (paths.teacher / "open_clip_config.json").is_file():
        raise SystemExit(f"llava-uta-study: no teacher CLIP in {paths.teacher}: run llava-uta-quickstart (make demo) "
                         "with the same --data and --runs first")
    study = args.runs / "study" / args.profile
    wanted = {key: value for key, value in asdict(profile).items() if key not in ("runs", "seeds")}
    wanted["cache_views"] = args.cache_views
    record = study / "budget.json"
    if record.is_file() and json.loads(record.read_text()) != wanted:
        raise SystemExit(f"llava-uta-study: {study} holds runs with other budgets ({record}): delete it to start over")
    study.mkdir(parents=True, exist_ok=True)
    write_json_atomic(record, wanted)
    run_stages([run_stage(paths, study, profile, name, seed, args.cache_views)
                for seed in range(profile.seeds) for name in profile.runs], FolderState())
    text = write_report(study, args.profile, profile, collect(study))
    print("\n" + text, end="")
    print(f"results: {study / 'study.md'} (plots in {study / 'plots'})")


if __name__ == "__main__":
    main()
