"""Example images for the web demo: ShapesWorld bench images for a ShapesWorld model, real photos otherwise.

    shapes_dir, why = shapes_source(Path("runs/shapes/llava/uta/stage2"), shapes_dir=None)
    rows = example_rows(Path("/tmp/examples"), shapes_dir)      # [[image, question]]

The rule: ShapesWorld examples (LLaVA-Bench images with their questions) come from `--shapes-dir` when it is
given, else from the ShapesWorld folder the model was trained on, as recorded by llava-uta-train in the model's
config.json (`train_image_folder`, else the folders above `train_data_path`); a folder counts as ShapesWorld when
it holds llava-uta-shapes' `manifest.json` and bench images. Any other model gets photos shipped inside
scikit-image and scikit-learn (no download).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from llava_uta.data.shapes.writer import BENCH_DIR

PHOTO_QUESTIONS = {
    "astronaut": "Who is in the photo and what are they wearing?",
    "chelsea": "What animal is this?",
    "coffee": "What is on the table?",
    "china": "Describe this building.",
    "flower": "What color is the flower?",
}


def package_photos() -> dict[str, np.ndarray]:
    """RGB arrays of the photos that scikit-image and scikit-learn install (no download needed)."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = {name: getattr(data, name)() for name in ("astronaut", "chelsea", "coffee")}
    samples = load_sample_images()
    photos |= {Path(f).stem: image for f, image in zip(samples.filenames, samples.images, strict=True)}
    return photos


def is_shapes_world(folder: Path) -> bool:
    """Whether `folder` was written by llava-uta-shapes and holds its LLaVA-Bench images."""
    return (folder / "manifest.json").is_file() and any((folder / BENCH_DIR / "images").glob("*.png"))


def trained_shapes_dir(model_path: str | os.PathLike) -> Path | None:
    """The ShapesWorld folder a llava-uta-train output records as its training data in config.json, if any."""
    config_file = Path(model_path, "config.json")
    if not config_file.is_file():  # not a training output: the loader reports it
        return None
    config = json.loads(config_file.read_text())
    data_path = config.get("train_data_path")
    folders = [config.get("train_image_folder"), *(Path(data_path).parents[:2] if data_path else [])]
    return next((Path(f) for f in folders if f and is_shapes_world(Path(f))), None)


def shapes_source(model_path: str | os.PathLike | None, shapes_dir: Path | None) -> tuple[Path | None, str]:
    """The ShapesWorld folder to take examples from (None: photos), and why, as a line for the user."""
    if shapes_dir is not None:
        return shapes_dir, f"ShapesWorld examples from --shapes-dir {shapes_dir}"
    trained = trained_shapes_dir(model_path) if model_path else None
    if trained is not None:
        return trained, f"ShapesWorld examples from {trained}, the model's training data"
    return None, "photo examples (the model records no ShapesWorld training data; --shapes-dir picks ShapesWorld)"


def shapes_rows(shapes_dir: Path, n: int = 4) -> list[list[str]]:
    """[image path, question]: the first `n` LLaVA-Bench images of a ShapesWorld folder, with their first questions."""
    bench = shapes_dir / BENCH_DIR
    if not is_shapes_world(shapes_dir):
        raise FileNotFoundError(f"{shapes_dir} has no manifest.json and {BENCH_DIR}/images/*.png: not a ShapesWorld "
                                "folder (llava-uta-shapes writes one)")
    questions = {}
    for line in (bench / "questions.jsonl").read_text().splitlines():
        row = json.loads(line)
        questions.setdefault(row["image"], row["text"])
    return [[str(bench / "images" / image), text] for image, text in sorted(questions.items())[:n]]


def example_rows(cache_dir: Path, shapes_dir: Path | None = None) -> list[list[str]]:
    """[image path, question] rows: ShapesWorld bench images if `shapes_dir` is given, else the package photos."""
    if shapes_dir is not None:
        return shapes_rows(shapes_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, pixels in package_photos().items():
        path = cache_dir / f"{name}.jpg"
        Image.fromarray(pixels).save(path, quality=92)
        rows.append([str(path), PHOTO_QUESTIONS[name]])
    return rows
