"""Keep-index generators: exact counts, determinism, spatial behaviour of each masking kind."""

import random

import numpy as np
import pytest
from PIL import Image

from pretrain.masking import MASKING_KINDS, KeepIndexGenerator, block_mask, default_min_block, keep_frequency, main


@pytest.mark.parametrize("kind", MASKING_KINDS)
@pytest.mark.parametrize("grid,ratio", [(16, 0.5), (16, 0.4), (14, 0.4), (8, 0.5), ((6, 10), 0.3)])
def test_exact_count_sorted_unique_in_range(kind, grid, ratio):
    gen = KeepIndexGenerator(grid, ratio, kind, seed=0)
    n = gen.height * gen.width
    assert gen.num_keep == n - round(ratio * n)
    for _ in range(200):
        keep = gen()
        assert keep.dtype.is_floating_point is False and keep.shape == (gen.num_keep,)
        assert keep.min() >= 0 and keep.max() < n
        assert (keep[1:] > keep[:-1]).all()  # sorted and unique


@pytest.mark.parametrize("count", [0, 1, 5, 77, 128, 200, 256])
def test_block_mask_exact_count(count):
    rng = random.Random(count)
    for _ in range(50):
        assert block_mask(16, 16, count, rng).sum() == count


def test_same_seed_same_draws_and_reseed():
    a, b = KeepIndexGenerator(16, 0.5, seed=3), KeepIndexGenerator(16, 0.5, seed=3)
    draws = [a() for _ in range(20)]
    assert all((x == b()).all() for x in draws)
    a.seed(3)
    assert (a() == draws[0]).all()
    assert any((x != y).any() for x, y in zip(draws, [KeepIndexGenerator(16, 0.5, seed=4)() for _ in range(20)],
                                              strict=True))


def neighbours_kept(gen: KeepIndexGenerator, draws: int = 300) -> float:
    """Mean fraction of a kept cell's 4-neighbours that are kept too: compactness."""
    total = 0.0
    for _ in range(draws):
        grid = np.zeros(gen.num_patches, dtype=bool)
        grid[gen().numpy()] = True
        grid = grid.reshape(gen.height, gen.width)
        padded = np.pad(grid, 1)
        nbr = padded[:-2, 1:-1].astype(int) + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
        total += nbr[grid].mean() / 4
    return total / draws


def test_spatial_behaviour_of_each_kind():
    freq = {k: keep_frequency(KeepIndexGenerator(16, 0.5, k, seed=0), 1500) for k in MASKING_KINDS}
    # block keeps the edges (its masks are centre-heavy); reversed_block keeps the centre; the others are flat.
    assert freq["block"][0, 0] > 0.85 and freq["block"][8, 8] < 0.3
    assert freq["reversed_block"][0, 0] < 0.15 and freq["reversed_block"][8, 8] > 0.7
    for kind in ("random", "block_or_complement", "reversed_block_rolled"):
        assert abs(freq[kind] - 0.5).max() < 0.1
    # block kinds keep contiguous regions (rolled ones too, but for the seams where their blocks wrap); random not
    assert neighbours_kept(KeepIndexGenerator(16, 0.5, "reversed_block", seed=1)) > 0.75
    assert neighbours_kept(KeepIndexGenerator(16, 0.5, "reversed_block_rolled", seed=1)) > 0.7
    assert neighbours_kept(KeepIndexGenerator(16, 0.5, "random", seed=1)) < 0.6


def test_min_block_defaults_to_beit_scaled_to_the_grid():
    # BEiT: 16 patches at 14x14; EVA-02 keeps 16 at 16x16; smaller grids keep the same share, at least 1
    assert [default_min_block(g * g) for g in (4, 8, 12, 14, 16, 24)] == [1, 5, 12, 16, 16, 16]
    assert KeepIndexGenerator(14, 0.4, "block").min_block == 16 and KeepIndexGenerator(8, 0.5).min_block == 5
    assert KeepIndexGenerator((6, 10), 0.3).min_block == 5  # 16 x 60/196
    assert KeepIndexGenerator(14, 0.4, min_block=4).min_block == 4  # an explicit value wins
    # larger smallest rectangles make more compact kept sets
    beit = neighbours_kept(KeepIndexGenerator(14, 0.4, "reversed_block", seed=1))
    assert beit > neighbours_kept(KeepIndexGenerator(14, 0.4, "reversed_block", min_block=4, seed=1)) + 0.01


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown masking kind"):
        KeepIndexGenerator(16, 0.5, "checkerboard")
    with pytest.raises(ValueError, match="mask_ratio"):
        KeepIndexGenerator(16, 1.0)
    with pytest.raises(ValueError, match="min_block must be at least 1"):
        KeepIndexGenerator(16, 0.5, min_block=0)


def test_render_command_writes_png(tmp_path, capsys):
    out = tmp_path / "masks.png"
    main(["--grid", "8", "--mask-ratio", "0.5", "--samples", "4", "--draws", "200", "--out", str(out)])
    assert Image.open(out).size[0] > 200
    assert "keep=32/64, min_block=5" in capsys.readouterr().out
    main(["--grid", "8", "--min-block", "2", "--samples", "2", "--draws", "10", "--out", str(out)])
    assert "min_block=2" in capsys.readouterr().out


def test_rolled_reversed_blocks_are_the_same_blocks_shifted_with_wrap_around():
    plain = KeepIndexGenerator(8, 0.5, "reversed_block", seed=3)
    rolled = KeepIndexGenerator(8, 0.5, "reversed_block_rolled", seed=3)
    for _ in range(20):
        a, b = np.zeros(64, dtype=bool), np.zeros(64, dtype=bool)
        a[plain().numpy()], b[rolled().numpy()] = True, True
        shifts = [(dy, dx) for dy in range(8) for dx in range(8)
                  if (np.roll(a.reshape(8, 8), (dy, dx), axis=(0, 1)) == b.reshape(8, 8)).all()]
        assert shifts
        plain.rng.randrange(8), plain.rng.randrange(8)  # the two draws of the shift: keep the streams aligned
