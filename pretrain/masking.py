"""Which patches the UTA student keeps: random, block-wise, reversed block-wise (default) and either-or.

Every strategy keeps exactly K = N - round(mask_ratio * N) of the N patches of a grid, in every sample,
so a batch of kept indices is a rectangular (B, K) tensor.

- `random`: K positions uniformly at random.
- `block`: BEiT block-wise masking (rectangles of log-uniform aspect, with an exact-count top-up as in
  BEiT-v2) masks round(r*N) patches; the student keeps the rest. Its kept set is edge-heavy.
- `reversed_block`: the same block generator picks the *kept* set (K patches), so the aligned tokens
  are spatially balanced: the paper's default reading.
- `block_or_complement`: per sample, `block` or `reversed_block` with probability 1/2 each.
- `reversed_block_rolled`: `reversed_block`, then rolled by a uniform random (row, column) shift with wrap-around.
  The kept set stays made of (possibly wrapped) rectangles, but every position is kept equally often: blocks
  placed inside the grid keep its centre more often than its border, and this variant removes only that bias.

Several keep sets per view (`--masks_per_view M`, drawn in pretrain/data.py) are independent draws, or with
`--mask_pairing complement` (M = 2, ratio 0.5) a draw and the patches it leaves out (`complement_keep`).

The smallest rectangle (`min_block` patches) defaults to BEiT's `min_num_patches=16`, set for a 14x14 grid and
kept by EVA-02 at 16x16. A smaller grid keeps the same share of the patches, round(16 * N / 196) and at least 1
(5 on the 8x8 grid of the embedded default, 1 on 4x4); larger grids keep 16.

    python -m pretrain.masking --grid 16 --mask-ratio 0.5 --kind reversed_block --out masks.png
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch

from llava_uta.argparsing import ArgumentParser

MASKING_KINDS = ("random", "block", "reversed_block", "block_or_complement", "reversed_block_rolled")
MASK_PAIRINGS = ("independent", "complement")  # how the M keep sets of one view relate (--mask_pairing)
BEIT_MIN_BLOCK, BEIT_NUM_PATCHES = 16, 14 * 14  # BEiT's min_num_patches on its 14x14 grid


def default_min_block(num_patches: int) -> int:
    """BEiT's minimum block (16 patches at 14x14, EVA-02's at 16x16), scaled to the same share of a smaller grid."""
    return max(1, min(BEIT_MIN_BLOCK, round(BEIT_MIN_BLOCK * num_patches / BEIT_NUM_PATCHES)))


def block_mask(height: int, width: int, count: int, rng: random.Random, min_block: int = BEIT_MIN_BLOCK,
               max_block: int | None = None, min_aspect: float = 0.3) -> np.ndarray:
    """A (height, width) bool mask with exactly `count` cells set, made of rectangles (BEiT-style).

    Rectangles of area U(min_block, remaining budget) and aspect ratio log-uniform in
    [min_aspect, 1/min_aspect] are placed at random (never spanning the whole width or height) until
    the budget is met or no rectangle fits; the remainder is topped up with random free cells.
    """
    if not 0 <= count <= height * width:
        raise ValueError(f"count must be in [0, {height * width}], got {count}")
    mask = np.zeros((height, width), dtype=bool)
    max_block = max_block or count
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    filled = 0
    while filled < count:
        budget = min(count - filled, max_block)
        added = 0
        for _ in range(10):
            area = rng.uniform(min_block, budget)
            aspect = math.exp(rng.uniform(*log_aspect))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if not (0 < h < height and 0 < w < width):
                continue
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            new = h * w - int(mask[top:top + h, left:left + w].sum())
            if 0 < new <= budget:
                mask[top:top + h, left:left + w] = True
                added = new
                break
        if added == 0:
            break
        filled += added
    if filled < count:  # exact count: top up with random free cells
        free = np.flatnonzero(~mask.ravel())
        mask.ravel()[rng.sample(list(free), count - filled)] = True
    return mask


class KeepIndexGenerator:
    """Draws the sorted indices (raster order) of the K patches the student keeps in one image."""

    def __init__(self, grid: int | tuple[int, int], mask_ratio: float, kind: str = "reversed_block",
                 min_block: int | None = None, min_aspect: float = 0.3, seed: int | None = None):
        if kind not in MASKING_KINDS:
            raise ValueError(f"unknown masking kind {kind!r}; expected one of {MASKING_KINDS}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.height, self.width = (grid, grid) if isinstance(grid, int) else grid
        self.num_patches = self.height * self.width
        self.num_masked = round(mask_ratio * self.num_patches)
        self.num_keep = self.num_patches - self.num_masked
        if min_block is not None and min_block < 1:
            raise ValueError(f"min_block must be at least 1 patch, got {min_block}")
        self.kind, self.min_aspect = kind, min_aspect
        self.min_block = default_min_block(self.num_patches) if min_block is None else min_block
        self.rng = random.Random(seed)

    def seed(self, seed: int) -> None:
        """Reseed (e.g. once per DataLoader worker) so that draws are reproducible."""
        self.rng.seed(seed)

    def _blocks(self, count: int) -> np.ndarray:
        return block_mask(self.height, self.width, count, self.rng, self.min_block, None, self.min_aspect)

    def __call__(self) -> torch.Tensor:
        kind = self.kind
        if kind == "block_or_complement":
            kind = "block" if self.rng.random() < 0.5 else "reversed_block"
        if kind == "random":
            keep = sorted(self.rng.sample(range(self.num_patches), self.num_keep))
            return torch.tensor(keep, dtype=torch.long)
        if kind == "block":
            kept = ~self._blocks(self.num_masked)
        else:
            kept = self._blocks(self.num_keep)
        if kind == "reversed_block_rolled":
            kept = np.roll(kept, (self.rng.randrange(self.height), self.rng.randrange(self.width)), axis=(0, 1))
        return torch.from_numpy(np.flatnonzero(kept.ravel())).long()

    def __repr__(self) -> str:
        return (f"KeepIndexGenerator(grid={self.height}x{self.width}, kind={self.kind}, "
                f"keep={self.num_keep}/{self.num_patches}, min_block={self.min_block})")


def complement_keep(keep: torch.Tensor, num_patches: int) -> torch.Tensor:
    """The sorted indices of the patches a (K,) keep set leaves out: with it, every patch exactly once."""
    kept = torch.zeros(num_patches, dtype=torch.bool)
    kept[keep] = True
    return (~kept).nonzero()[:, 0]


def check_mask_pairing(pairing: str, masks_per_view: int, num_patches: int | None = None,
                       num_keep: int | None = None, mask_ratio: float | None = None) -> None:
    """Refuse M keep sets per view that cannot be drawn as asked, with the reason.

    `complement` pairs a keep set with the patches it leaves out, so the pair covers every patch exactly once and
    both passes see as many tokens: only 2 sets per view at mask ratio 0.5 on an even number of patches.
    """
    if masks_per_view < 1:
        raise ValueError(f"--masks_per_view must be at least 1, got {masks_per_view}")
    if pairing not in MASK_PAIRINGS:
        raise ValueError(f"--mask_pairing must be one of {MASK_PAIRINGS}, got {pairing!r}")
    if pairing != "complement":
        return
    if masks_per_view != 2:
        raise ValueError(f"--mask_pairing complement pairs a keep set with its complement: it needs "
                         f"--masks_per_view 2, got {masks_per_view}")
    if mask_ratio is not None and mask_ratio != 0.5:
        raise ValueError(f"--mask_pairing complement needs --mask_ratio 0.5 (the complement of a keep set must "
                         f"keep as many patches), got {mask_ratio}")
    if num_patches is not None and num_keep is not None and 2 * num_keep != num_patches:
        raise ValueError(f"--mask_pairing complement needs an even number of patches, kept half and half; the "
                         f"grid has {num_patches} and keeps {num_keep}")


def keep_frequency(generator: KeepIndexGenerator, draws: int) -> np.ndarray:
    """How often each grid position is kept, over `draws` samples: an (H, W) array in [0, 1]."""
    counts = np.zeros(generator.num_patches)
    for _ in range(draws):
        counts[generator().numpy()] += 1
    return (counts / draws).reshape(generator.height, generator.width)


def render_masks(generator: KeepIndexGenerator, out: Path, samples: int = 8, draws: int = 2000) -> np.ndarray:
    """Save a PNG: `samples` example keep masks and the per-position keep-frequency heatmap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    freq = keep_frequency(generator, draws)
    fig, axes = plt.subplots(1, samples + 1, figsize=(1.6 * (samples + 1) + 0.8, 2.0))
    for ax in axes[:samples]:
        kept = np.zeros(generator.num_patches)
        kept[generator().numpy()] = 1
        ax.imshow(kept.reshape(generator.height, generator.width), cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
    image = axes[-1].imshow(freq, cmap="viridis", vmin=0, vmax=1)
    axes[-1].set_title(f"keep freq. ({draws})", fontsize=8)
    axes[-1].set_xticks([])
    axes[-1].set_yticks([])
    fig.colorbar(image, ax=axes[-1], fraction=0.046)
    fig.suptitle(f"{generator.kind}: keep {generator.num_keep} of {generator.num_patches} (white = kept)",
                 fontsize=9)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return freq


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="llava-uta-masks", description="Render sample keep masks and the keep heatmap.")
    parser.add_argument("--grid", type=int, default=16, help="patch grid side (224 px / patch 14 = 16)")
    parser.add_argument("--mask-ratio", type=float, default=0.5)
    parser.add_argument("--kind", choices=MASKING_KINDS, default="reversed_block")
    parser.add_argument("--min-block", type=int, default=None, help="smallest rectangle; default: BEiT's for the grid")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("masks.png"))
    args = parser.parse_args(argv)
    generator = KeepIndexGenerator(args.grid, args.mask_ratio, args.kind, args.min_block, seed=args.seed)
    freq = render_masks(generator, args.out, args.samples, args.draws)
    corner, center = freq[0, 0], freq[args.grid // 2, args.grid // 2]
    print(f"{generator}: keep frequency corner {corner:.2f}, center {center:.2f}, "
          f"min {freq.min():.2f}, max {freq.max():.2f} -> {args.out}")


if __name__ == "__main__":
    main()
