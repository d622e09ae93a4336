"""Plain constants shared across the package (importable without torch)."""

DEFAULT_IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100
