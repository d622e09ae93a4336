"""The quickstart's results: a markdown summary with the zero-shot and LLaVA-Bench tables, and PNG plots."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from llava_uta.eval.llavabench.grounding import format_table as grounding_table
from llava_uta.eval.llavabench.jsonl import read_jsonl
from llava_uta.eval.llavabench.summarize import comparison_table, plot, summarize_reviews
from llava_uta.io_utils import save_figure_atomic, write_text_atomic
from llava_uta.quickstart.pipeline import GRID, STUDENTS, TOWERS, Layout
from llava_uta.quickstart.profiles import LANGUAGE_MODELS, RECIPE
from pretrain.masking import KeepIndexGenerator, render_masks

LADDER = {"words": "(a) scene in words (stage 2 on words)", "symbolic": "(b) symbolic tokens, one per cell",
          "uta": "(c) UTA tower, merged tokens"}


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _jsonl(path: Path) -> list[dict]:
    return read_jsonl(path) if path.is_file() else []


def zeroshot_rows(paths: Layout) -> list[dict]:
    """One row for the teacher and one per finished student: budget, compute and zero-shot accuracy."""
    summaries = {name: _read_json(paths.student(name) / "summary.json") for name in STUDENTS}
    summaries = {name: s for name, s in summaries.items() if s}
    rows = []
    teacher_log = _jsonl(paths.teacher / "train_log.jsonl")
    reference = next(iter(summaries.values()), None)
    if reference:
        rows.append({"model": "teacher CLIP (frozen)", "steps": len(teacher_log),
                     "train_s": teacher_log[-1]["seconds"] if teacher_log else None, **reference["teacher_zeroshot"]})
    for name, summary in summaries.items():
        rows.append({"model": STUDENTS[name][1], "steps": summary["steps"], "train_s": summary["train_seconds"],
                     "images_per_s": summary["images_per_s"],
                     "tflop": summary["student_tflops"] * summary["train_seconds"], **summary["zeroshot"]})
    finetuned = _read_json(paths.finetuned("uta") / "summary.json")
    if finetuned:
        rows.append({"model": "UTA + contrastive fine-tuning (its own text tower)", "steps": finetuned["steps"],
                     "train_s": finetuned["train_seconds"],
                     "images_per_s": finetuned.get("images_per_s"), **finetuned["zeroshot"]})
    if rows:
        teacher_top1 = rows[0]["top1"]
        for row in rows[1:]:
            row["of_teacher"] = row["top1"] / teacher_top1 if teacher_top1 else float("nan")
    return rows


def _cell(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def zeroshot_table(rows: list[dict], classes: int) -> str:
    lines = [f"Zero-shot classification, {classes} colour x shape classes (chance {1 / classes:.3f}); students "
             "use the teacher's text tower, the fine-tuned UTA its own (initialised from the teacher's).", "",
             "| model | steps | train s | img/s | student TFLOP | top-1 | top-5 | of teacher |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['steps']} | {_cell(r.get('train_s'), '.0f')} | "
                     f"{_cell(r.get('images_per_s'), '.0f')} | {_cell(r.get('tflop'), '.2f')} | {r['top1']:.3f} | "
                     f"{r['top5']:.3f} | {_cell(r.get('of_teacher'), '.0%')} |")
    return "\n".join(lines)


CLASSIFIERS = {"uta": "UTA student", "random": "random init (same architecture)"}


def classification_table(paths: Layout) -> str | None:
    """Fine-tuned top-1/top-5 from each initialisation, or None before the stages ran."""
    rows = []
    for init, title in CLASSIFIERS.items():
        summary = _read_json(paths.classifier(init) / "summary.json")
        if summary:
            rows.append(f"| {title} | {summary['steps']} | {summary['train_seconds']:.0f} | "
                        f"{summary['val']['top1']:.3f} | {summary['val']['top5']:.3f} |")
    if not rows:
        return None
    return "\n".join(["| initialisation | steps | train s | top-1 | top-5 |", "|---|---:|---:|---:|---:|", *rows])


def probe_tables(paths: Layout) -> list[str]:
    """The markdown tables the probe commands wrote beside their JSON."""
    tables = []
    for kind in ("patch", "linear"):
        table = paths.probe(kind).with_suffix(".md")
        if table.is_file():
            tables += [table.read_text().strip(), ""]
    return tables


def loss_curves(paths: Layout) -> dict[str, list[tuple[int, float]]]:
    """(step, loss) series of every training run that wrote a log."""
    curves = {"teacher CLIP": [(r["step"], r["loss"]) for r in _jsonl(paths.teacher / "train_log.jsonl")]}
    for name in STUDENTS:
        log = _jsonl(paths.student(name) / "log.jsonl")
        curves[f"student {name}"] = [(r["step"], r["loss"]) for r in log if "loss" in r]
    curves["contrastive fine-tuning (UTA)"] = [
        (r["step"], r["loss"]) for r in _jsonl(paths.finetuned("uta") / "log.jsonl") if "loss" in r]
    for init in CLASSIFIERS:
        curves[f"classification fine-tuning ({init} init)"] = [
            (r["step"], r["loss"]) for r in _jsonl(paths.classifier(init) / "log.jsonl") if "loss" in r]
    lm_log = _jsonl(paths.lm / "train_log.jsonl")
    curves["tiny LM"] = [(r["step"], r["loss"]) for r in lm_log if r.get("stage") != "instruct"]
    curves["tiny LM instruction tuning"] = [(r["step"], r["loss"]) for r in lm_log if r.get("stage") == "instruct"]
    for tower in TOWERS:
        for stage in (1, 2):
            state = _read_json(paths.llava(tower, stage) / "trainer_state.json") or {"log_history": []}
            curves[f"LLaVA stage {stage} ({tower} tower)"] = [
                (r["step"], r["loss"]) for r in state["log_history"] if "loss" in r]
    return {name: points for name, points in curves.items() if points}


def plot_losses(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {"CLIP losses and LM": [n for n in curves if n == "teacher CLIP" or n.startswith("tiny LM")
                                     or n.startswith("contrastive")],
              "students (negative cosine)": [n for n in curves if n.startswith("student")],
              "classification fine-tuning": [n for n in curves if n.startswith("classification")],
              "LLaVA": [n for n in curves if n.startswith("LLaVA")]}
    groups = {title: names for title, names in groups.items() if names}
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.5), squeeze=False)
    for ax, (title, names) in zip(axes[0], groups.items(), strict=True):
        for name in names:
            steps, losses = zip(*curves[name], strict=True)
            ax.plot(steps, losses, label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    save_figure_atomic(fig, path)


def write_report(paths: Layout, state: dict, profile_name: str) -> str:
    """Write results.md and the plots under plots/; returns the markdown."""
    lm_title = LANGUAGE_MODELS[state["profile"]["lm"]].title
    classes = len(json.loads((paths.data / "zeroshot" / "classnames.json").read_text()))
    paths.plots.mkdir(parents=True, exist_ok=True)
    sections = [f"# llava-uta quickstart results ({profile_name} profile)", "",
                f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores. Seconds are "
                "wall-clock on it; students read the teacher's targets from one shared cache (built once, in the "
                "first student stage).", "", "## Zero-shot", "",
                zeroshot_table(zeroshot_rows(paths), classes)]
    sections += ["", "MIM, feature distillation and CLS-only train for UTA's measured training seconds "
                 "(`--max_train_seconds`: the cosine decays over that time); the masking ablations get UTA's steps. "
                 "Student TFLOP: estimated matmul work of the student (6 x parameters x tokens)."]
    reviews = {tower: paths.reviews(tower) for tower in TOWERS if paths.reviews(tower).is_file()}
    if reviews:
        results = {f"{TOWERS[t]} tower": summarize_reviews(read_jsonl(f)) for t, f in reviews.items()}
        plot(results, paths.plots / "bench.png")
        sections += ["", "## LLaVA-Bench (ShapesWorld, offline judge), relative score (%)", "",
                     comparison_table(results)]
    grounding = {f"{TOWERS[t]} tower": _read_json(paths.grounding(t)) for t in TOWERS}
    grounding[f"{lm_title} alone, the scene in words (no image)"] = _read_json(paths.lm_in_words)
    grounding = {name: result for name, result in grounding.items() if result}
    if grounding:
        sections += ["", "## Grounding (held-out images, short answers), accuracy (%)", "",
                     grounding_table(grounding), "",
                     "`llava-uta-bench grounding`: one question per kind and image, right when the answer names the "
                     "true value alone; chance = share of the most frequent true answer. The blind tower is UTA's with "
                     "its patch embedding zeroed (same recipe, no image): a tower helps by its margin over that row. "
                     "The last row is the LLM LLaVA starts from, asked with each image's description in words in "
                     "place of the image (`--scene-in-words`): what it answers when the facts are in its context."]
    ladder = {title: _read_json(paths.grounding(key)) for key, title in LADDER.items()}
    if all(ladder.values()):
        sections += ["", "## The shape ladder (grounding, accuracy %)", "", grounding_table(ladder), "",
                     "The same LLM and LLaVA stage 2 on the same kinds of conversation, the scene handed over (a) in "
                     "words, (b) as one token per grid cell holding that cell's facts (the symbolic tower: no pixels, "
                     "no error), (c) as the UTA tower's merged patch tokens (the run above). Where accuracy drops "
                     "from one step to the next is where the image's content is lost."]
        probe = paths.probe("merged").with_suffix(".md")
        if probe.is_file():
            sections += ["", probe.read_text().strip()]
    classification = classification_table(paths)
    if classification:
        sections += ["", "## Classification fine-tuning (48 colour x shape classes)", "", classification, "",
                     "`llava-uta-finetune-cls` on `pretrain/train` (class: colour and shape of the largest object), "
                     "scored on the single-object `zeroshot/val` images; the same recipe and steps from the UTA "
                     "student and from the same architecture at random init. Pre-training helps by the gap."]
    probes = probe_tables(paths)
    if probes:
        sections += ["", "## Probes of the frozen towers", "", *probes,
                     "Per patch: `llava-uta-patchprobe` (layer -2, the tokens LLaVA's projector reads); per image: "
                     "`llava-uta-linprobe` (CLS of the last block, fitted on `pretrain/train`, scored on "
                     "`zeroshot/val`). `random init (...)` rows are "
                     "the architectures with fresh seeded weights, the floor that pre-training must beat."]
    curves = loss_curves(paths)
    if curves:
        plot_losses(curves, paths.plots / "losses.png")
    masks = []
    for kind in ("reversed_block", "block", "random"):
        out = paths.plots / f"masks-{kind}.png"
        if kind == "reversed_block" or paths.student(f"uta-{kind}").is_dir():
            render_masks(KeepIndexGenerator(GRID, RECIPE.mask_ratio, kind, seed=0), out, samples=6, draws=1000)
            masks.append(f"![{kind} masks](plots/{out.name})")
    sections += ["", "## Plots", "", "![loss curves](plots/losses.png)", "", *masks]
    if reviews:
        sections += ["", "![LLaVA-Bench](plots/bench.png)"]
    stage_rows = [f"| {v['title']} | {v['seconds']:.0f} |" for v in state["stages"].values()]
    total = sum(v["seconds"] for v in state["stages"].values())
    sections += ["", "## Stage times", "", "| stage | seconds |", "|---|---:|", *stage_rows, f"| total | {total:.0f} |"]
    text = "\n".join(sections) + "\n"
    write_text_atomic(paths.results, text)
    return text
