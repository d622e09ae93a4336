"""Checked ImageFolder splits: every class folder holds images, and an unreadable image is named when it is read.

Used by the probes and by classification fine-tuning, which both take ImageNet-style ROOT/CLASS/IMAGE folders.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from PIL import Image
from torchvision.datasets import ImageFolder


class ImageDataError(ValueError):
    """Image data that cannot be used: a missing or empty folder, an unreadable image, an unknown class."""


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image as RGB, raising ImageDataError naming the file when it cannot be read."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as e:  # missing, truncated, not an image
        raise ImageDataError(f"{path}: unreadable image ({type(e).__name__}: {e})") from e


def checked_image_folder(root: str | os.PathLike, transform: Callable | None = None,
                         class_to_idx: dict[str, int] | None = None) -> ImageFolder:
    """An ImageFolder whose every class folder holds images; labels follow `class_to_idx` (the train split's) if given.

    Raises ImageDataError naming the folder that is missing, has no class folders or holds no images, or naming
    the classes of `root` that `class_to_idx` does not know. Images are decoded lazily and a file that cannot be
    read raises ImageDataError naming it.
    """
    root = Path(root)
    if not root.is_dir():
        raise ImageDataError(f"{root}: no such image folder")
    try:
        dataset = ImageFolder(str(root), transform=transform, loader=load_rgb, allow_empty=True)
    except FileNotFoundError as e:
        raise ImageDataError(f"{root}: no class folders in it (ImageFolder layout: ROOT/CLASS/IMAGE): {e}") from e
    counts = Counter(dataset.targets)
    empty = [c for c, i in dataset.class_to_idx.items() if counts[i] == 0]
    if empty:
        raise ImageDataError(f"{root}: class folder(s) with no images: " + ", ".join(str(root / c) for c in empty))
    if class_to_idx is not None:
        unknown = sorted(set(dataset.classes) - set(class_to_idx))
        if unknown:
            raise ImageDataError(f"{root}: class folder(s) not in the train split: {', '.join(unknown)}")
        dataset.samples = [(p, class_to_idx[dataset.classes[t]]) for p, t in dataset.samples]
        dataset.imgs = dataset.samples
        dataset.targets = [t for _, t in dataset.samples]
        dataset.classes = sorted(class_to_idx, key=class_to_idx.__getitem__)
        dataset.class_to_idx = dict(class_to_idx)
    return dataset


def limit_per_class(dataset: ImageFolder, per_class: int, seed: int = 0) -> ImageFolder:
    """Keep a seeded random `per_class` images of each class (all of a smaller class), in file order, in place."""
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    by_class: dict[int, list[int]] = {}
    for i, (_, target) in enumerate(dataset.samples):
        by_class.setdefault(target, []).append(i)
    rng = random.Random(seed)
    keep = sorted(i for idx in by_class.values() for i in (rng.sample(idx, per_class) if len(idx) > per_class else idx))
    dataset.samples = [dataset.samples[i] for i in keep]
    dataset.imgs = dataset.samples
    dataset.targets = [t for _, t in dataset.samples]
    return dataset
