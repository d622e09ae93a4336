"""The model layer: the UTA ViT (uta_vit), its checkpoints (checkpoint, official) and its transformers tower.

Importing it registers the UTA tower ("uta_vision") with transformers' AutoConfig / AutoModel, and the
UTA_VIT_CONFIGS names with timm (timm_models: `timm.create_model("uta_b16_224", ...)`, which reads weight files
through checkpoint / official); the checkpoint helpers themselves are imported from their submodules.
"""

from llava_uta.model import timm_models  # noqa: F401  (registers the UTA ViT configs with timm)
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
