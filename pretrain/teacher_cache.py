"""Precomputed teacher targets for a fixed-view schedule: the frozen teacher runs once per (view, image).

At real scale the teacher's forward dominates a step (a giant EVA-CLIP costs about 10x a B/16 student step).
With V fixed views per image (epoch e shows view e mod V; masks still change every epoch) the targets are
computed once, stored in safetensors shards of `shard_size` images, and read row by row afterwards, so later
epochs and ablations with the same teacher and views skip the teacher entirely.

Two encodings (`encoding`): "fp16" (2 bytes a value), or "fp8" (1 byte a value plus one fp32 scale per token):
each token is divided by its largest |value| / 448 and rounded to float8 e4m3, whose 3 mantissa bits bound the
relative rounding error of a value at 2^-4 of its binade (the error a student's loss sees is measured by
`benchmarks/teacher_cache.py`). fp8 halves the disk a cached view needs, e.g. 7.5 TB -> 3.8 TB for ImageNet-21K
with a g/14 teacher at 224 px.

    cache/
      cache.json                      what was cached (teacher, views, sizes, encoding); written last = complete
      view000_shard00000.safetensors  {"targets": (shard_size, 1 + N, E) fp16 or fp8 [, "scales": (.., 1 + N, 1)]}
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from llava_uta.io_utils import write_json_atomic
from llava_uta.model.checkpoint import save_state_dict_file
from llava_uta.model.model_source import parse_model_source, with_weights_flag

ENCODINGS = ("fp16", "fp8")
FP8_MAX = 448.0  # the largest finite float8 e4m3 value


def encode_targets(targets: torch.Tensor, encoding: str) -> dict[str, torch.Tensor]:
    """(..., E) targets as stored: fp16, or fp8 e4m3 scaled per token (its largest |value| maps to FP8_MAX)."""
    if encoding == "fp16":
        return {"targets": targets.half()}
    if encoding != "fp8":
        raise ValueError(f"teacher cache encoding must be one of {ENCODINGS}, got {encoding!r}")
    scales = targets.float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-30) / FP8_MAX
    return {"targets": (targets.float() / scales).to(torch.float8_e4m3fn), "scales": scales}


def decode_targets(targets: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """What `encode_targets` stored, as fp16 (fp16 encoding) or fp32 (fp8 encoding)."""
    return targets if scales is None else targets.float() * scales


class TeacherCache:
    """Reads cached targets; `build` fills the cache (resumably: finished shards are kept)."""

    def __init__(self, root: str | os.PathLike, shard_size: int = 1024, encoding: str = "fp16"):
        if encoding not in ENCODINGS:
            raise ValueError(f"teacher cache encoding must be one of {ENCODINGS}, got {encoding!r}")
        self.root, self.shard_size, self.encoding = Path(root), shard_size, encoding
        self._open: dict[Path, object] = {}

    def shard_path(self, view: int, shard: int) -> Path:
        return self.root / f"view{view:03d}_shard{shard:05d}.safetensors"

    def describe(self, **fields) -> dict:
        """cache.json's content. A `teacher` source (with the deprecated `teacher_pretrained` file) is recorded as the
        open_clip model and weights file it loads, so every spelling of one teacher finds the same cache."""
        if "teacher" in fields:
            teacher = parse_model_source(with_weights_flag(fields["teacher"], fields.get("teacher_pretrained"),
                                                           "--teacher", "--teacher_pretrained"))
            fields |= {"teacher": teacher.target, "teacher_pretrained": teacher.weights}
        return {"format": 1, "shard_size": self.shard_size, "encoding": self.encoding, **fields}

    def is_complete(self, description: dict) -> bool:
        manifest = self.root / "cache.json"
        return manifest.is_file() and json.loads(manifest.read_text()) == description

    def get(self, view: int, index: int) -> torch.Tensor:
        """The (1 + N, E) targets of image `index` in view `view` (fp16, or fp32 decoded from fp8)."""
        path = self.shard_path(view, index // self.shard_size)
        if path not in self._open:  # one handle per shard and process; reads are row slices
            self._open[path] = safe_open(str(path), framework="pt")
        shard, row = self._open[path], index % self.shard_size
        scales = shard.get_slice("scales")[row] if self.encoding == "fp8" else None
        return decode_targets(shard.get_slice("targets")[row], scales)

    def __getstate__(self) -> dict:  # DataLoader workers open their own handles
        return {**self.__dict__, "_open": {}}

    @torch.no_grad()
    def build(self, views, teacher, grid: tuple[int, int], num_views: int, description: dict,
              device: torch.device, batch_size: int = 256, rank: int = 0, world: int = 1) -> None:
        """Compute every missing shard (rank r takes shards r, r+W, ...); rank 0 writes cache.json when all exist."""
        self.root.mkdir(parents=True, exist_ok=True)
        num_shards = -(-len(views) // self.shard_size)
        jobs = [(v, s) for v in range(num_views) for s in range(num_shards)
                if (v * num_shards + s) % world == rank and not self.shard_path(v, s).exists()]
        for view, shard in tqdm(jobs, desc="teacher cache", disable=rank != 0):
            indices = range(shard * self.shard_size, min((shard + 1) * self.shard_size, len(views)))
            rows = []
            for start in range(0, len(indices), batch_size):
                batch = torch.stack([views.view(i, view) for i in indices[start:start + batch_size]])
                rows.append(encode_targets(teacher(batch.to(device), grid), self.encoding))
            save_state_dict_file({key: torch.cat([r[key] for r in rows]).cpu() for key in rows[0]},
                                 self.shard_path(view, shard))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        if rank == 0:
            write_json_atomic(self.root / "cache.json", description)

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.glob("view*_shard*.safetensors"))
