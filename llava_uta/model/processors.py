"""The preprocessing saved with the models: a tower's CLIP image processor, and the LlavaProcessor of a Llava model.

Training, serving and evaluation build their processors here, so an image is preprocessed the same way everywhere.
`--image_aspect_ratio pad` pads to a square with the processor's mean colour before the resize and crop (LLaVA's
expand2square), `square` leaves the image to the resize + centre crop; both are one `LlavaImageProcessor`
(`do_pad` on or off).
"""

from __future__ import annotations

from collections.abc import Sequence

from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from transformers import BaseImageProcessor, CLIPImageProcessor, LlavaImageProcessor, LlavaProcessor
from transformers.image_utils import PILImageResampling

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


def make_processor(model, tokenizer, tower_processor, image_aspect_ratio: str) -> LlavaProcessor:
    """Tokenizer + image processor saved with the model; expands `<image>` exactly as training does (a token-merging
    projector's image token covers F x F patches: the processor counts patches of F times the side)."""
    factor = merge_factor(getattr(model.config, "mm_projector_type", "mlp2x_gelu"))  # llava-hf folders: LLaVA-1.5
    return LlavaProcessor(
        image_processor=make_image_processor(tower_processor, image_aspect_ratio),
        tokenizer=tokenizer,
        patch_size=model.config.vision_config.patch_size * factor,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # the CLS token of the UTA / CLIP tower
    )
