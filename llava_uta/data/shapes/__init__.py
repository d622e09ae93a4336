"""ShapesWorld: the embedded default dataset, generated deterministically from a seed."""

from llava_uta.data.shapes.writer import ShapesWorldConfig, build, generate

__all__ = ["ShapesWorldConfig", "build", "generate"]
