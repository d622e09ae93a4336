"""Pre-training data: images from an ImageFolder or tar shards, one augmented view and keep indices each.

All randomness of a sample (its crop, its flip, its masks) is a function of (seed, epoch, index) alone, and
the m-th of its M keep sets of (seed, epoch, index, m), so a run gives the same batches whatever the number of
workers or ranks, and a resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import contextlib
import io
import random
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision import datasets, transforms

from pretrain.masking import KeepIndexGenerator, check_mask_pairing, complement_keep

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class TarShards(Dataset):
    """Samples of webdataset-style tar shards, indexed once for random access.

    As in webdataset, a sample is the run of consecutive members sharing a key (the member's path up to the first
    dot of its file name: `0001.jpg` + `0001.txt` is sample `0001`). A sample is kept when it has an image and, with
    `caption=True`, a `.txt` caption; items are `(image, 0)`, or `(image, caption)` with captions.
    """

    def __init__(self, shards: list[Path], caption: bool = False):
        if not shards:
            raise ValueError("no tar shards given")
        self.shards, self.caption = [Path(s) for s in shards], caption
        self.samples: list[tuple[int, tuple[int, int], tuple[int, int] | None]] = []  # shard, image, text
        for i, shard in enumerate(self.shards):
            for members in self._samples_of(shard):
                image = next((members[e] for e in members if e in IMAGE_SUFFIXES), None)
                text = members.get(".txt")
                if image is not None and (text is not None or not caption):
                    self.samples.append((i, image, text))
        if not self.samples:
            wanted = "image + .txt pairs" if caption else "images"
            raise ValueError(f"no {wanted} ({', '.join(IMAGE_SUFFIXES)}) in shards {self.shards[:3]}...")

    @staticmethod
    def _samples_of(shard: Path) -> list[dict[str, tuple[int, int]]]:
        """Per sample: {lower-case extension: (offset of the data, size)}."""
        samples, key = [], None
        try:
            with tarfile.open(shard) as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    folder, _, name = m.name.rpartition("/")
                    stem, dot, ext = name.partition(".")
                    if (folder, stem) != key:
                        samples.append({})
                        key = (folder, stem)
                    samples[-1][(dot + ext).lower()] = (m.offset_data, m.size)
        except tarfile.TarError as e:
            raise ValueError(f"{shard}: not a readable tar shard: {e}") from e
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, shard: int, where: tuple[int, int]) -> bytes:
        with open(self.shards[shard], "rb") as f:
            f.seek(where[0])
            return f.read(where[1])

    def __getitem__(self, index: int) -> tuple[Image.Image, int | str]:
        shard, image, text = self.samples[index]
        picture = Image.open(io.BytesIO(self._read(shard, image))).convert("RGB")
        return picture, self._read(shard, text).decode("utf-8").strip() if self.caption else 0


def tar_shards(path: Path) -> list[Path]:
    """A .tar shard, the shards in a folder, or the shards a brace-free glob names ([] if none)."""
    if path.is_file():
        return [path] if path.suffix == ".tar" else []
    if path.is_dir():
        return sorted(path.glob("*.tar"))
    return sorted(path.parent.glob(path.name))


def image_source(path: str | Path) -> Dataset:
    """An ImageFolder root, a tar shard, a folder of tar shards, or a brace-free glob of shards."""
    path = Path(path)
    if shards := tar_shards(path):
        return TarShards(shards)
    if path.is_dir():
        return datasets.ImageFolder(str(path))
    raise FileNotFoundError(f"{path}: expected an ImageFolder root, a .tar shard or a folder/glob of shards")


def train_transform(image_size: int, crop_scale: tuple[float, float] = (0.2, 1.0), flip: bool = True):
    """RandomResizedCrop (+ horizontal flip), CLIP normalisation: the one view teacher and student share."""
    steps = [transforms.RandomResizedCrop(image_size, scale=crop_scale,
                                          interpolation=transforms.InterpolationMode.BICUBIC)]
    if flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)]
    return transforms.Compose(steps)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch) * 100_000_007 + index


def mask_seed(seed: int, epoch: int, index: int, m: int = 0) -> int:
    """The seed of keep set m of a sample: the sample's own seed for m = 0 (so M = 1 draws what it always did),
    moved by m x 2^64 beyond it otherwise (never another sample's seed: those stay below 2^64 for seeds < 10^5)."""
    return sample_seed(seed, epoch, index) + (m << 64)


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """torch's, Python's and numpy's global RNGs seeded by `seed` for the block, then restored as they were.

    torchvision's transforms draw from torch's RNG; timm's from Python's (crops, magnitudes) and numpy's (RandAugment's
    op choice, Mixup).
    """
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def seeded_view(transform, image: Image.Image, seed: int) -> torch.Tensor:
    """`transform(image)` with the global RNGs seeded by `seed` for the call (`seeded_rngs`)."""
    with seeded_rngs(seed):
        return transform(image)


class SeededViews(Dataset):
    """(augmented image, label) per (image, label) item of `source`, the label as the source gives it (a class index,
    a caption); each view is drawn from the seed of (seed, epoch, index), so a sample is the same for any number of
    workers or ranks and after a resume. The training loop sets the epoch."""

    def __init__(self, source: Dataset, transform, seed: int = 0):
        self.source, self.transform, self.seed = source, transform, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source)

    def labelled_view(self, index: int, epoch: int) -> tuple[torch.Tensor, Any]:
        """Item `index` as (its image's view for epoch `epoch`, its label)."""
        image, label = self.source[index]
        return seeded_view(self.transform, image, sample_seed(self.seed, epoch, index)), label

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        return self.labelled_view(index, self.epoch)


class MaskedViews(SeededViews):
    """(image tensor, keep indices[, cached teacher targets]) per sample, drawn from per-(epoch, index) seeds.

    With `views` V (a fixed-view schedule, for the teacher cache) epoch e shows view e mod V of every image, so
    the teacher's targets for each view can be computed once; the masks still change every epoch.

    With `masks_per_view` M > 1 the keep indices are an (M, K) tensor, M keep sets of the one view that share
    its teacher targets: set m drawn from `mask_seed(seed, epoch, index, m)`, or with `pairing="complement"`
    (M = 2, half the patches kept) set 1 = the patches set 0 leaves out. M = 1 gives the (K,) set as before.
    """

    def __init__(self, source: Dataset, transform, masks: KeepIndexGenerator, seed: int = 0,
                 views: int | None = None, targets=None, masks_per_view: int = 1, pairing: str = "independent"):
        check_mask_pairing(pairing, masks_per_view, masks.num_patches, masks.num_keep)
        super().__init__(source, transform, seed)
        self.masks, self.views, self.targets = masks, views, targets
        self.masks_per_view, self.pairing = masks_per_view, pairing

    def view_number(self, epoch: int) -> int:
        return epoch % self.views if self.views else epoch

    def view(self, index: int, view_number: int) -> torch.Tensor:
        """The augmented view `view_number` of image `index` (the same tensor every time it is asked for)."""
        return self.labelled_view(index, view_number)[0]

    def keep_sets(self, epoch: int, index: int) -> torch.Tensor:
        """The keep indices of sample `index` in epoch `epoch`: (K,), or (M, K) with M keep sets per view."""
        sets = []
        for m in range(self.masks_per_view):
            if m == 1 and self.pairing == "complement":
                sets.append(complement_keep(sets[0], self.masks.num_patches))
                continue
            self.masks.seed(mask_seed(self.seed, epoch, index, m))
            sets.append(self.masks())
        return sets[0] if self.masks_per_view == 1 else torch.stack(sets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        view_number = self.view_number(self.epoch)
        sample = (self.view(index, view_number), self.keep_sets(self.epoch, index))
        if self.targets is not None:
            sample += (self.targets.get(view_number, index),)
        return sample


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch, split across ranks by stride, that can start mid-epoch.

    Rank r takes positions r, r+W, r+2W, ... so that W ranks with micro-batch b see, at every step, the same
    global batch as one rank with batch W*b.
    """

    def __init__(self, num_samples: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.num_samples, self.seed, self.rank, self.world_size = num_samples, seed, rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch `epoch`, skipping this rank's first `start` samples (to resume)."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.num_samples // self.world_size - self.start

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator)
        usable = self.num_samples - self.num_samples % self.world_size
        return iter(order[self.rank:usable:self.world_size][self.start:].tolist())
