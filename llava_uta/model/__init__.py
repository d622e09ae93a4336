"""The model layer: the UTA ViT (uta_vit), its checkpoints (checkpoint, official) and its transformers tower.

Importing it registers the UTA tower ("uta_vision") and the symbolic diagnostic tower ("shapes_symbolic") with
transformers' AutoConfig / AutoModel, Llava with a token-merging projector ("llava_merge") with
AutoModelForImageTextToText, and the
UTA_VIT_CONFIGS names with timm (timm_models: `timm.create_model("uta_b16_224", ...)`, which reads weight files
through checkpoint / official); the checkpoint helpers themselves are imported from their submodules.
"""

from llava_uta.model import merge_llava, symbolic_tower, timm_models  # noqa: F401  (registrations)
from llava_uta.model.hf_vision import UTAVisionConfig, UTAVisionModel
from llava_uta.model.uta_vit import UTA_VIT_CONFIGS, UTAViT, UTAViTConfig, UTAViTOutput, build_uta_vit

__all__ = [
    "UTA_VIT_CONFIGS",
    "UTAViT",
    "UTAViTConfig",
    "UTAViTOutput",
    "UTAVisionConfig",
    "UTAVisionModel",
    "build_uta_vit",
]
