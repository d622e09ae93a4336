"""Llava with a token-merging projector (`--mm_projector_type pixel_shuffleF_mlp2x_gelu`).

transformers' Llava builds its projector from the config alone (vision width in, text width out), so a projector that
takes F x F patch tokens at once needs its own model type, `llava_merge`: the same model with `TokenMergeProjector` in
the projector's place. Every other part, key name and method is Llava's. Importing this module registers the type with
AutoConfig and AutoModelForImageTextToText, so `AutoModelForImageTextToText.from_pretrained` loads both kinds.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForImageTextToText, LlavaConfig, LlavaForConditionalGeneration

from llava_uta.model.projector import TokenMergeProjector

LLAVA_MODEL_TYPES = ("llava", "llava_merge")


class LlavaMergeConfig(LlavaConfig):
    model_type = "llava_merge"


class LlavaMergeForConditionalGeneration(LlavaForConditionalGeneration):
    config_class = LlavaMergeConfig

    def __init__(self, config: LlavaMergeConfig):
        super().__init__(config)
        self.model.multi_modal_projector = TokenMergeProjector(config)


AutoConfig.register(LlavaMergeConfig.model_type, LlavaMergeConfig, exist_ok=True)
AutoModelForImageTextToText.register(LlavaMergeConfig, LlavaMergeForConditionalGeneration, exist_ok=True)
