"""Merge a LoRA training output into a plain Llava folder (loads with AutoModelForImageTextToText.from_pretrained).

    llava-uta-merge-lora --model_path checkpoints/llava-uta-lora --save_model_path checkpoints/llava-uta-merged

The base (LLM + tower + new projector) is rebuilt from the paths recorded in the LoRA folder's config.json
(`--model_base` / `--vision_tower` override them), the projector comes from non_lora_trainables.safetensors,
then the adapter is loaded and merged.
"""

from __future__ import annotations

import argparse
import os

from transformers import AutoProcessor, LlavaForConditionalGeneration

from llava_uta.argparsing import ArgumentParser
from llava_uta.model.llava_builder import load_lora_model


def merge_lora(
    model_path: str | os.PathLike,
    save_model_path: str | os.PathLike,
    model_base: str | None = None,
    vision_tower: str | None = None,
) -> LlavaForConditionalGeneration:
    merged = load_lora_model(model_path, model_base, vision_tower).merge_and_unload()
    merged.save_pretrained(save_model_path)
    AutoProcessor.from_pretrained(model_path).save_pretrained(save_model_path)
    return merged


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", required=True, help="output folder of a --lora_enable run")
    parser.add_argument("--save_model_path", required=True)
    parser.add_argument("--model_base",
                        help="the LLM (folder or GGUF file) the run started from (default: recorded in config.json)")
    parser.add_argument("--vision_tower", help="the tower the run used (default: recorded in config.json)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    merge_lora(args.model_path, args.save_model_path, args.model_base, args.vision_tower)
    print(f"wrote {args.save_model_path}")


if __name__ == "__main__":
    main()
