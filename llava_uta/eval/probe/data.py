"""Probe data: image lists and per-patch labels read from ShapesWorld scene graphs.

Patch labels (`patch_labels`). ShapesWorld objects are solid shapes, one per grid cell (2x2 or 3x3), drawn from the
scene graph (scene.py: a circle of radius r, or the polygon `_polygon` traces, around `center`). A tower with a g x g
patch grid sees the (square) image resized to its input, so patch (row, col) covers the image square of side W/g at
(col*W/g, row*W/g). Two ways to pick labelled patches:
  covered  every patch whose centre lies inside an object gets that object's attributes; a patch whose centre is on
           the background is either left out or, with include_background, labelled "background";
  centers  only the patch holding each object's centre (the hand probe of the issue: one token per object).
Objects never overlap, so a patch centre lies inside at most one object.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.path import Path as PolygonPath
from torch import Tensor
from torch.utils.data import Dataset

from llava_uta.data.image_folder import ImageDataError, load_rgb
from llava_uta.data.shapes.scene import COLORS, SHAPES, SIZES, _polygon

ATTRIBUTES: dict[str, tuple[str, ...]] = {"color": tuple(COLORS), "shape": SHAPES, "size": SIZES}
BACKGROUND = "background"
PATCH_MODES = ("covered", "centers")


class ProbeDataError(ImageDataError):
    """Probe data that cannot be used: a bad scene file, an image in both splits, a grid with no labelled patch."""


class ImageList(Dataset):
    """Images from a list of paths, transformed; items are (image, index)."""

    def __init__(self, paths: Sequence[str | os.PathLike], transform: Callable):
        self.paths = [os.fspath(p) for p in paths]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.transform(load_rgb(self.paths[index])), index


# ---- ShapesWorld scenes


def read_scenes(root: str | os.PathLike) -> list[dict]:
    """The scene graphs of a ShapesWorld root (ROOT/scenes.jsonl, written by llava-uta-shapes)."""
    path = Path(root) / "scenes.jsonl"
    if not path.is_file():
        raise ProbeDataError(f"{path}: not found; give --data a ShapesWorld root written by llava-uta-shapes")
    scenes = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                scene = json.loads(line)
            except json.JSONDecodeError as e:
                raise ProbeDataError(f"{path}:{n}: not JSON ({e})") from e
            missing = {"image", "width", "height", "objects"} - scene.keys()
            if missing:
                raise ProbeDataError(f"{path}:{n}: scene without {sorted(missing)}")
            scenes.append(scene)
    return scenes


def scenes_under(scenes: list[dict], root: str | os.PathLike, folder: str) -> list[dict]:
    """The scenes whose image lies under `folder` (relative to the ShapesWorld root), in file order."""
    prefix = Path(folder).as_posix().strip("/") + "/"
    if not (Path(root) / folder).is_dir():
        raise ProbeDataError(f"{Path(root) / folder}: no such folder in the ShapesWorld root")
    selected = [s for s in scenes if s["image"].startswith(prefix)]
    if not selected:
        raise ProbeDataError(f"{Path(root) / folder}: no image under it is listed in {Path(root) / 'scenes.jsonl'}")
    return selected


def object_contains(obj: dict, x: float, y: float) -> bool:
    """Whether point (x, y), in image pixels, lies inside the object as scene.render draws it."""
    cx, cy = obj["center"]
    r = obj["radius"]
    if obj["shape"] == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    return bool(PolygonPath(_polygon(obj["shape"], cx, cy, r)).contains_point((x, y)))


def patch_labels(scene: dict, grid: int, mode: str = "covered") -> list[tuple[int, dict | None]]:
    """(patch index, object or None for background), row-major over a grid x grid patch grid; see the module doc."""
    if mode not in PATCH_MODES:
        raise ValueError(f"unknown patch mode {mode!r}; expected one of {PATCH_MODES}")
    if scene["width"] != scene["height"]:
        raise ProbeDataError(f"{scene['image']}: {scene['width']}x{scene['height']} is not square (ShapesWorld "
                             f"images are)")
    step = scene["width"] / grid
    if mode == "covered":
        labels = []
        for row in range(grid):
            for col in range(grid):
                x, y = (col + 0.5) * step, (row + 0.5) * step
                obj = next((o for o in scene["objects"] if object_contains(o, x, y)), None)
                labels.append((row * grid + col, obj))
        return labels
    cells: dict[int, list[dict]] = {}
    for obj in scene["objects"]:
        cx, cy = obj["center"]
        index = min(int(cy / step), grid - 1) * grid + min(int(cx / step), grid - 1)
        cells.setdefault(index, []).append(obj)
    return [(i, objs[0]) for i, objs in sorted(cells.items()) if len(objs) == 1]  # two centres in one patch: dropped


@dataclass
class PatchLabels:
    """Labelled patches of a list of images: which patches of image k, and each patch's class per attribute."""

    patches: list[list[int]]  # per image, the labelled patch indices (row-major)
    labels: dict[str, list[int]] = field(default_factory=dict)  # per attribute, one class index per labelled patch
    classes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # per attribute, the class names

    @property
    def count(self) -> int:
        return sum(len(p) for p in self.patches)


def label_patches(scenes: list[dict], grid: int, mode: str = "covered", include_background: bool = False,
                  attributes: Sequence[str] = tuple(ATTRIBUTES)) -> PatchLabels:
    """Labels of every selected patch of `scenes` for each attribute; background is a class or left out."""
    unknown = [a for a in attributes if a not in ATTRIBUTES]
    if unknown:
        raise ValueError(f"unknown attribute(s) {unknown}; expected some of {tuple(ATTRIBUTES)}")
    classes = {a: ATTRIBUTES[a] + ((BACKGROUND,) if include_background else ()) for a in attributes}
    index = {a: {c: i for i, c in enumerate(names)} for a, names in classes.items()}
    out = PatchLabels(patches=[], labels={a: [] for a in attributes}, classes=classes)
    for scene in scenes:
        kept = []
        for patch, obj in patch_labels(scene, grid, mode):
            if obj is None and not include_background:
                continue
            kept.append(patch)
            for a in attributes:
                value = BACKGROUND if obj is None else obj[a]
                if value not in index[a]:
                    raise ProbeDataError(f"{scene['image']}: object {a} {value!r} is not one of {classes[a]}")
                out.labels[a].append(index[a][value])
        out.patches.append(kept)
    return out
