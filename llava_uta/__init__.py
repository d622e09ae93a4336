"""llava-uta: Unmasked Token Alignment pre-training and LLaVA with a UTA vision tower."""

from llava_uta import model  # noqa: F401  (importing it registers the UTA tower with transformers' Auto classes)

__version__ = "0.1.0"
