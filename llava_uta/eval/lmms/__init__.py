"""lmms-eval integration: the `llava_uta` model of `python -m lmms_eval` and local ShapesWorld tasks.

    pip install -e ".[lmms]"
    python -m lmms_eval --model llava_uta --model_args pretrained=checkpoints/llava-uta \\
        --tasks mme,pope --batch_size 8 --output_path runs/lmms
    LLAVA_UTA_SHAPES_DIR=playground/data/shapes python -m lmms_eval --model llava_uta \\
        --model_args pretrained=runs/shapes/llava/uta/stage2 --include_path llava_uta/eval/lmms/tasks \\
        --tasks shapesworld --output_path runs/lmms

lmms-eval (>= 0.7) finds out-of-tree models through the `lmms_eval.models` entry-point group; pyproject.toml
points it at `model_manifest`, which names the adapter class (`adapter.LlavaUtaLmms`). The ShapesWorld tasks live
in `TASKS_DIR` (pass it as `--include_path`). Only this package imports lmms_eval: the rest of llava_uta neither
needs nor imports it, and importing this `__init__` does not import lmms_eval either.
"""

from __future__ import annotations

from pathlib import Path

MODEL_ID = "llava_uta"
ADAPTER_CLASS = "llava_uta.eval.lmms.adapter.LlavaUtaLmms"
TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def model_manifest():
    """The lmms-eval model manifest of `--model llava_uta` (the payload of our `lmms_eval.models` entry point)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=ADAPTER_CLASS)
