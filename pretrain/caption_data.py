"""Image-caption pairs for contrastive training: open_clip's CSV layout or webdataset tar shards.

Both are read by index (tar shards through a one-time index of their members), so each sample's augmentation is a
function of (seed, epoch, index) alone, as in pre-training: the same batches for any number of workers or ranks, and
an exact continuation after `--resume`. Images are decoded one at a time from disk, never held in memory.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from pretrain.data import SeededViews, TarShards, tar_shards


def read_captions(csv_path: Path, separator: str = ",", img_key: str = "filepath",
                  caption_key: str = "title") -> tuple[list[Path], list[str]]:
    """Image paths (relative ones resolved against the CSV's folder) and captions from an open_clip CSV."""
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f, delimiter=separator)
        missing = {img_key, caption_key} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {sorted(missing)}; found {reader.fieldnames}")
        rows = list(reader)
    if not rows:
        raise ValueError(f"{csv_path}: no rows")
    paths = [Path(r[img_key]) if Path(r[img_key]).is_absolute() else csv_path.parent / r[img_key] for r in rows]
    return paths, [r[caption_key] for r in rows]


class CsvCaptions(Dataset):
    """(image, caption) rows of an open_clip CSV (`filepath,title` by default)."""

    def __init__(self, csv_path: Path, separator: str = ",", img_key: str = "filepath", caption_key: str = "title"):
        self.csv_path = Path(csv_path)
        self.paths, self.captions = read_captions(self.csv_path, separator, img_key, caption_key)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        path = self.paths[index]
        try:
            image = Image.open(path).convert("RGB")
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.csv_path}: row {index + 2} names {path}, which does not exist") from None
        except OSError as e:
            raise ValueError(f"{self.csv_path}: row {index + 2} names {path}, not a readable image: {e}") from e
        return image, self.captions[index]


def caption_source(path: str | Path, separator: str = ",", img_key: str = "filepath",
                   caption_key: str = "title") -> Dataset:
    """A CSV file (open_clip's layout) or webdataset tar shards (a .tar, a folder of them, or a glob)."""
    path = Path(path)
    if path.is_file() and path.suffix in (".csv", ".tsv"):
        return CsvCaptions(path, separator, img_key, caption_key)
    if shards := tar_shards(path):
        return TarShards(shards, caption=True)
    raise FileNotFoundError(f"{path}: expected an open_clip CSV file, a .tar shard or a folder/glob of tar shards")


class CaptionViews(SeededViews):
    """(image tensor, token ids) per sample; the augmentation is seeded by (seed, epoch, index)."""

    def __init__(self, source: Dataset, transform, tokenizer, seed: int = 0):
        super().__init__(source, transform, seed)
        self.tokenizer = tokenizer

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        view, caption = super().__getitem__(index)
        return view, self.tokenizer([caption])[0]
