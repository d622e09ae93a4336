"""Budgets of the quickstart: how much data and how many steps each stage gets, per profile."""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Profile:
    """Every size and step budget of one quickstart run (the student budget is shared by all students)."""

    world: dict[str, int] = field(default_factory=dict)  # ShapesWorldConfig overrides (llava-uta-shapes flags)
    teacher_steps: int = 260
    teacher_batch: int = 128
    student_steps: int = 300
    student_batch: int = 128
    student_warmup: int = 20
    cache_views: int = 1  # fixed views per image whose teacher targets are computed once for every student
    finetune_steps: int = 100  # contrastive fine-tuning of the UTA student (--compare)
    finetune_batch: int = 128
    lm_steps: int = 200
    stage1_steps: int = 100  # the projector alone: its caption loss flattens after ~40 steps
    stage1_batch: int = 32
    stage2_steps: int = 500  # the LLM learns to read the image only after a few hundred steps
    stage2_batch: int = 16
    bench_max_new_tokens: int = 128


PROFILES = {
    "default": Profile(),
    "fast": Profile(
        world={"num_clip": 2048, "num_pretrain": 1024, "num_zeroshot_per_class": 3, "num_stage1": 512,
               "num_stage2": 384, "num_bench_images": 6, "num_grounding_images": 12},
        teacher_steps=30, teacher_batch=64, student_steps=60, student_batch=64, student_warmup=6, cache_views=1,
        finetune_steps=10, finetune_batch=64,
        lm_steps=60, stage1_steps=30, stage1_batch=16, stage2_steps=60, stage2_batch=8,
        bench_max_new_tokens=32,
    ),
}


def get_profile(name: str, **overrides: int) -> Profile:
    """A named profile with some budgets replaced (None values are ignored)."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}")
    return replace(PROFILES[name], **{k: v for k, v in overrides.items() if v is not None})
