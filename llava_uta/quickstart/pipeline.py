"""The quickstart's stages: each one a real run of one of the project's command-line tools, skipped once done.

A stage is done when its output exists and `quickstart.json` in the runs folder records it; the record is
written (atomically) only after the stage returns, so an interrupted stage runs again on the next call and
resumes through its own tool (`llava-uta-pretrain --resume`, the bench's append logs).
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import import_module
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType

from llava_uta.data.shapes.writer import ShapesWorldConfig
from llava_uta.io_utils import write_json_atomic
from llava_uta.model.projector import merge_factor
from llava_uta.model.uta_vit import UTA_VIT_CONFIGS
from llava_uta.quickstart.profiles import LANGUAGE_MODELS, RECIPE, Profile, warmup_steps
from pretrain.masking import KeepIndexGenerator

GRID = UTA_VIT_CONFIGS[RECIPE.student_model].grid_size
UTA_KEPT_SHARE = 1 / (1 + KeepIndexGenerator(GRID, RECIPE.mask_ratio).num_keep)  # CLS share of UTA's plain-mean loss
# name -> (llava-uta-pretrain flags, title); objective baselines get UTA's training seconds, masking ablations its steps
STUDENTS = {
    "uta": ([], "UTA, reversed block masking (kept = blocks)"),
    "mim": (["--objective", "mim", "--masking", "block", "--cls_weight", str(UTA_KEPT_SHARE)],
            "MIM (EVA-02 style, [MASK] tokens, block masking, CLS aligned too)"),
    "fd": (["--objective", "fd"], "feature distillation (full image, every token)"),
    "cls": (["--objective", "cls"], "CLS-only distillation (full image)"),
    "uta-block": (["--masking", "block"], "UTA, block masking (kept = complement of blocks)"),
    "uta-random": (["--masking", "random"], "UTA, random masking"),
}
EQUAL_WALL_CLOCK = ("mim", "fd", "cls")
# LLaVA's vision towers. "blind" is the UTA tower with its patch embedding zeroed: the same recipe, no image;
# "random" the student's architecture at its seeded initialisation (the probes' random-init twin): no pre-training.
TOWERS = {"uta": "UTA student", "teacher": "teacher CLIP", "blind": "blind (image withheld)",
          "random": "random-init UTA ViT"}
SYMBOLIC = "symbolic (each cell's facts, no pixels)"  # the shape ladder's diagnostic tower (--ladder)
# the shape ladder's rows in results.md: the scene (a) in words, (b) as symbolic tokens, (c) as UTA's merged tokens
LADDER = {"words": "(a) scene in words (stage 2 on words)", "symbolic": "(b) symbolic tokens, one per cell",
          "uta": "(c) UTA tower, merged tokens"}
PROBED = ("uta", "mim", "fd", "cls")  # students whose frozen features the probes read, beside the teacher's


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline: a run of one of the project's tools (a console script of pyproject.toml)."""

    key: str
    title: str
    tool: str  # e.g. "llava-uta-pretrain"
    argv: Callable[[], list[str]]  # built when the stage runs: a budget may come from an earlier stage's output
    output: Path  # exists once the stage is done
    report: dict[str, str] = field(default_factory=dict)  # results.md section -> this stage's row label there

    def command(self) -> str:
        """The equivalent shell command."""
        return shlex.join([self.tool, *self.argv()])


def tool_module(tool: str) -> ModuleType:
    """The module behind a console script (its `main(argv)` runs the tool, `build_parser()` reads its flags)."""
    found = entry_points(group="console_scripts", name=tool)
    if not found:
        raise RuntimeError(f"no console script {tool!r}: install the project (pip install -e .) to run the pipeline")
    return import_module(next(iter(found)).module)


def run_stage(stage: Stage) -> None:
    tool_module(stage.tool).main(stage.argv())


class Layout:
    """Where every input and output of the quickstart lives."""

    def __init__(self, data: Path, runs: Path):
        self.data, self.runs = data, runs
        self.bench = data / "eval" / "llava-bench-shapes"
        self.grounding_questions = data / "eval" / "grounding"
        self.teacher = runs / "teacher"
        self.teacher_cache = runs / "teacher-cache"
        self.lm = runs / "lm"
        self.state = runs / "quickstart.json"
        self.results = runs / "results.md"
        self.plots = runs / "plots"

    def student(self, name: str) -> Path:
        return self.runs / "students" / name

    def finetuned(self, name: str) -> Path:
        return self.runs / "finetune" / name

    def classifier(self, init: str) -> Path:
        return self.runs / "classify" / init

    def probe(self, kind: str) -> Path:
        return self.runs / "probe" / f"{kind}.json"

    def tower(self, name: str) -> Path:
        return self.runs / "towers" / name

    def llava(self, run: str, stage: int) -> Path:
        """One LLaVA run's stage folder; a run is named by its tower (and its seed, after the first)."""
        return self.runs / "llava" / run / f"stage{stage}"

    @property
    def symbolic_data(self) -> Path:
        """The same world drawn as codes for the symbolic tower (`llava-uta-shapes --symbolic`)."""
        return self.data.with_name(self.data.name + "-symbolic")

    @property
    def words(self) -> Path:
        """The shape ladder's first step: stage 2 on the scenes in words (its LLM answers with the scene in words)."""
        return self.runs / "llava" / "words" / "stage2"

    def reviews(self, run: str) -> Path:
        return self.runs / "bench" / f"{run}.jsonl"

    def answers(self, run: str) -> Path:
        return self.runs / "bench" / f"answers-{run}.jsonl"

    def grounding(self, run: str) -> Path:
        return self.runs / "grounding" / f"{run}.json"

    def grounding_answers(self, run: str) -> Path:
        return self.runs / "grounding" / f"answers-{run}.jsonl"

    @property
    def lm_in_words(self) -> Path:
        """Grounding of the LLM alone, each image's description in words in its place."""
        return self.runs / "grounding" / "lm-in-words.json"

    @property
    def lm_in_words_answers(self) -> Path:
        return self.runs / "grounding" / "answers-lm-in-words.jsonl"


def pretrain_argv(paths: Layout, out: Path, seed: int, batch: int, warmup: int) -> list[str]:
    """llava-uta-pretrain flags of the shared recipe (every student of the quickstart and the study): data, teacher,
    model, optimiser, views, zero-shot evaluation; the caller adds the budget and the student's own flags."""
    r, zs = RECIPE, paths.data / "zeroshot"
    return ["--data_path", str(paths.data / "pretrain" / "train"), "--output_dir", str(out), "--resume",
            "--teacher", f"open_clip:local-dir:{paths.teacher}", "--model", r.student_model,
            "--mask_ratio", str(r.mask_ratio), "--batch_size", str(batch), "--micro_batch_size", str(batch),
            "--lr", str(r.student_lr), "--warmup_steps", str(warmup), "--crop_min_scale", str(r.student_crop_min_scale),
            "--workers", "1", "--seed", str(seed), "--eval_data", str(zs / "val"),
            "--eval_classnames", str(zs / "classnames.json"), "--eval_templates", str(zs / "templates.json")]


class RunState:
    """quickstart.json: the profile (its budgets and the recipe), and the finished stages with their seconds."""

    def __init__(self, path: Path, profile: Profile, profile_name: str):
        self.path = path
        wanted = {"name": profile_name, **asdict(profile), "recipe": asdict(RECIPE)}
        self.data = json.loads(path.read_text()) if path.is_file() else {"profile": wanted, "stages": {}}
        if self.data["profile"] != wanted:
            raise ValueError(f"{path} records a run with other budgets ({self.data['profile']['name']} profile, "
                             "changed steps, or another recipe): use another --runs folder, or delete that one to "
                             "start over")

    def done(self, stage: Stage) -> bool:
        return stage.key in self.data["stages"] and stage.output.exists()

    def finish(self, stage: Stage, seconds: float) -> None:
        self.data["stages"][stage.key] = {"title": stage.title, "seconds": round(seconds, 1)}
        self.save()

    def save(self) -> None:
        write_json_atomic(self.path, self.data)


class FolderState:
    """A stage is done when its output exists (the study's runs, whose budgets budget.json records)."""

    def done(self, stage: Stage) -> bool:
        return stage.output.exists()

    def finish(self, stage: Stage, seconds: float) -> None:
        pass


def run_stages(stages: list[Stage], state: RunState | FolderState) -> None:
    """Run each stage not yet done, in order, with a header line; record its time."""
    for i, stage in enumerate(stages, 1):
        header = f"[{i}/{len(stages)}] {stage.title}"
        if state.done(stage):
            print(f"{header}: done ({stage.output})", flush=True)
            continue
        print(f"{header} ...", flush=True)
        start = time.perf_counter()
        run_stage(stage)
        seconds = time.perf_counter() - start
        if not stage.output.exists():
            raise RuntimeError(f"stage {stage.key!r} finished without writing {stage.output}")
        state.finish(stage, seconds)
        print(f"{header}: {seconds:.0f} s", flush=True)


class Pipeline:
    """Builds the stage list of one quickstart run: each stage a tool and its flags."""

    def __init__(self, layout: Layout, profile: Profile, seed: int = 0, llava_seeds: int = 1):
        if llava_seeds < 1:
            raise ValueError(f"llava_seeds must be at least 1, got {llava_seeds}")
        self.paths, self.profile, self.seed, self.llava_seeds = layout, profile, seed, llava_seeds
        self.lm = LANGUAGE_MODELS[profile.lm]

    def stages(self, compare: bool, ladder: bool = False) -> list[Stage]:
        p = self.paths
        stages = [
            Stage("world", "ShapesWorld", "llava-uta-shapes", lambda: self.world_argv(p.data),
                  p.data / "manifest.json"),
            Stage("teacher", "teacher CLIP", "llava-uta-train-clip", self.teacher_argv,
                  p.teacher / "open_clip_config.json", {"zeroshot": "teacher CLIP (frozen)"}),
            self.student_stage("uta"),
            Stage("tower-uta", "UTA student -> LLaVA tower", "llava-uta-convert",
                  lambda: [str(p.student("uta") / "student.safetensors"), str(p.tower("uta"))],
                  p.tower("uta") / "config.json"),
            self.lm_stage(),
            Stage("lm-reading", f"{self.lm.title} answering from the scenes in words, no image (grounding "
                  "--scene-in-words)", "llava-uta-bench", self.lm_reading_argv, p.lm_in_words,
                  {"grounding": f"{self.lm.title} alone, the scene in words (no image)"}),
            *self.llava_seed_stages("uta"),
        ]
        if compare:  # the LLaVA controls first (minutes), then the other students
            for tower, title, argv in (
                ("blind", "blind tower: UTA's with its patch embedding zeroed",
                 ["--blind", str(p.tower("uta"))]),
                ("teacher", "teacher CLIP -> LLaVA tower", ["--from-open-clip", f"open_clip:local-dir:{p.teacher}"]),
                ("random", "random-init tower: the student's architecture, untrained",
                 ["--random-init", RECIPE.student_model, "--seed", str(self.seed)]),
            ):
                stages += [Stage(f"tower-{tower}", title, "llava-uta-convert",
                                 lambda argv=argv, tower=tower: [*argv, str(p.tower(tower))],
                                 p.tower(tower) / "config.json"),
                           *self.llava_seed_stages(tower)]
            stages.append(Stage("finetune-uta", "UTA student + teacher text, contrastive fine-tuning",
                                "llava-uta-finetune-clip", self.finetune_argv, p.finetuned("uta") / "summary.json",
                                {"zeroshot": "UTA + contrastive fine-tuning (its own text tower)"}))
            stages += [self.student_stage(name) for name in STUDENTS if name != "uta"]
            stages += [Stage(f"classify-{init}", f"classification fine-tuning from {title}", "llava-uta-finetune-cls",
                             lambda init=init: self.classify_argv(init), p.classifier(init) / "summary.json",
                             {"classification": row})
                       for init, title, row in (("uta", "the UTA student", "UTA student"),
                                                ("random", "random init", "random init (same architecture)"))]
            stages += [Stage("probe-patch", "per-patch probes of the frozen towers", "llava-uta-patchprobe",
                             self.patch_probe_argv, p.probe("patch"), {"probes": "per patch"}),
                       Stage("probe-linear", "linear probes of the frozen towers", "llava-uta-linprobe",
                             self.linear_probe_argv, p.probe("linear"), {"probes": "per image"})]
        return stages + (self.ladder_stages() if ladder else [])

    def ladder_stages(self) -> list[Stage]:
        """The shape ladder: the same LLM and stage 2 on the scene (a) in words, (b) as one symbolic token per cell,
        (c) as UTA's merged tokens (the default run), with a probe of what (c)'s merged tokens hold."""
        p = self.paths
        return [
            Stage("ladder-probe", "probe: shape in the UTA tower's merged tokens", "llava-uta-patchprobe",
                  self.merged_probe_argv, p.probe("merged"), {"ladder-probe": "UTA tower, merged tokens"}),
            Stage("ladder-words", "shape ladder (a): LLaVA stage 2 on the scenes in words", "llava-uta-train",
                  self.words_argv, p.words / "model.safetensors"),
            Stage("ladder-words-grounding", "shape ladder (a): grounding with the scene in words", "llava-uta-bench",
                  self.words_grounding_argv, p.grounding("words"), {"ladder": LADDER["words"]}),
            Stage("ladder-world", "shape ladder (b): the world drawn as codes", "llava-uta-shapes",
                  lambda: [*self.world_argv(p.symbolic_data), "--symbolic"],
                  p.symbolic_data / "manifest.json"),
            Stage("tower-symbolic", "shape ladder (b): the symbolic tower", "llava-uta-convert",
                  lambda: ["--symbolic", str(p.symbolic_data), str(p.tower("symbolic"))],
                  p.tower("symbolic") / "config.json"),
            *[s for s in self.llava_stages("symbolic") if not s.key.startswith(("answer-", "review-"))],
        ]

    # ---- ShapesWorld, teacher, language model

    def world_argv(self, out: Path) -> list[str]:
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in self.profile.world.items()]
        return ["--out", str(out), "--seed", str(self.seed), *flags]

    def teacher_argv(self) -> list[str]:
        group_size = self.profile.world.get("clip_group_size", ShapesWorldConfig.clip_group_size)
        return ["--train-csv", str(self.paths.data / "clip" / "captions.csv"), "--out", str(self.paths.teacher),
                "--steps", str(self.profile.teacher_steps), "--batch-size", str(self.profile.teacher_batch),
                "--group-size", str(group_size), "--seed", str(self.seed)]

    def lm_stage(self) -> Stage:
        """The LLM: the shipped SmolLM2 GGUF converted once to a transformers folder, or the tiny LM trained here."""
        output = self.paths.lm / "model.safetensors"
        if self.profile.lm == "tiny":
            return Stage("lm", "tokenizer + tiny Llama, instruction-tuned on the scenes in words", "llava-uta-tiny-lm",
                         self.tiny_lm_argv, output)
        return Stage("lm", f"{self.lm.title}: the shipped GGUF file -> transformers folder", "llava-uta-convert",
                     lambda: ["--from-gguf", "shipped", str(self.paths.lm)], output)

    def tiny_lm_argv(self) -> list[str]:
        """Plain LM training on the corpus and the chat texts, then instruction tuning on the scenes in words."""
        llava, prof = self.paths.data / "llava", self.profile
        sft = ["--sft_json", str(llava / "text_instruct.json"), "--sft_steps", str(prof.lm_sft_steps)] \
            if prof.lm_sft_steps else []
        return ["--corpus", str(self.paths.data / "text" / "corpus.txt"), "--chat_json", str(llava / "instruct.json"),
                "--out", str(self.paths.lm), "--steps", str(prof.lm_steps), *sft, "--seed", str(self.seed)]

    def lm_reading_argv(self) -> list[str]:
        p = self.paths
        return ["grounding", "--scene-in-words", "--model-path", str(p.lm), "--conv-mode", self.lm.template,
                "--question-file", str(p.grounding_questions / "questions.jsonl"), "--answers-file",
                str(p.lm_in_words_answers), "--output", str(p.lm_in_words), "--model-id", "lm-in-words",
                "--batch-size", "32"]

    # ---- students

    def student_stage(self, name: str) -> Stage:
        return Stage(f"student-{name}", f"student: {STUDENTS[name][1]}", "llava-uta-pretrain",
                     lambda: self.student_argv(name), self.paths.student(name) / "summary.json",
                     {"zeroshot": STUDENTS[name][1]})

    def student_argv(self, name: str) -> list[str]:
        p, prof = self.paths, self.profile
        warmup = warmup_steps(prof.student_steps, RECIPE.student_warmup_divisor, prof.student_warmup)
        return [*pretrain_argv(p, p.student(name), self.seed, prof.student_batch, warmup), "--save_every", "100",
                "--teacher_cache", str(p.teacher_cache), "--cache_views", str(prof.cache_views),
                *self.student_budget(name), *STUDENTS[name][0]]

    def student_budget(self, name: str) -> list[str]:
        """UTA's steps; for an objective baseline, UTA's measured training seconds (its steps only bound it)."""
        steps = self.profile.student_steps
        if name not in EQUAL_WALL_CLOCK:
            return ["--max_steps", str(steps)]
        summary = self.paths.student("uta") / "summary.json"
        seconds = f"{json.loads(summary.read_text())['train_seconds']:.1f}" if summary.is_file() else \
            "UTA_TRAIN_SECONDS"  # shown by --dry-run; the UTA student's stage runs first and writes it
        return ["--max_steps", str(4 * steps), "--max_train_seconds", seconds]

    def finetune_argv(self) -> list[str]:
        """The paper's second stage at this scale: LAMB with layer decay, T = 0.01, on the teacher's captions."""
        p, prof, r, zs = self.paths, self.profile, RECIPE, self.paths.data / "zeroshot"
        return ["--train_data", str(p.data / "clip" / "captions.csv"), "--output_dir", str(p.finetuned("uta")),
                "--init", str(p.student("uta") / "student.safetensors"),
                "--text_model", f"open_clip:local-dir:{p.teacher}",
                "--max_steps", str(prof.finetune_steps), "--batch_size", str(prof.finetune_batch),
                "--micro_batch_size", str(prof.finetune_batch), "--lr", str(r.finetune_lr),
                "--warmup_steps", str(warmup_steps(prof.finetune_steps, r.finetune_warmup_divisor)),
                "--layer_decay", str(r.finetune_layer_decay),
                "--workers", "1", "--save_every", "50", "--resume", "--seed", str(self.seed),
                "--eval_data", str(zs / "val"), "--eval_classnames", str(zs / "classnames.json"),
                "--eval_templates", str(zs / "templates.json")]

    def classify_argv(self, init: str) -> list[str]:
        """Fine-tune for the 48 colour x shape classes: pretrain/train (class of the largest object) -> zeroshot/val."""
        p, prof, r = self.paths, self.profile, RECIPE
        start = ["--init", str(p.student("uta") / "student.safetensors")] if init == "uta" else \
            ["--model", r.student_model]
        data = ["--train_data", str(p.data / "pretrain" / "train"), "--val_data", str(p.data / "zeroshot" / "val")]
        return [*start, *data,
                "--output_dir", str(p.classifier(init)), "--max_steps", str(prof.classify_steps),
                "--batch_size", str(prof.classify_batch), "--micro_batch_size", str(prof.classify_batch),
                "--lr", str(r.classify_lr),
                "--warmup_steps", str(warmup_steps(prof.classify_steps, r.classify_warmup_divisor)),
                "--layer_decay", str(r.classify_layer_decay), "--drop_path", str(r.classify_drop_path),
                "--smoothing", str(r.classify_smoothing), "--auto_augment", "none", "--color_jitter", "0",
                "--scale_min", str(r.classify_crop_min_scale), "--workers", "1", "--save_every", "50", "--resume",
                "--seed", str(self.seed)]

    def probe_towers(self) -> list[str]:
        """--tower flags: the teacher and the probed students; --random-init adds their architectures' twins."""
        towers = ["--tower", f"teacher=open_clip:local-dir:{self.paths.teacher}"]
        for name in PROBED:
            towers += ["--tower", f"{name}={self.paths.student(name) / 'student.safetensors'}"]
        return [*towers, "--random-init", "--seed", str(self.seed), "--workers", "0"]  # tiny images: no worker

    def merged_probe_argv(self) -> list[str]:
        """Shape and colour of each object from the pixel-shuffle token that holds it, as the projector reads it."""
        factor = merge_factor(RECIPE.projector_type)
        return ["--data", str(self.paths.data), "--max-train-images", str(self.profile.probe_train_images),
                "--patches", "centers", "--merge", str(factor), "--attributes", "color", "shape",
                "--out", str(self.paths.probe("merged")),
                "--tower", f"uta={self.paths.student('uta') / 'student.safetensors'}", "--random-init",
                "--seed", str(self.seed), "--workers", "0"]

    def patch_probe_argv(self) -> list[str]:
        return ["--data", str(self.paths.data), "--max-train-images", str(self.profile.probe_train_images),
                "--out", str(self.paths.probe("patch")), *self.probe_towers()]

    def linear_probe_argv(self) -> list[str]:
        """CLS features of pretrain/train images (class: the largest object) -> the single-object zeroshot/val."""
        data = self.paths.data
        return ["--train", str(data / "pretrain" / "train"), "--val", str(data / "zeroshot" / "val"),
                "--max-per-class", str(self.profile.probe_images_per_class), "--pool", "cls",
                "--out", str(self.paths.probe("linear")), *self.probe_towers()]

    # ---- LLaVA with a tower, and its LLaVA-Bench

    def llava_seed_stages(self, tower: str) -> list[Stage]:
        """The LLaVA stages on one tower once per LLaVA seed (SEED, SEED + 1, ...): the spread of a tower's rows."""
        return [stage for k in range(self.llava_seeds) for stage in self.llava_stages(tower, self.seed + k)]

    def llava_run(self, tower: str, seed: int) -> str:
        """The folder and file name of LLaVA's run on a tower: the tower's name, plus the seed after the first."""
        return tower if seed == self.seed else f"{tower}-seed{seed}"

    def llava_stages(self, tower: str, seed: int | None = None) -> list[Stage]:
        seed = self.seed if seed is None else seed
        run, p = self.llava_run(tower, seed), self.paths
        name = f"{TOWERS.get(tower, SYMBOLIC)} tower" + (f", LLaVA seed {seed}" if self.llava_seeds > 1 else "")
        bench = {"bench": name} if tower in TOWERS else {}  # the symbolic tower: a ladder row only
        grounding = {**({"grounding": name} if tower in TOWERS else {}),
                     **({"ladder": LADDER[tower]} if tower in LADDER and seed == self.seed else {})}
        return [
            Stage(f"stage1-{run}", f"LLaVA stage 1, {name}", "llava-uta-train",
                  lambda: self.llava_argv(tower, 1, seed), p.llava(run, 1) / "mm_projector.bin"),
            Stage(f"stage2-{run}", f"LLaVA stage 2, {name}", "llava-uta-train",
                  lambda: self.llava_argv(tower, 2, seed), p.llava(run, 2) / "model.safetensors"),
            Stage(f"answer-{run}", f"LLaVA-Bench answers, {name}", "llava-uta-bench",
                  lambda: self.answer_argv(run), p.answers(run)),
            Stage(f"review-{run}", f"LLaVA-Bench reviews, {name}", "llava-uta-bench",
                  lambda: self.review_argv(run), p.reviews(run), bench),
            Stage(f"grounding-{run}", f"grounding, {name}", "llava-uta-bench",
                  lambda: self.grounding_argv(tower, run), p.grounding(run), grounding),
        ]

    def llava_argv(self, tower: str, stage: int, seed: int | None = None) -> list[str]:
        p, prof, r, lm = self.paths, self.profile, RECIPE, self.lm
        seed = self.seed if seed is None else seed
        run = self.llava_run(tower, seed)
        projector = "mlp2x_gelu" if tower == "symbolic" else r.projector_type  # symbolic: one token per cell already
        common = ["--model_name_or_path", str(p.lm), "--vision_tower", str(p.tower(tower)),
                  "--mm_projector_type", projector, "--mm_grid_tags", str(r.grid_tags),
                  "--image_folder", str(self.image_folder(tower)),
                  "--output_dir", str(p.llava(run, stage)), "--lr_scheduler_type", "cosine", "--logging_steps", "10",
                  "--save_strategy", "no", "--report_to", "none", "--seed", str(seed),
                  "--disable_tqdm", "False", "--log_level", "warning"]
        if stage == 1:
            return [*common, "--version", "plain", "--tune_mm_mlp_adapter", "True",
                    "--data_path", str(p.data / "llava" / "pretrain.json"),
                    "--per_device_train_batch_size", str(prof.stage1_batch), "--max_steps", str(prof.stage1_steps),
                    "--learning_rate", str(lm.stage1_lr),
                    "--warmup_steps", str(warmup_steps(prof.stage1_steps, r.stage1_warmup_divisor)),
                    "--weight_decay", str(r.stage1_weight_decay)]
        projector_lr = ["--mm_projector_lr", str(lm.projector_lr)] if lm.projector_lr else []
        return [*common, "--version", lm.template, "--pretrain_mm_mlp_adapter",
                str(p.llava(run, 1) / "mm_projector.bin"), "--data_path", str(p.data / "llava" / "instruct.json"),
                "--per_device_train_batch_size", str(prof.stage2_batch), "--max_steps", str(prof.stage2_steps),
                "--learning_rate", str(lm.stage2_lr), *projector_lr,
                "--warmup_steps", str(warmup_steps(prof.stage2_steps, r.stage2_warmup_divisor)),
                "--group_by_modality_length", "True"]

    def image_folder(self, tower: str) -> Path:
        return self.paths.symbolic_data if tower == "symbolic" else self.paths.data

    def words_argv(self) -> list[str]:
        """Stage 2 of the UTA run, its data the same kinds of conversation with the scene in words (no image)."""
        argv = self.llava_argv("uta", 2)
        argv[argv.index("--output_dir") + 1] = str(self.paths.words)
        argv[argv.index("--data_path") + 1] = str(self.paths.data / "llava" / "text_instruct.json")
        return argv

    def words_grounding_argv(self) -> list[str]:
        p = self.paths
        return ["grounding", "--scene-in-words", "--model-path", str(p.words), "--question-file",
                str(p.grounding_questions / "questions.jsonl"), "--answers-file", str(p.grounding_answers("words")),
                "--output", str(p.grounding("words")), "--model-id", "llava-words", "--batch-size", "32"]

    def answer_argv(self, run: str) -> list[str]:
        """LLaVA-Bench answers (appended to the answers file: an interrupted stage resumes)."""
        b = self.paths.bench
        return ["answer", "--model-path", str(self.paths.llava(run, 2)), "--question-file",
                str(b / "questions.jsonl"), "--image-folder", str(b / "images"), "--answers-file",
                str(self.paths.answers(run)), "--model-id", f"llava-{run}",
                "--max-new-tokens", str(self.profile.bench_max_new_tokens), "--batch-size", "8"]

    def review_argv(self, run: str) -> list[str]:
        """The offline ShapesWorld judge's reviews of the answers."""
        b = self.paths.bench
        return ["review", "--question", str(b / "questions.jsonl"), "--context", str(b / "context.jsonl"),
                "--answer-list", str(b / "answers_gpt4.jsonl"), str(self.paths.answers(run)),
                "--output", str(self.paths.reviews(run)), "--judge", "shapes",
                "--ground-truth", str(b / "ground_truth.jsonl")]

    def grounding_argv(self, tower: str, run: str) -> list[str]:
        g = self.paths.grounding_questions
        images = self.image_folder(tower) / g.relative_to(self.paths.data) / "images"
        return ["grounding", "--model-path", str(self.paths.llava(run, 2)), "--question-file",
                str(g / "questions.jsonl"), "--image-folder", str(images), "--answers-file",
                str(self.paths.grounding_answers(run)), "--output", str(self.paths.grounding(run)),
                "--model-id", f"llava-{run}", "--max-new-tokens", str(self.profile.bench_max_new_tokens),
                "--batch-size", "8"]
