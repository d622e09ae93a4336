"""The model layer: the UTA ViT (uta_vit), its checkpoints (checkpoint, official) and its transformers tower.

Importing it registers the UTA tower ("uta_vision") with transformers' AutoConfig / AutoModel; checkpoint
loading lives in the submodules so that this import stays as light as the registration allows.
"""

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
