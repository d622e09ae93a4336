"""Example images for the web demo: real photos shipped inside scikit-image and scikit-learn, plus ShapesWorld.

    rows = example_rows(Path("/tmp/examples"), shapes_dir=Path("playground/data/shapes"))   # [[image, question]]
"""

from __future__ import annotations

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
SHAPES_QUESTION = "What shapes are in the image, and what colors are they?"


def package_photos() -> dict[str, np.ndarray]:
    """RGB arrays of the photos that scikit-image and scikit-learn install (no download needed)."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = {name: getattr(data, name)() for name in ("astronaut", "chelsea", "coffee")}
    samples = load_sample_images()
    photos |= {Path(f).stem: image for f, image in zip(samples.filenames, samples.images, strict=True)}
    return photos


def shapes_images(shapes_dir: Path, n: int = 3) -> list[Path]:
    """The first `n` LLaVA-Bench images of a ShapesWorld folder."""
    images = sorted((shapes_dir / BENCH_DIR / "images").glob("*.png"))[:n]
    if not images:
        raise FileNotFoundError(f"{shapes_dir} has no {BENCH_DIR}/images/*.png: not a ShapesWorld folder")
    return images


def example_rows(cache_dir: Path, shapes_dir: Path | None = None) -> list[list[str]]:
    """[image path, question] rows: the package photos (written to `cache_dir`) and ShapesWorld images."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, pixels in package_photos().items():
        path = cache_dir / f"{name}.jpg"
        Image.fromarray(pixels).save(path, quality=92)
        rows.append([str(path), PHOTO_QUESTIONS[name]])
    if shapes_dir is not None:
        rows += [[str(path), SHAPES_QUESTION] for path in shapes_images(shapes_dir)]
    return rows
