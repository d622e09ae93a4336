"""Data: the ShapesWorld generator and LLaVA-format datasets."""
