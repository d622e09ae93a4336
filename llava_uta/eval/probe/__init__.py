"""Probing frozen vision towers: linear probes on image features and per-patch probes on ShapesWorld.

    llava-uta-linprobe   a linear classifier on a tower's frozen CLS / mean-patch features of an ImageFolder
    llava-uta-patchprobe a linear probe per attribute (colour, shape, size) on the patch tokens of ShapesWorld

Both take any tower the project loads (`--tower [LABEL=]SOURCE`, a model source: docs/model-sources.md) and,
with `--random-init`, the same architecture with fresh seeded weights: the floor a pre-trained tower must beat.
"""
