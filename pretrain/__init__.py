"""UTA pre-training: a ViT student aligned to a frozen CLIP teacher on its unmasked tokens."""
