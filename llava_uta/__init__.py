"""llava-uta: Unmasked Token Alignment pre-training and LLaVA with a UTA vision tower.

Importing the package imports nothing else (`llava_uta.constants` and `llava_uta.conversation` need no torch).
`import llava_uta.model` (and so any module of the model layer) registers the UTA tower with transformers'
AutoConfig / AutoModel and the UTA ViT configs with timm.
"""

__version__ = "0.1.0"
