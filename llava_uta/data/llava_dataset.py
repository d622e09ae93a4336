"""LLaVA-format training data (CC-3M-595K / Instruct-150K JSON) for transformers' Llava, read lazily.

Each item is tokenized and its image decoded when it is fetched; only the parsed JSON list stays in memory.
Images go through the model's `LlavaImageProcessor` (llava_uta.model.processors: `square` or `pad`), the one saved
with the model, so generation preprocesses identically.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import Dataset
from transformers import BaseImageProcessor

from llava_uta.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX
from llava_uta.conversation import get_template
from llava_uta.data.preprocess import BadSampleError, build_conversation, tokenize_conversation

logger = logging.getLogger(__name__)


class LazySupervisedDataset(Dataset):
    """LLaVA JSON samples as input_ids / labels / pixel_values (pixel_values only for samples with an image)."""

    def __init__(
        self,
        data_path: str | os.PathLike,
        tokenizer,
        image_processor: BaseImageProcessor,
        version: str,
        image_token_id: int,
        image_text: str,
        model_max_length: int,
        image_folder: str | os.PathLike | None = None,
        skip_bad_samples: bool = False,
    ):
        if not tokenizer.is_fast:
            raise ValueError("a tokenizer with offset mappings (tokenizers backend) is needed to mask labels")
        with open(data_path) as f:
            self.samples = json.load(f)
        if not isinstance(self.samples, list):
            raise ValueError(f"{data_path}: expected a JSON list of samples")
        self.data_path = str(data_path)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.template = get_template(version)
        self.image_token_id = image_token_id
        self.image_text = image_text  # what one <image> becomes (the model processor's image text)
        self.image_tokens = image_text.count(DEFAULT_IMAGE_TOKEN)
        self.model_max_length = model_max_length
        self.image_folder = image_folder
        self.skip_bad_samples = skip_bad_samples
        self.num_skipped = 0  # per process: each dataloader worker counts its own

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def modality_lengths(self) -> list[int]:
        """Approximate lengths (words + image tokens), positive for samples with an image, negative without."""
        lengths = []
        for sample in self.samples:
            words = sum(len(str(turn.get("value", "")).split()) for turn in sample.get("conversations", []))
            lengths.append(words + self.image_tokens if "image" in sample else -max(words, 1))
        return lengths

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        for attempt in range(len(self)):
            i = (index + attempt) % len(self)
            try:
                return self.load(i)
            except BadSampleError as err:
                if not self.skip_bad_samples:
                    raise
                self.num_skipped += 1
                logger.warning("skipping bad sample (%d skipped in this process): %s", self.num_skipped, err)
        raise BadSampleError(f"{self.data_path}: every sample is bad")

    def load(self, i: int) -> dict[str, torch.Tensor]:
        """Sample `i`, or BadSampleError naming its id and image file."""
        sample = self.samples[i]
        sample_id = sample.get("id", f"#{i}") if isinstance(sample, dict) else f"#{i}"
        image_file = sample.get("image") if isinstance(sample, dict) else None
        where = f"sample {sample_id!r} of {self.data_path}" + (f" (image {image_file!r})" if image_file else "")
        try:
            if not isinstance(sample, dict):
                raise ValueError("a sample must be a JSON object")
            conv = build_conversation(sample.get("conversations"), self.template, has_image=image_file is not None)
            tokens = tokenize_conversation(
                conv, self.tokenizer, self.image_token_id, self.image_text, self.model_max_length
            )
            item = {"input_ids": torch.tensor(tokens.input_ids), "labels": torch.tensor(tokens.labels)}
            if image_file is not None:
                item["pixel_values"] = self.load_image(image_file)
        except (ValueError, OSError) as err:
            raise BadSampleError(f"{where}: {err}") from err
        return item

    def load_image(self, image_file: str) -> torch.Tensor:
        if self.image_folder is None:
            raise ValueError("the sample has an image but no --image_folder was given")
        path = os.path.join(self.image_folder, image_file)
        with Image.open(path) as image:
            image = image.convert("RGB")  # decodes; truncated or corrupt files raise OSError here
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]


@dataclass
class DataCollatorForSupervisedDataset:
    """Right-pads a batch; stacks the images of the samples that have one (Llava splices them in order)."""

    pad_token_id: int

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = max(len(item["input_ids"]) for item in items)
        batch = {
            "input_ids": torch.full((len(items), length), self.pad_token_id, dtype=torch.long),
            "labels": torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long),
            "attention_mask": torch.zeros(len(items), length, dtype=torch.long),
        }
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            batch["input_ids"][row, :n] = item["input_ids"]
            batch["labels"][row, :n] = item["labels"]
            batch["attention_mask"][row, :n] = 1
        images = [item["pixel_values"] for item in items if "pixel_values" in item]
        if images:
            batch["pixel_values"] = torch.stack(images)
        return batch
