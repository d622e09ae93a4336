"""Evaluation data for zero-shot classification and retrieval: CLIP preprocessing, class folders, captions.

Classification: an ImageNet-style folder, one subfolder per class; labels follow the sorted subfolder names.
Retrieval captions, in either format (relative image paths resolve against the captions file's folder):
  JSON  Karpathy's {"images": [{"filepath"?, "filename", "sentences": [{"raw": ...}], "split"?}, ...]}
        or a list [{"image": path, "caption": str | [str, ...]}, ...]
  CSV   columns `filepath,title`; several rows for one image give it several captions
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from pathlib import Path

from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transform import image_transform
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder


def clip_eval_transform(
    image_size: int, mean: tuple[float, ...] = OPENAI_DATASET_MEAN, std: tuple[float, ...] = OPENAI_DATASET_STD
) -> Callable:
    """Bicubic short-side resize, centre crop, RGB, ToTensor, Normalize (OpenAI CLIP mean/std by default)."""
    return image_transform(image_size, is_train=False, mean=mean, std=std, resize_mode="shortest")


def class_folder(root: str | os.PathLike, transform: Callable) -> ImageFolder:
    """Images with integer labels, classes in sorted subfolder order (a class may have no images)."""
    return ImageFolder(str(root), transform=transform, allow_empty=True)


def load_json_list(path: str | os.PathLike, what: str) -> list[str]:
    """A JSON file holding a list of strings (class names, or templates containing "{}")."""
    items = json.loads(Path(path).read_text())
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise ValueError(f"{path}: expected a JSON list of {what} strings")
    return items


class CaptionedImages(Dataset):
    """Images for retrieval; `captions` is the flat caption list and `caption_image[j]` the image of caption j."""

    def __init__(self, path: str | os.PathLike, transform: Callable, split: str | None = None):
        path = Path(path)
        pairs = read_csv_captions(path) if path.suffix == ".csv" else read_json_captions(path, split)
        if not pairs:
            raise ValueError(f"{path}: no captioned images found" + (f" in split {split!r}" if split else ""))
        self.images = [str(path.parent / image) for image, _ in pairs]
        self.captions = [c for _, caps in pairs for c in caps]
        self.caption_image = [i for i, (_, caps) in enumerate(pairs) for _ in caps]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(Image.open(self.images[index]).convert("RGB"))


def read_csv_captions(path: Path) -> list[tuple[str, list[str]]]:
    grouped: dict[str, list[str]] = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if not {"filepath", "title"} <= set(reader.fieldnames or ()):
            raise ValueError(f"{path}: a captions CSV needs `filepath` and `title` columns, got {reader.fieldnames}")
        for row in reader:
            grouped.setdefault(row["filepath"], []).append(row["title"])
    return list(grouped.items())


def read_json_captions(path: Path, split: str | None) -> list[tuple[str, list[str]]]:
    data = json.loads(path.read_text())
    if isinstance(data, dict) and "images" in data:  # Karpathy's dataset_{coco,flickr30k}.json
        return [
            (os.path.join(im.get("filepath", ""), im["filename"]), [s["raw"] for s in im["sentences"]])
            for im in data["images"]
            if split is None or im.get("split") == split
        ]
    if isinstance(data, list) and all(isinstance(d, dict) and {"image", "caption"} <= d.keys() for d in data):
        return [(d["image"], [d["caption"]] if isinstance(d["caption"], str) else list(d["caption"])) for d in data]
    raise ValueError(f"{path}: expected Karpathy JSON ({{'images': [...]}}) or a list of {{'image', 'caption'}}")
