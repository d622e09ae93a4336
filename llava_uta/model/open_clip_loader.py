"""The one open_clip loader (pre-training teacher, zero-shot models, text towers, the comparison tower): local files
only. Models are given as model sources (llava_uta.model.model_source, docs/model-sources.md):

    create_open_clip("open_clip:local-dir:runs/teacher")               # an open_clip folder (config + weights)
    create_open_clip("open_clip:EVA01-g-14-plus@/ckpt/EVA01_CLIP_g_14_plus_psz14_s11B.pt")   # a name + a weights file
    create_open_clip("random:open_clip:ViT-B-16")                      # the architecture alone: random weights

A weights file is read without unpickling code (safetensors, or torch.load(weights_only=True)) and loaded strictly.
It holds open_clip's own layout or EVA-CLIP's (BAAI's released `.pt` files): `visual.blocks.N...` for the timm
EVA trunk open_clip keeps at `visual.trunk.*`, converted with timm's EVA checkpoint filter, and the text tower
under `text.*` or at the top level (old CLIP layout). Nothing is downloaded: Hub names (`hf-hub:`), pretrained
tags, models whose text tower or tokenizer comes from the Hugging Face Hub are refused with what to give instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import open_clip
from open_clip.factory import parse_model_name
from open_clip.model import convert_to_custom_text_state_dict
from open_clip.timm_model import TimmModel
from timm.models.eva import Eva
from timm.models.eva import checkpoint_filter_fn as eva_checkpoint_filter_fn
from torch import Tensor, nn

from llava_uta.model.checkpoint import CheckpointError, load_state_dict_file, load_strict
from llava_uta.model.model_source import GUIDE, LOCAL_DIR, ModelSource, parse_model_source

EVA_CLIP_KEY = "visual.patch_embed.proj.weight"  # EVA-CLIP's layout; open_clip's is visual.trunk.patch_embed...
LOCAL_ONLY = "nothing is downloaded at run time"


def open_clip_model_config(name: str) -> dict:
    """The model config of a built-in open_clip name or a local-dir:DIR folder (no Hub names)."""
    schema, identifier = parse_model_name(name)
    if schema == "hf-hub":
        raise ValueError(
            f"open_clip model {name!r} lives on the Hugging Face Hub and {LOCAL_ONLY}: download it yourself and give "
            f"open_clip:local-dir:DIR (a folder with open_clip_config.json and its weights), or "
            f"open_clip:NAME@WEIGHTS (a model name with a local weights file; see {GUIDE})"
        )
    if schema == "local-dir":
        if not os.path.isfile(os.path.join(identifier, "open_clip_config.json")):
            raise FileNotFoundError(f"{name}: no open_clip_config.json in {identifier} (an open_clip local-dir folder)")
        return open_clip.get_model_config(name)
    if name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {name!r} (see open_clip.list_models(), or give an open_clip folder "
                         f"as open_clip:local-dir:DIR)")
    return open_clip.get_model_config(name)


def create_open_clip(source: str | ModelSource, random_weights: bool = False) -> nn.Module:
    """An open_clip model from a model source: open_clip:NAME@WEIGHTS (open_clip or EVA-CLIP layout) or
    open_clip:local-dir:DIR; random:SOURCE builds the architecture alone (a folder's weights are not read).

    A NAME without a weights file is an error, because it would silently be a random model (a teacher that distils
    noise for days with normal-looking losses); random:SOURCE or `random_weights=True` (--teacher_random_weights,
    --text_random_weights) ask for random weights on purpose (benchmarks).
    """
    source = parse_model_source(source, ("open_clip",))
    name = source.target
    cfg = open_clip_model_config(name)
    if "hf_model_name" in cfg.get("text_cfg", {}):
        raise ValueError(
            f"open_clip model {name!r} builds its text tower from the Hugging Face model "
            f"{cfg['text_cfg']['hf_model_name']!r}, which would be fetched from the Hub, and {LOCAL_ONLY}"
        )
    if source.random_init:
        return open_clip.create_model(name, load_weights=False)
    if source.weights is not None and not os.path.isfile(source.weights):
        raise FileNotFoundError(f"open_clip weights {source.weights}: no such file (weights are only read from local "
                                f"files; pretrained tags would be downloaded)")
    if not source.has_weights and not random_weights:
        raise ValueError(f"open_clip model {name!r} is named without weights, which would give a random model: give "
                         f"its weights file as open_clip:{name}@FILE, or an open_clip folder as "
                         f"open_clip:local-dir:DIR (see {GUIDE}); random weights only on purpose "
                         f"(random:open_clip:{name}, --teacher_random_weights, benchmarks)")
    # local-dir: config and weights from the folder; a name: its weights file below, or random weights on request
    model = open_clip.create_model(name)
    if source.weights is not None:
        load_open_clip_weights(model, source.weights)
    return model


def open_clip_tokenizer(source: str | ModelSource) -> Callable[[list[str]], Tensor]:
    """open_clip's tokenizer for a model source, refusing those open_clip would fetch (HF tokenizers, SigLIP)."""
    name = parse_model_source(source, ("open_clip",)).target
    cfg = open_clip_model_config(name)
    hf_tokenizer = cfg.get("text_cfg", {}).get("hf_tokenizer_name")
    if not name.startswith(LOCAL_DIR) and (hf_tokenizer or "siglip" in name.lower()):
        raise ValueError(
            f"the tokenizer of open_clip model {name!r} ({hf_tokenizer or 'a SigLIP vocabulary'}) would be downloaded, "
            f"and {LOCAL_ONLY}: save the model with its tokenizer files as an open_clip folder and give "
            f"open_clip:local-dir:DIR"
        )
    return open_clip.get_tokenizer(name)


def eva_clip_to_open_clip(state_dict: dict[str, Tensor], model: nn.Module, source: str) -> dict[str, Tensor]:
    """EVA-CLIP's key layout -> open_clip's (timm EVA trunk under visual.trunk.*, text under text.*)."""
    visual = getattr(model, "visual", None)
    if not isinstance(visual, TimmModel) or not isinstance(visual.trunk, Eva):
        raise CheckpointError(
            f"{source} is in EVA-CLIP's layout ({EVA_CLIP_KEY}) but the model's vision tower is a "
            f"{type(visual).__name__}, not open_clip's timm EVA (e.g. EVA01-g-14-plus, EVA02-L-14)"
        )
    # timm's filter takes the visual.* keys, renames EVA-CLIP's (q_bias, w1/w2/w3, ffn_ln, inner_attn_ln) to timm's,
    # drops the RoPE tables (recomputed buffers) and resamples the position embedding if the grid differs
    converted = {f"visual.trunk.{k}": v for k, v in eva_checkpoint_filter_fn(state_dict, visual.trunk).items()}
    for key, value in state_dict.items():
        if not key.startswith("visual."):
            converted["logit_scale" if key == "text.logit_scale" else key] = value  # some EVA-CLIP files keep it there
    return converted


def load_open_clip_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a local weights file (open_clip or EVA-CLIP layout) into an open_clip model, strictly."""
    state_dict = load_state_dict_file(path)
    if all(k.startswith("module.") for k in state_dict):  # saved from a DistributedDataParallel wrapper
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if EVA_CLIP_KEY in state_dict:
        state_dict = eva_clip_to_open_clip(state_dict, model, str(path))
    if hasattr(model, "text"):  # a CustomTextCLIP: an old-layout text tower (top-level keys) moves under text.*
        state_dict = convert_to_custom_text_state_dict(state_dict)
    load_strict(model, state_dict, str(path))
