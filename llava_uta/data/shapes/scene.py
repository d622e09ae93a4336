"""ShapesWorld scenes: sampling scene graphs and rendering them with Pillow.

A scene is 1-4 solid objects in distinct cells of a 3x3 grid (so they never overlap) on a dark,
noisy background. The scene graph (a plain dict) is the ground truth for every caption, question
and answer made from the image.
"""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
    "diamond": "diamonds",
}
COLORS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 245),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 220),
    "pink": (250, 120, 190),
    "white": (245, 245, 245),
    "cyan": (40, 220, 230),
}
SIZES = ("large", "small")
RADIUS = {"large": 0.16, "small": 0.11}  # fraction of the image side; a cell is 1/3 of it
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges, exact colours inside objects


def position_name(row: int, col: int) -> str:
    """Name of a 3x3 grid cell: 'top left', 'top', 'center', 'right', ..."""
    if row == 1 and col == 1:
        return "center"
    if row == 1:
        return COLS[col]
    if col == 1:
        return ROWS[row]
    return f"{ROWS[row]} {COLS[col]}"


def sample_object(
    rng: random.Random, cell: int, image_size: int, color: str | None = None, shape: str | None = None
) -> dict:
    """One object in grid cell `cell` (0..8, row-major), with a small jitter that keeps it in its cell."""
    row, col = divmod(cell, 3)
    size = rng.choice(SIZES)
    radius = RADIUS[size] * image_size
    side = image_size / 3
    jitter = max(0.0, side / 2 - radius - 0.02 * image_size)
    cx = (col + 0.5) * side + rng.uniform(-jitter, jitter)
    cy = (row + 0.5) * side + rng.uniform(-jitter, jitter)
    return {
        "shape": shape or rng.choice(SHAPES),
        "color": color or rng.choice(list(COLORS)),
        "size": size,
        "row": row,
        "col": col,
        "position": position_name(row, col),
        "center": [round(cx, 2), round(cy, 2)],
        "radius": round(radius, 2),
        "bbox": [round(cx - radius, 2), round(cy - radius, 2), round(cx + radius, 2), round(cy + radius, 2)],
    }


def sample_scene(
    rng: random.Random,
    image_size: int,
    num_objects: int | None = None,
    same_color_prob: float = 0.3,
    color: str | None = None,
    shape: str | None = None,
) -> dict:
    """A scene graph with 1-4 objects (weighted towards few, so shape is often what tells scenes apart).

    Several objects share one colour with probability `same_color_prob`; `color` / `shape` fix them for all.
    """
    n = num_objects or rng.choices((1, 2, 3, 4), weights=(0.35, 0.25, 0.2, 0.2))[0]
    cells = sorted(rng.sample(range(9), n))
    if color is None and n > 1 and rng.random() < same_color_prob:
        color = rng.choice(list(COLORS))
    objects = [sample_object(rng, c, image_size, color=color, shape=shape) for c in cells]
    return {
        "width": image_size,
        "height": image_size,
        "background": [rng.randint(0, 70) for _ in range(3)],
        "noise_seed": rng.getrandbits(32),
        "objects": objects,
    }


def shape_variants(scene: dict, rng: random.Random, count: int) -> list[dict]:
    """`count` scenes with the layout, colours and sizes of `scene` but different shapes (hard negatives).

    The first is `scene` itself; each variant re-draws every shape (and the background), and no two
    variants are the same scene, so their captions differ in shape words only.
    """
    variants, keys = [scene], {scene_key(scene)}
    while len(variants) < count:
        variant = {**scene, "background": [rng.randint(0, 70) for _ in range(3)], "noise_seed": rng.getrandbits(32),
                   "objects": [{**o, "shape": rng.choice(SHAPES)} for o in scene["objects"]]}
        if scene_key(variant) not in keys:
            keys.add(scene_key(variant))
            variants.append(variant)
    return variants


def scene_key(scene: dict) -> tuple:
    """What makes two scenes 'the same scene': the objects and their cells, not jitter or background."""
    return tuple(sorted((o["row"], o["col"], o["shape"], o["color"], o["size"]) for o in scene["objects"]))


def largest_object(scene: dict) -> dict:
    """The largest object; among equals, the first in reading order."""
    return min(scene["objects"], key=lambda o: (-o["radius"], o["row"], o["col"]))


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        rad = r if i % 2 == 0 else 0.45 * r
        angle = -math.pi / 2 + i * math.pi / 5
        points.append((cx + rad * math.cos(angle), cy + rad * math.sin(angle)))
    return points


def _cross(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    w = 0.35 * r
    return [
        (cx - w, cy - r),
        (cx + w, cy - r),
        (cx + w, cy - w),
        (cx + r, cy - w),
        (cx + r, cy + w),
        (cx + w, cy + w),
        (cx + w, cy + r),
        (cx - w, cy + r),
        (cx - w, cy + w),
        (cx - r, cy + w),
        (cx - r, cy - w),
        (cx - w, cy - w),
    ]


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "triangle":  # equilateral, pointing up, centroid at the centre
        return [(cx + r * math.cos(a), cy - r * math.sin(a)) for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)]
    if shape == "star":
        return _star(cx, cy, r)
    if shape == "cross":
        return _cross(cx, cy, r)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(scene: dict) -> Image.Image:
    """Draw a scene graph: noisy background at full resolution, objects drawn at 4x then box-filtered."""
    w, h = scene["width"], scene["height"]
    noise = np.random.default_rng(scene["noise_seed"]).normal(0.0, 6.0, size=(h, w, 3))
    background = np.clip(np.asarray(scene["background"], dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    s = SUPERSAMPLE
    canvas = Image.fromarray(background).resize((w * s, h * s), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for o in scene["objects"]:
        cx, cy, r = o["center"][0] * s, o["center"][1] * s, o["radius"] * s
        color = COLORS[o["color"]]
        if o["shape"] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
        else:
            draw.polygon(_polygon(o["shape"], cx, cy, r), fill=color)
    return canvas.reduce(s)
