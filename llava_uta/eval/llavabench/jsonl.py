"""JSON-lines files of the bench: reading, id indexes, and durable line-by-line appends that resume cleanly."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from llava_uta.io_utils import write_jsonl_atomic

logger = logging.getLogger(__name__)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def by_question_id(rows: list[dict], what: str) -> dict:
    """Rows keyed by question_id; a repeated id is an error naming the file."""
    index: dict = {}
    for row in rows:
        qid = row["question_id"]
        if qid in index:
            raise ValueError(f"{what}: question_id {qid!r} appears more than once")
        index[qid] = row
    return index


class AppendLog:
    """An output .jsonl opened for resuming: the records already written, then fsync'ed appends.

    A last line cut off by an interruption (no newline, not valid JSON) is dropped, so the file stays valid.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records = self._recover()

    @property
    def done_ids(self) -> set:
        return {record["question_id"] for record in self.records}

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.append(record)

    def rewrite(self, records: list[dict]) -> None:
        """Replace the whole file with `records`, atomically (a reader sees the old file or the new one)."""
        write_jsonl_atomic(self.path, records)
        self.records = list(records)

    def _recover(self) -> list[dict]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        complete, tail = lines[:-1], lines[-1]
        if tail.strip():
            try:
                json.loads(tail)
                complete.append(tail)
            except json.JSONDecodeError:
                logger.warning("%s: dropping a cut-off last line (%d bytes)", self.path, len(tail))
            with open(self.path, "wb") as f:
                f.write(b"".join(line + b"\n" for line in complete))
                f.flush()
                os.fsync(f.fileno())
        return [json.loads(line) for line in complete if line.strip()]
