"""llava-uta: Unmasked Token Alignment pre-training and LLaVA with a UTA vision tower."""

__version__ = "0.1.0"
