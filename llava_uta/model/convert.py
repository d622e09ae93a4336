"""Turn a UTA checkpoint into a transformers vision-tower folder (config, weights, CLIP image processor).

    llava-uta-convert official_uta_l14_336.pt towers/uta-l14-336            # a released checkpoint
    llava-uta-convert runs/uta/student.safetensors towers/uta-student      # a pre-training student (+ .json)
    llava-uta-convert runs/uta/student.safetensors uta_student.safetensors --to official \
        --text-model local-dir:runs/teacher                                 # the released key layout
    llava-uta-convert --from-open-clip local-dir:runs/teacher towers/teacher   # an open_clip ViT CLIP, for comparison

The folder loads with `AutoModel.from_pretrained` / `AutoImageProcessor.from_pretrained` once `llava_uta` is
imported, and serves as the vision tower of a Llava model.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from safetensors.torch import save_file
from transformers import CLIPImageProcessor
from transformers.image_utils import PILImageResampling

from llava_uta.model.checkpoint import load_uta_vit, student_config_path
from llava_uta.model.hf_vision import UTAVisionModel
from llava_uta.model.official import export_official, load_official_visual
from llava_uta.model.uta_vit import UTAViT


def clip_image_processor(
    image_size: int,
    mean: Sequence[float] = OPENAI_DATASET_MEAN,
    std: Sequence[float] = OPENAI_DATASET_STD,
    resample: PILImageResampling = PILImageResampling.BICUBIC,
) -> CLIPImageProcessor:
    """Short-side resize, centre crop, normalise; the defaults (bicubic, OpenAI CLIP mean/std) are UTA's evaluation."""
    return CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        resample=resample,
        image_mean=list(mean),
        image_std=list(std),
    )


def load_any_uta_vit(path: str | os.PathLike, kind: str = "auto") -> UTAViT:
    """A student checkpoint (has PATH.json beside it) or a released checkpoint's vision tower."""
    if kind == "auto":
        kind = "student" if student_config_path(path).is_file() else "official"
    return load_uta_vit(path) if kind == "student" else load_official_visual(path)


def convert(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, kind: str = "auto") -> Path:
    out_dir = Path(out_dir)
    vit = load_any_uta_vit(checkpoint, kind)
    UTAVisionModel.from_vit(vit).save_pretrained(out_dir)
    clip_image_processor(vit.cfg.img_size).save_pretrained(out_dir)
    return out_dir


def export_to_official(checkpoint: str | os.PathLike, out_file: str | os.PathLike, text_model: str | None = None,
                       kind: str = "auto") -> Path:
    """Write a checkpoint in the released key layout (.safetensors), with the text tower of an open_clip model."""
    vit = load_any_uta_vit(checkpoint, kind)
    clip = None
    if text_model:
        import open_clip

        clip = open_clip.create_model(text_model.removeprefix("openclip:"))
    out_file = Path(out_file)
    tmp = out_file.with_name(f".{out_file.name}.tmp")
    save_file(export_official(vit, clip), tmp)
    os.replace(tmp, out_file)
    return out_file


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?",
                        help="released UTA checkpoint, or student .safetensors with its .json")
    parser.add_argument("out", help="tower folder to write (--to hf), or a .safetensors file (--to official)")
    parser.add_argument("--from-open-clip", metavar="NAME",
                        help="convert this open_clip ViT CLIP (local-dir:PATH, or a name such as ViT-B-16 with "
                        "--open-clip-pretrained) to a transformers CLIP vision tower instead of a UTA checkpoint")
    parser.add_argument("--open-clip-pretrained", metavar="PATH", help="with --from-open-clip NAME: its weights file")
    parser.add_argument("--kind", choices=("auto", "official", "student"), default="auto")
    parser.add_argument("--to", choices=("hf", "official"), default="hf",
                        help="a transformers vision-tower folder, or the released UTA key layout")
    parser.add_argument("--text-model", help="with --to official: open_clip model (e.g. local-dir:runs/teacher) "
                        "whose text tower is written as text.*")
    args = parser.parse_args(argv)
    if (args.checkpoint is None) == (args.from_open_clip is None):
        parser.error("give either a UTA checkpoint or --from-open-clip NAME")
    if args.open_clip_pretrained and not args.from_open_clip:
        parser.error("--open-clip-pretrained needs --from-open-clip NAME")
    if args.from_open_clip:
        if args.to != "hf":
            parser.error("--from-open-clip writes a transformers tower folder only (--to hf)")
        from llava_uta.model.openclip_tower import convert_open_clip  # it imports clip_image_processor from here

        out = convert_open_clip(args.from_open_clip, args.out, args.open_clip_pretrained)
    elif args.to == "official":
        out = export_to_official(args.checkpoint, args.out, args.text_model, args.kind)
    else:
        out = convert(args.checkpoint, args.out, args.kind)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
