"""Precomputed teacher targets for a fixed-view schedule: the frozen teacher runs once per (view, image).

At real scale the teacher's forward dominates a step (a giant EVA-CLIP costs about 10x a B/16 student step).
With V fixed views per image (epoch e shows view e mod V; masks still change every epoch) the targets are
computed once, stored in fp16 safetensors shards of `shard_size` images, and read row by row afterwards, so
later epochs and ablations with the same teacher and views skip the teacher entirely.

    cache/
      cache.json                      what was cached (teacher, views, sizes); written last = complete
      view000_shard00000.safetensors  {"targets": (shard_size, 1 + N, E) fp16}
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


class TeacherCache:
    """Reads cached targets; `build` fills the cache (resumably: finished shards are kept)."""

    def __init__(self, root: str | os.PathLike, shard_size: int = 1024):
        self.root, self.shard_size = Path(root), shard_size
        self._open: dict[Path, object] = {}

    def shard_path(self, view: int, shard: int) -> Path:
        return self.root / f"view{view:03d}_shard{shard:05d}.safetensors"

    def describe(self, **fields) -> dict:
        return {"format": 1, "shard_size": self.shard_size, **fields}

    def is_complete(self, description: dict) -> bool:
        manifest = self.root / "cache.json"
        return manifest.is_file() and json.loads(manifest.read_text()) == description

    def get(self, view: int, index: int) -> torch.Tensor:
        """The (1 + N, E) fp16 targets of image `index` in view `view`."""
        path = self.shard_path(view, index // self.shard_size)
        if path not in self._open:  # one handle per shard and process; reads are row slices
            self._open[path] = safe_open(str(path), framework="pt")
        return self._open[path].get_slice("targets")[index % self.shard_size]

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
                rows.append(teacher(batch.to(device), grid).half().cpu())
            save_state_dict_file({"targets": torch.cat(rows)}, self.shard_path(view, shard))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        if rank == 0:
            write_json_atomic(self.root / "cache.json", description)

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.glob("view*_shard*.safetensors"))
