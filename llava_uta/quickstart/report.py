"""The quickstart's results.md: one section per kind of stage output (SECTIONS), each fed by the stages that name it,
and PNG plots."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llava_uta.eval.llavabench.grounding import format_table as grounding_table
from llava_uta.eval.llavabench.jsonl import read_jsonl
from llava_uta.eval.llavabench.summarize import comparison_table, plot, summarize_reviews
from llava_uta.io_utils import save_figure_atomic, write_text_atomic
from llava_uta.quickstart.pipeline import GRID, Layout, Stage
from llava_uta.quickstart.profiles import RECIPE
from pretrain.masking import KeepIndexGenerator, render_masks


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _jsonl(path: Path) -> list[dict]:
    return read_jsonl(path) if path.is_file() else []


Rows = list[tuple[str, Stage]]  # (row label, finished stage) of one section, in pipeline order


def zeroshot_rows(rows: Rows) -> list[dict]:
    """One row per finished CLIP model: budget, compute and zero-shot accuracy (the teacher's as its students
    measured it, so only beside a student)."""
    reference = next((_read_json(stage.output) for _, stage in rows if stage.tool == "llava-uta-pretrain"), None)
    teacher, table = None, []
    for label, stage in rows:
        if stage.tool == "llava-uta-train-clip":
            if reference:
                log = _jsonl(stage.output.parent / "train_log.jsonl")
                teacher = {"model": label, "steps": len(log), "train_s": log[-1]["seconds"] if log else None,
                           **reference["teacher_zeroshot"]}
            continue
        summary = _read_json(stage.output)
        tflop = summary["student_tflops"] * summary["train_seconds"] if "student_tflops" in summary else None
        table.append({"model": label, "steps": summary["steps"], "train_s": summary["train_seconds"],
                      "images_per_s": summary.get("images_per_s"), "tflop": tflop, **summary["zeroshot"]})
    if teacher is None:
        return table
    for row in table:
        row["of_teacher"] = row["top1"] / teacher["top1"] if teacher["top1"] else float("nan")
    return [teacher, *table]


def _cell(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def zeroshot_section(paths: Layout, rows: Rows) -> list[str]:
    classes = len(json.loads((paths.data / "zeroshot" / "classnames.json").read_text()))
    lines = ["## Zero-shot", "",
             f"Zero-shot classification, {classes} colour x shape classes (chance {1 / classes:.3f}); students "
             "use the teacher's text tower, the fine-tuned UTA its own (initialised from the teacher's).", "",
             "| model | steps | train s | img/s | student TFLOP | top-1 | top-5 | of teacher |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in zeroshot_rows(rows):
        lines.append(f"| {r['model']} | {r['steps']} | {_cell(r.get('train_s'), '.0f')} | "
                     f"{_cell(r.get('images_per_s'), '.0f')} | {_cell(r.get('tflop'), '.2f')} | {r['top1']:.3f} | "
                     f"{r['top5']:.3f} | {_cell(r.get('of_teacher'), '.0%')} |")
    return [*lines, "", "MIM, feature distillation and CLS-only train for UTA's measured training seconds "
            "(`--max_train_seconds`: the cosine decays over that time); the masking ablations get UTA's steps. "
            "Student TFLOP: estimated matmul work of the student (6 x parameters x tokens)."]


def bench_section(paths: Layout, rows: Rows) -> list[str]:
    results = {label: summarize_reviews(read_jsonl(stage.output)) for label, stage in rows}
    plot(results, paths.plots / "bench.png")
    return ["## LLaVA-Bench (ShapesWorld, offline judge), relative score (%)", "", comparison_table(results), "",
            "![LLaVA-Bench](plots/bench.png)"]


def grounding_section(heading: str, caption: str) -> Callable[[Layout, Rows], list[str]]:
    """A section of one grounding table, a row per finished grounding stage."""

    def write(paths: Layout, rows: Rows) -> list[str]:
        return [heading, "", grounding_table({label: _read_json(stage.output) for label, stage in rows}), "", caption]

    return write


def probe_tables(paths: Layout, rows: Rows) -> list[str]:
    """The markdown tables the probe commands wrote beside their JSON, a blank line after each."""
    tables = [stage.output.with_suffix(".md") for _, stage in rows]
    return [line for table in tables if table.is_file() for line in (table.read_text().strip(), "")]


def classification_section(paths: Layout, rows: Rows) -> list[str]:
    """Fine-tuned top-1/top-5 from each initialisation."""
    lines = ["## Classification fine-tuning (48 colour x shape classes)", "",
             "| initialisation | steps | train s | top-1 | top-5 |", "|---|---:|---:|---:|---:|"]
    for label, stage in rows:
        summary = _read_json(stage.output)
        lines.append(f"| {label} | {summary['steps']} | {summary['train_seconds']:.0f} | "
                     f"{summary['val']['top1']:.3f} | {summary['val']['top5']:.3f} |")
    return [*lines, "", "`llava-uta-finetune-cls` on `pretrain/train` (class: colour and shape of the largest object), "
            "scored on the single-object `zeroshot/val` images; the same recipe and steps from the UTA "
            "student and from the same architecture at random init. Pre-training helps by the gap."]


def probes_section(paths: Layout, rows: Rows) -> list[str]:
    tables = probe_tables(paths, rows)
    return ["## Probes of the frozen towers", "", *tables,
            "Per patch: `llava-uta-patchprobe` (layer -2, the tokens LLaVA's projector reads); per image: "
            "`llava-uta-linprobe` (CLS of the last block, fitted on `pretrain/train`, scored on "
            "`zeroshot/val`). `random init (...)` rows are "
            "the architectures with fresh seeded weights, the floor that pre-training must beat."] if tables else []


@dataclass(frozen=True)
class Section:
    """A part of results.md: written from the finished stages whose `report` names it."""

    write: Callable[[Layout, Rows], list[str]]
    needs_every_stage: bool = False  # only once every stage that feeds it has finished


# results.md's sections in order; a stage names the ones it feeds (Stage.report)
SECTIONS = {
    "zeroshot": Section(zeroshot_section),
    "bench": Section(bench_section),
    "grounding": Section(grounding_section(
        "## Grounding (held-out images, short answers), accuracy (%)",
        "`llava-uta-bench grounding`: one question per kind and image, right when the answer names the true value "
        "alone; chance = share of the most frequent true answer. The blind tower is UTA's with its patch embedding "
        "zeroed (same recipe, no image): a tower helps by its margin over that row. The last row is the LLM LLaVA "
        "starts from, asked with each image's description in words in place of the image (`--scene-in-words`): what "
        "it answers when the facts are in its context.")),
    "ladder": Section(grounding_section(
        "## The shape ladder (grounding, accuracy %)",
        "The same LLM and LLaVA stage 2 on the same kinds of conversation, the scene handed over (a) in words, (b) as "
        "one token per grid cell holding that cell's facts (the symbolic tower: no pixels, no error), (c) as the UTA "
        "tower's merged patch tokens (the run above). Where accuracy drops from one step to the next is where the "
        "image's content is lost."), needs_every_stage=True),
    "ladder-probe": Section(probe_tables),
    "classification": Section(classification_section),
    "probes": Section(probes_section),
}


def _log(path: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in _jsonl(path) if "loss" in r]


def loss_curves(stage: Stage) -> dict[str, list[tuple[int, float]]]:
    """The (step, loss) series a finished training stage logged, by the tool that ran it."""
    folder = stage.output.parent
    if stage.tool in ("llava-uta-train-clip", "llava-uta-tiny-lm"):
        log = _jsonl(folder / "train_log.jsonl")
        curves = {stage.title: [(r["step"], r["loss"]) for r in log if r.get("stage") != "instruct"]}
        return curves | {f"{stage.title}: instruction tuning": [(r["step"], r["loss"]) for r in log
                                                                  if r.get("stage") == "instruct"]}
    if stage.tool in ("llava-uta-pretrain", "llava-uta-finetune-clip", "llava-uta-finetune-cls"):
        return {stage.title: _log(folder / "log.jsonl")}
    if stage.tool == "llava-uta-train":
        state = _read_json(folder / "trainer_state.json") or {"log_history": []}
        return {stage.title: [(r["step"], r["loss"]) for r in state["log_history"] if "loss" in r]}
    return {}


# the loss plot's panels: which tools' curves share one
LOSS_PANELS = {"CLIP losses and LM": ("llava-uta-train-clip", "llava-uta-tiny-lm", "llava-uta-finetune-clip"),
               "students (negative cosine)": ("llava-uta-pretrain",),
               "classification fine-tuning": ("llava-uta-finetune-cls",),
               "LLaVA": ("llava-uta-train",)}


def plot_losses(stages: list[Stage], path: Path) -> bool:
    """One panel per kind of training (LOSS_PANELS) with the curve of every finished stage; False if none."""
    panels = {title: {name: points for stage in stages if stage.tool in tools and stage.output.exists()
                      for name, points in loss_curves(stage).items() if points}
              for title, tools in LOSS_PANELS.items()}
    panels = {title: curves for title, curves in panels.items() if curves}
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, (title, curves) in zip(axes[0], panels.items(), strict=True):
        for name, points in curves.items():
            steps, losses = zip(*points, strict=True)
            ax.plot(steps, losses, label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    save_figure_atomic(fig, path)
    return True


def write_report(paths: Layout, stages: list[Stage], state: dict, profile_name: str) -> str:
    """Write results.md (each section from the finished stages that feed it) and the plots; returns the markdown."""
    paths.plots.mkdir(parents=True, exist_ok=True)
    sections = [f"# llava-uta quickstart results ({profile_name} profile)", "",
                f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores. Seconds are "
                "wall-clock on it; students read the teacher's targets from one shared cache (built once, in the "
                "first student stage)."]
    for key, section in SECTIONS.items():
        feeding = [stage for stage in stages if key in stage.report]
        rows = [(stage.report[key], stage) for stage in feeding if stage.output.exists()]
        if rows and (len(rows) == len(feeding) or not section.needs_every_stage):
            text = section.write(paths, rows)
            sections += ["", *text] if text else []
    plots = ["![loss curves](plots/losses.png)"] if plot_losses(stages, paths.plots / "losses.png") else []
    for kind in ("reversed_block", "block", "random"):
        out = paths.plots / f"masks-{kind}.png"
        if kind == "reversed_block" or paths.student(f"uta-{kind}").is_dir():
            render_masks(KeepIndexGenerator(GRID, RECIPE.mask_ratio, kind, seed=0), out, samples=6, draws=1000)
            plots += ["", f"![{kind} masks](plots/{out.name})"]
    sections += ["", "## Plots", "", *plots]
    stage_rows = [f"| {v['title']} | {v['seconds']:.0f} |" for v in state["stages"].values()]
    total = sum(v["seconds"] for v in state["stages"].values())
    sections += ["", "## Stage times", "", "| stage | seconds |", "|---|---:|", *stage_rows, f"| total | {total:.0f} |"]
    text = "\n".join(sections) + "\n"
    write_text_atomic(paths.results, text)
    return text
