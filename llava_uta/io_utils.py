"""Atomic writes, the one way every tool here writes a file or a folder (importable without torch).

A file is written to a temporary sibling (`.NAME.tmp`) renamed onto its path; a folder is filled as a temporary
sibling (`.NAME.partial`) that replaces the old folder once complete. A reader (or a resumed run) never sees half
a file or half a folder: an interrupted write leaves only the hidden temporary behind, cleared by the next write.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; renamed onto `path` when the block ends, removed on an error.

    `suffix` ends the temporary's name, for writers that choose the format by extension (".tmp.png").
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def partial_dir(path: str | os.PathLike, fresh: bool = True) -> Path:
    """The temporary sibling folder to fill in place of folder `path` (see `replace_dir`), emptied if `fresh`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    if fresh:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    return tmp


def replace_dir(tmp: Path, path: str | os.PathLike) -> None:
    """Put the filled folder `tmp` (from `partial_dir`) at `path`, replacing what was there."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder; it replaces folder `path` when the block ends without an error."""
    tmp = partial_dir(path)
    yield tmp
    replace_dir(tmp, path)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, records: list[dict]) -> None:
    """One JSON object per line, written atomically."""
    write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in records))


def save_figure_atomic(fig, path: str | os.PathLike, dpi: int = 110) -> None:
    """Save a matplotlib figure as PNG, atomically, then close it."""
    import matplotlib.pyplot as plt

    with atomic_file(path, ".tmp.png") as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
