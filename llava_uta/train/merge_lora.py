"""Merge a LoRA training output into a plain Llava folder (loads with LlavaForConditionalGeneration.from_pretrained).

    llava-uta-merge-lora --model_path checkpoints/llava-uta-lora --save_model_path checkpoints/llava-uta-merged

The base (LLM + tower + new projector) is rebuilt from the paths recorded in the LoRA folder's config.json
(`--model_base` / `--vision_tower` override them), the projector comes from non_lora_trainables.safetensors,
then the adapter is loaded and merged.
"""

from __future__ import annotations

import argparse
import os

from peft import PeftModel
from transformers import AutoProcessor, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

from llava_uta.model.llava_builder import SELECT_FEATURES, build_llava
from llava_uta.model.projector import read_weights
from llava_uta.train.trainer import NON_LORA_FILE


def load_lora_model(
    model_path: str | os.PathLike, model_base: str | None = None, vision_tower: str | None = None
) -> PeftModel:
    """The LoRA-trained model, unmerged: rebuilt base + trained projector + adapter."""
    config = LlavaConfig.from_pretrained(model_path)
    model_base = model_base or config.mm_language_model
    vision_tower = vision_tower or config.mm_vision_tower
    if not model_base or not vision_tower:
        raise ValueError("the LoRA config does not record the base LLM / tower: pass --model_base and --vision_tower")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    select_feature = {v: k for k, v in SELECT_FEATURES.items()}[config.vision_feature_select_strategy]
    base = build_llava(
        model_base, vision_tower, tokenizer, config.mm_projector_type, config.vision_feature_layer, select_feature
    )
    if (
        base.config.image_token_id != config.image_token_id
        or base.config.text_config.vocab_size != config.text_config.vocab_size
    ):
        raise ValueError("the rebuilt base does not match the LoRA run's vocabulary (different LLM or tokenizer?)")
    projector = read_weights(os.path.join(model_path, NON_LORA_FILE))
    missing, unexpected = base.load_state_dict(projector, strict=False)
    if unexpected or any(k.startswith("model.multi_modal_projector.") for k in missing):
        raise ValueError(f"{NON_LORA_FILE} does not fit the projector: unexpected {unexpected}")
    return PeftModel.from_pretrained(base, model_path)


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", required=True, help="output folder of a --lora_enable run")
    parser.add_argument("--save_model_path", required=True)
    parser.add_argument("--model_base", help="the LLM the run started from (default: recorded in config.json)")
    parser.add_argument("--vision_tower", help="the tower the run used (default: recorded in config.json)")
    args = parser.parse_args(argv)
    merge_lora(args.model_path, args.save_model_path, args.model_base, args.vision_tower)
    print(f"wrote {args.save_model_path}")


if __name__ == "__main__":
    main()
