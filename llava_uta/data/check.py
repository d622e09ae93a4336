"""A LLaVA JSON checked whole before the first training step: each sample's turns and `<image>`, each image's header.

A bad sample found lazily stops a run hours in (or is skipped with --skip_bad_samples, hiding it). This pass reads
every sample once, checks its conversation as training will (`build_conversation` with the run's template), and
opens every image it names far enough to read its header (format and size; no pixels are decoded), so the problems
come at once, counted by kind, with the first sample ids and files of each.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from llava_uta.conversation import get_template
from llava_uta.data.preprocess import build_conversation

SHOWN = 5  # example samples named per kind of problem


@dataclass
class DataReport:
    data_path: str
    samples: int = 0
    images: int = 0  # distinct image files checked
    seconds: float = 0.0
    problems: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # kind -> "sample: detail"

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = (f"{self.data_path}: {self.samples:,} samples, {self.images:,} images checked in {self.seconds:.1f} s"
                + (": no problem" if self.ok else f"; {sum(map(len, self.problems.values())):,} bad samples"))
        lines = [head]
        for kind, found in sorted(self.problems.items(), key=lambda item: -len(item[1])):
            lines.append(f"  {kind}: {len(found):,} (first: {'; '.join(found[:SHOWN])})")
        return "\n".join(lines)


def check_llava_data(data_path: str | os.PathLike, image_folder: str | os.PathLike | None,
                     version: str) -> DataReport:
    """Every sample of a LLaVA JSON list checked for training with the `version` template (see the module doc)."""
    start = time.perf_counter()
    report = DataReport(str(data_path))
    try:
        samples = json.loads(Path(data_path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{data_path}: cannot read it as JSON ({err})") from None
    if not isinstance(samples, list):
        raise ValueError(f"{data_path}: expected a JSON list of LLaVA samples, got {type(samples).__name__}")
    template = get_template(version)
    images: dict[str, str | None] = {}  # image file -> its problem (None: readable)
    for i, sample in enumerate(samples):
        report.samples += 1
        if not isinstance(sample, dict):
            report.problems["not a JSON object"].append(f"#{i}")
            continue
        sample_id = f"{sample.get('id', f'#{i}')!r}"
        image = sample.get("image")
        try:
            build_conversation(sample.get("conversations"), template, has_image=image is not None)
        except ValueError as err:
            report.problems["malformed conversation"].append(f"{sample_id}: {err}")
        if image is None:
            continue
        if image_folder is None:
            report.problems["image but no --image_folder"].append(sample_id)
            continue
        if image not in images:
            images[image] = image_problem(Path(image_folder) / image)
        if images[image]:
            report.problems[images[image]].append(f"{sample_id}: {image}")
    report.images = len(images)
    report.seconds = time.perf_counter() - start
    return report


def image_problem(path: Path) -> str | None:
    """'missing image' / 'unreadable image' from the file's header alone, or None."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except FileNotFoundError:
        return "missing image"
    except (UnidentifiedImageError, OSError, ValueError):
        return "unreadable image"
    return None if width > 0 and height > 0 else "unreadable image"
