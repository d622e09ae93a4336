"""The preprocessing saved with the models: a tower's CLIP image processor, and the LlavaProcessor of a Llava model.

Training, serving and evaluation build their processors here, so an image is preprocessed the same way everywhere.
`--image_aspect_ratio pad` pads to a square with the processor's mean colour before the resize and crop (LLaVA's
expand2square), `square` leaves the image to the resize + centre crop; both are one `LlavaImageProcessor`
(`do_pad` on or off). With grid tags (`--mm_grid_tags`) `<image>` expands, as in Idefics3 and SmolVLM, to a
`<row_r_col_c>` text tag before each image token and a newline after each row of the (merged) patch grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from transformers import (
    AutoProcessor,
    BaseImageProcessor,
    CLIPImageProcessor,
    LlavaImageProcessor,
    LlavaProcessor,
)
from transformers.image_utils import PILImageResampling, get_image_size, to_numpy_array

from llava_uta.model.merge_llava import LlavaMergeConfig
from llava_uta.model.projector import merge_factor

ASPECT_RATIOS = ("square", "pad")
_PROCESSOR_FIELDS = (
    "do_resize",
    "size",
    "resample",
    "do_center_crop",
    "crop_size",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "do_convert_rgb",
)


def clip_image_processor(
    image_size: int,
    mean: Sequence[float] = OPENAI_DATASET_MEAN,
    std: Sequence[float] = OPENAI_DATASET_STD,
    resample: PILImageResampling = PILImageResampling.BICUBIC,
) -> CLIPImageProcessor:
    """Short-side resize, centre crop, normalise; the defaults (bicubic, OpenAI CLIP mean/std) are UTA's evaluation."""
    return CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        resample=resample,
        image_mean=list(mean),
        image_std=list(std),
    )


def make_image_processor(base: BaseImageProcessor, image_aspect_ratio: str) -> LlavaImageProcessor:
    """The tower's (CLIP) image processor as a LlavaImageProcessor that pads to square for `pad`."""
    if image_aspect_ratio not in ASPECT_RATIOS:
        raise ValueError(f"image_aspect_ratio must be one of {ASPECT_RATIOS}, got {image_aspect_ratio!r}")
    settings = {k: v for k, v in base.to_dict().items() if k in _PROCESSOR_FIELDS and v is not None}
    return LlavaImageProcessor(**settings, do_pad=image_aspect_ratio == "pad")


class LlavaGridTagProcessor(LlavaProcessor):
    """A LlavaProcessor whose `<image>` expands to `<row_r_col_c><image>` for each image token of the grid, row by
    row, a newline after each row: the LLM is told in text where each image token sits."""

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        if self.vision_feature_select_strategy != "default":
            raise ValueError("grid tags tag patch tokens: they need vision_feature_select_strategy 'default' (no CLS)")
        height, width = get_image_size(to_numpy_array(image_inputs["pixel_values"][image_idx]))
        rows, cols = height // self.patch_size, width // self.patch_size
        return "".join(
            "".join(f"<row_{r}_col_{c}>{self.image_token}" for c in range(1, cols + 1)) + "\n"
            for r in range(1, rows + 1)
        )


# by class name, so that AutoProcessor.from_pretrained finds a saved LlavaGridTagProcessor
AutoProcessor.register(LlavaMergeConfig, LlavaGridTagProcessor, exist_ok=True)


def make_processor(model, tokenizer, tower_processor, image_aspect_ratio: str) -> LlavaProcessor:
    """Tokenizer + image processor saved with the model; expands `<image>` exactly as training does (a token-merging
    projector's image token covers F x F patches: the processor counts patches of F times the side)."""
    factor = merge_factor(getattr(model.config, "mm_projector_type", "mlp2x_gelu"))  # llava-hf folders: LLaVA-1.5
    processor_class = LlavaGridTagProcessor if getattr(model.config, "mm_grid_tags", False) else LlavaProcessor
    return processor_class(
        image_processor=make_image_processor(tower_processor, image_aspect_ratio),
        tokenizer=tokenizer,
        patch_size=model.config.vision_config.patch_size * factor,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # the CLS token of the UTA / CLIP tower
    )


def image_text(processor: LlavaProcessor) -> str:
    """The text the processor puts in place of one `<image>` (training expands `<image>` to the same)."""
    size = processor.image_processor.crop_size
    pixels = np.zeros((3, size["height"], size["width"]), dtype=np.float32)
    return processor.replace_image_token({"pixel_values": [pixels]}, 0)
