"""Frozen vision towers for probing: every tower the project loads, and each one's random-init twin.

A tower is given as `[LABEL=]SOURCE` (LABEL defaults to SOURCE), SOURCE a model source (docs/model-sources.md):
  FILE or uta:FILE                   a UTA student (FILE.json beside it) or a released UTA checkpoint's vision tower
  open_clip:NAME@WEIGHTS             an open_clip model: a built-in name with a local weights file
  open_clip:local-dir:DIR, or DIR    an open_clip folder (open_clip_config.json + weights), e.g. the teacher
  hf:DIR, or DIR                     a transformers vision-tower folder (config.json): llava-uta-convert's
                                     UTAVisionModel or CLIPVisionModel (mean/std from preprocessor_config.json)
  random:SOURCE                      SOURCE's architecture with fresh weights (seeded); only its config is read

Layers follow transformers' `hidden_states`, which LLaVA's `vision_feature_layer` indexes: 0 is the input of the first
block (embedded patches + position embedding), k the output of block k, negative values count from the end (-1 the
last block, -2 LLaVA's default). No final LayerNorm is applied. open_clip towers go through their visual tower's
`forward_intermediates`, which exposes block outputs only (layers 1..depth).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn

from llava_uta.eval.zeroshot_data import clip_eval_transform
from llava_uta.model.checkpoint import load_uta_vit_config, student_config_path
from llava_uta.model.model_source import LOCAL_DIR, ModelSource, parse_model_source
from llava_uta.model.official import load_any_uta_vit, load_official_visual
from llava_uta.model.open_clip_loader import create_open_clip, open_clip_model_config
from llava_uta.model.uta_vit import UTAViT, UTAViTConfig


@dataclass(frozen=True)
class TowerSpec:
    """A tower to probe: its label and model source."""

    label: str
    source: ModelSource

    def twin(self, label: str | None = None) -> TowerSpec:
        """The same architecture at random init (the floor of a probe)."""
        return TowerSpec(label or f"random init ({self.label})", dataclasses.replace(self.source, random_init=True))


def parse_tower(text: str) -> TowerSpec:
    """Parse `[LABEL=]SOURCE` (see the module docstring); raises naming what is missing."""
    left, sep, right = text.partition("=")
    if sep and left and not any(c in left for c in "/\\:"):
        return TowerSpec(left, parse_model_source(right))
    return TowerSpec(text, parse_model_source(text))


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """Build a module under torch.manual_seed(seed) without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


class FrozenTower:
    """A frozen vision tower in eval mode: its preprocessing, patch grid and the tokens of any layer."""

    def __init__(self, spec: TowerSpec, module: nn.Module, image_size: int, patch_size: int, depth: int, arch: dict,
                 mean: tuple[float, ...] = OPENAI_DATASET_MEAN, std: tuple[float, ...] = OPENAI_DATASET_STD):
        if image_size % patch_size:
            raise ValueError(f"{spec.label}: image size {image_size} is not a multiple of patch size {patch_size}")
        self.spec = spec
        self.module = module.eval().requires_grad_(False)
        self.image_size = image_size
        self.patch_size = patch_size
        self.depth = depth
        self.arch = arch  # the architecture, as plain data: towers with equal `arch` share a random-init twin
        self.mean = tuple(mean)
        self.std = tuple(std)

    @property
    def label(self) -> str:
        return self.spec.label

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def arch_key(self) -> str:
        return json.dumps(self.arch, sort_keys=True)

    def transform(self) -> Callable:
        """The tower's evaluation preprocessing: short-side resize, centre crop, normalise."""
        return clip_eval_transform(self.image_size, self.mean, self.std)

    def to(self, device: torch.device | str) -> FrozenTower:
        self.module.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def layer_index(self, layer: int) -> int:
        """`layer` as an index 0..depth into hidden_states (0: block-0 input, k: block k's output)."""
        if not -(self.depth + 1) <= layer <= self.depth:
            raise ValueError(f"{self.label}: layer {layer} out of range for a {self.depth}-block tower "
                             f"(0..{self.depth}, or -1..-{self.depth + 1} from the end)")
        return layer % (self.depth + 1)

    @torch.no_grad()
    def tokens(self, images: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        """(prefix tokens (B, P, D), CLS first; patch tokens (B, grid*grid, D), row-major) at `layer`."""
        prefix, patches = self._tokens(images.to(self.device), self.layer_index(layer))
        if patches.shape[1] != self.grid_size**2:
            raise RuntimeError(f"{self.label}: {patches.shape[1]} patch tokens, expected {self.grid_size}^2")
        return prefix.float(), patches.float()

    def _tokens(self, images: Tensor, index: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class UTATower(FrozenTower):
    """A UTAViT (student or released checkpoint): `forward_blocks`, the path the LLaVA tower takes."""

    def _tokens(self, images: Tensor, index: int) -> tuple[Tensor, Tensor]:
        _, hidden_states = self.module.forward_blocks(images)
        h = hidden_states[index]
        return h[:, :1], h[:, 1:]


class HFTower(FrozenTower):
    """A transformers vision tower (one CLS token, then the patches), read through `output_hidden_states`."""

    def _tokens(self, images: Tensor, index: int) -> tuple[Tensor, Tensor]:
        out = self.module(pixel_values=images, output_hidden_states=True)
        hidden_states = out.hidden_states
        if len(hidden_states) != self.depth + 1:
            raise RuntimeError(f"{self.label}: {len(hidden_states)} hidden states for {self.depth} layers")
        h = hidden_states[index]
        return h[:, :1], h[:, 1:]


class OpenCLIPTower(FrozenTower):
    """An open_clip visual tower (VisionTransformer or timm trunk), read through `forward_intermediates`."""

    def _tokens(self, images: Tensor, index: int) -> tuple[Tensor, Tensor]:
        if index == 0:
            raise ValueError(f"{self.label}: open_clip's forward_intermediates exposes block outputs only; "
                             f"use a layer in 1..{self.depth} (or -1..-{self.depth})")
        out = self.module.forward_intermediates(images, indices=[index - 1], stop_early=True, intermediates_only=True,
                                                output_fmt="NLC", output_extra_tokens=True)
        patches = out["image_intermediates"][0]
        prefixes = out.get("image_intermediates_prefix")
        prefix = prefixes[0] if prefixes else patches[:, :0]
        return prefix, patches


def _uta_arch(cfg: UTAViTConfig) -> dict:
    """A UTAViT's architecture (training-only fields dropped), so every format of one model shares a twin."""
    return {"kind": "uta", **{k: v for k, v in dataclasses.asdict(cfg).items()
                              if k not in ("drop_path_rate", "use_mask_token")}}


def _uta_from_vit(spec: TowerSpec, vit: UTAViT) -> UTATower:
    cfg = vit.cfg
    return UTATower(spec, vit, cfg.img_size, cfg.patch_size, cfg.depth, _uta_arch(cfg))


def load_uta_tower(spec: TowerSpec, seed: int = 0) -> UTATower:
    """A UTA student / released checkpoint, or (random_init) a fresh UTAViT of its config."""
    path = Path(spec.source.target)
    if not path.is_file():
        raise FileNotFoundError(f"{spec.label}: UTA checkpoint {path} not found")
    if not spec.source.random_init:
        return _uta_from_vit(spec, load_any_uta_vit(path))
    cfg = load_uta_vit_config(path) if student_config_path(path).is_file() else load_official_visual(path).cfg
    cfg = dataclasses.replace(cfg, drop_path_rate=0.0)
    return _uta_from_vit(spec, _seeded(seed, lambda: UTAViT(cfg)))


def load_open_clip_tower(spec: TowerSpec, seed: int = 0) -> OpenCLIPTower:
    """An open_clip model's visual tower (weights from its folder or file), or its architecture at random init."""
    name = spec.source.target
    if spec.source.random_init:
        model = _seeded(seed, lambda: create_open_clip(spec.source))
    else:
        model = create_open_clip(spec.source)
    visual = model.visual
    if isinstance(visual, VisionTransformer):
        patch_size, depth = visual.patch_size[0], visual.transformer.layers
    elif isinstance(visual, TimmModel) and hasattr(visual.trunk, "blocks") and hasattr(visual.trunk, "patch_embed"):
        patch_size, depth = visual.trunk.patch_embed.patch_size[0], len(visual.trunk.blocks)
    else:
        raise ValueError(f"{spec.label}: open_clip model {name!r} has a {type(visual).__name__} vision tower; probing "
                         f"needs a ViT (open_clip's VisionTransformer or a timm ViT trunk) with patch tokens")
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    size = size if isinstance(size, int) else size[0]
    model_cfg = open_clip_model_config(name)
    arch = {"kind": "open_clip", "embed_dim": model_cfg.get("embed_dim"), "vision_cfg": model_cfg.get("vision_cfg", {})}
    return OpenCLIPTower(spec, visual, size, patch_size, depth, arch,
                         tuple(cfg.get("mean", OPENAI_DATASET_MEAN)), tuple(cfg.get("std", OPENAI_DATASET_STD)))


def load_hf_tower(spec: TowerSpec, seed: int = 0) -> FrozenTower:
    """A transformers vision-tower folder (UTAVisionModel, CLIPVisionModel...), or its config at random init."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    from llava_uta.model.hf_vision import UTAVisionConfig, UTAVisionModel  # registers model type "uta_vision"

    folder = Path(spec.source.target)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{spec.label}: {folder / 'config.json'} not found (a transformers tower folder)")
    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "vision_config"):
        raise ValueError(f"{folder / 'config.json'}: model_type {config.model_type!r} is a composite model, not a "
                         f"vision tower folder (llava-uta-convert writes one)")
    missing = [f for f in ("image_size", "patch_size", "num_hidden_layers") if not hasattr(config, f)]
    if missing:
        raise ValueError(f"{folder / 'config.json'}: a vision tower config needs {missing}")
    if isinstance(config, UTAVisionConfig):
        vit_cfg = dataclasses.replace(config.to_vit_config(), drop_path_rate=0.0)
        if spec.source.random_init:  # the UTAViT constructor's init, the same twin as a student checkpoint's
            vit = _seeded(seed, lambda: UTAViT(vit_cfg))
        else:
            vit = UTAVisionModel.from_pretrained(folder).vit
        mean, std = _processor_stats(folder, AutoImageProcessor)
        return UTATower(spec, vit, vit_cfg.img_size, vit_cfg.patch_size, vit_cfg.depth, _uta_arch(vit_cfg), mean, std)
    model_class = _saved_class(config) or AutoModel
    if spec.source.random_init:
        model = _seeded(seed, lambda: model_class.from_config(config) if model_class is AutoModel
                        else model_class(config))
    else:
        model = model_class.from_pretrained(folder)
    drop = {"architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype"}
    arch = {"kind": "hf", **{k: v for k, v in config.to_dict().items() if k not in drop}}
    mean, std = _processor_stats(folder, AutoImageProcessor)
    return HFTower(spec, model, config.image_size, config.patch_size, config.num_hidden_layers, arch, mean, std)


def _saved_class(config) -> type | None:
    """The transformers class the folder was saved from (config.architectures), if it takes this config."""
    import transformers

    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and isinstance(config, getattr(cls, "config_class", ())):
            return cls
    return None


def _processor_stats(folder: Path, auto_processor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation mean/std from the folder's image processor (OpenAI CLIP's when it has none)."""
    if not (folder / "preprocessor_config.json").is_file():
        return OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    processor = auto_processor.from_pretrained(folder)
    return tuple(processor.image_mean), tuple(processor.image_std)


LOADERS: dict[str, Callable[[TowerSpec, int], FrozenTower]] = {
    "uta": load_uta_tower,
    "open_clip": load_open_clip_tower,
    "hf": load_hf_tower,
}


def load_tower(spec: TowerSpec, seed: int = 0, device: torch.device | str = "cpu") -> FrozenTower:
    """Load (or, for random_init, build with `seed`) the tower `spec` names, frozen, on `device`."""
    return LOADERS[spec.source.kind](spec, seed).to(device)


def tower_fingerprint(spec: TowerSpec, seed: int) -> dict:
    """What identifies a tower's weights for a feature cache: the source, the seed or the files' sizes and times."""
    source = spec.source
    if source.random_init:
        return {"spec": str(source), "seed": seed}
    target = source.target.removeprefix(LOCAL_DIR)
    paths = [Path(target)]
    if source.kind == "uta":
        paths.append(student_config_path(target))
    if source.weights:
        paths.append(Path(source.weights))
    files = []
    for p in paths:
        for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
            if f.is_file():
                st = f.stat()
                files.append([os.fspath(f), st.st_size, st.st_mtime_ns])
    return {"spec": str(source), "files": files}
