"""ShapesWorld scenes: sampling scene graphs and rendering them with Pillow.

A scene is 1-4 solid objects in distinct cells of a square grid (2x2 or 3x3; so they never overlap) on a
dark, noisy background. The scene graph (a plain dict) is the ground truth for every caption, question
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
RADIUS = {"large": 0.48, "small": 0.33}  # fraction of a grid cell's side (a large object nearly fills its cell)
GRIDS = (2, 3)  # cells per side
ROWS = {2: ("top", "bottom"), 3: ("top", "middle", "bottom")}
COLS = {2: ("left", "right"), 3: ("left", "center", "right")}
SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges, exact colours inside objects
# The symbolic rendering (the ladder's diagnostic input, no pixels of the objects): each grid cell shows its object's
# facts as a CODE_SIDE x CODE_SIDE pattern of white (fact true) and black squares, facts in this order, row-major
FACTS = (*COLORS, *SHAPES, *SIZES)
CODE_SIDE = 4


def position_name(row: int, col: int, grid: int = 3) -> str:
    """Name of a grid cell: 'top left', 'top', 'center', 'right', ... (2x2: the four corners only)."""
    rows, cols = ROWS[grid], COLS[grid]
    if rows[row] == "middle" and cols[col] == "center":
        return "center"
    if rows[row] == "middle":
        return cols[col]
    if cols[col] == "center":
        return rows[row]
    return f"{rows[row]} {cols[col]}"


def sample_object(
    rng: random.Random, cell: int, image_size: int, color: str | None = None, shape: str | None = None,
    grid: int = 3,
) -> dict:
    """One object in grid cell `cell` (row-major), with a small jitter that keeps it in its cell."""
    row, col = divmod(cell, grid)
    size = rng.choice(SIZES)
    side = image_size / grid
    radius = RADIUS[size] * side
    jitter = max(0.0, side / 2 - radius - 0.02 * image_size)
    cx = (col + 0.5) * side + rng.uniform(-jitter, jitter)
    cy = (row + 0.5) * side + rng.uniform(-jitter, jitter)
    return {
        "shape": shape or rng.choice(SHAPES),
        "color": color or rng.choice(list(COLORS)),
        "size": size,
        "row": row,
        "col": col,
        "position": position_name(row, col, grid),
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
    grid: int = 3,
) -> dict:
    """A scene graph with 1-4 objects on a `grid` x `grid` grid (weighted towards few, so shape is often what
    tells scenes apart).

    Several objects share one colour with probability `same_color_prob`; `color` / `shape` fix them for all.
    """
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid}")
    n = num_objects or rng.choices((1, 2, 3, 4), weights=(0.35, 0.25, 0.2, 0.2))[0]
    cells = sorted(rng.sample(range(grid * grid), n))
    if color is None and n > 1 and rng.random() < same_color_prob:
        color = rng.choice(list(COLORS))
    objects = [sample_object(rng, c, image_size, color=color, shape=shape, grid=grid) for c in cells]
    return {
        "width": image_size,
        "height": image_size,
        "grid": grid,
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


def render_symbolic(scene: dict) -> Image.Image:
    """The scene graph as a code image: cell (row, col) holds its object's one-hot colour, shape and size (FACTS) as
    white squares of a CODE_SIDE x CODE_SIDE pattern; an empty cell is black. Read back by the symbolic tower."""
    w, grid = scene["width"], scene["grid"]
    squares = grid * CODE_SIDE
    edges = [round(k * w / squares) for k in range(squares + 1)]
    code = np.zeros((w, w, 3), dtype=np.uint8)
    for o in scene["objects"]:
        for fact in (o["color"], o["shape"], o["size"]):
            i, j = divmod(FACTS.index(fact), CODE_SIDE)
            y, x = o["row"] * CODE_SIDE + i, o["col"] * CODE_SIDE + j
            code[edges[y]:edges[y + 1], edges[x]:edges[x + 1]] = 255
    return Image.fromarray(code)
