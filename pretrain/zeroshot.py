"""Zero-shot accuracy during training: pre-training (the teacher's text tower) and contrastive fine-tuning (its own).

The class weights are built from a CLIP text tower (mean of normalised prompt embeddings, re-normalised, open_clip's
`build_zero_shot_classifier`); an image encoder's CLIP-space embedding is classified against them with logits x100.
"""

from __future__ import annotations

import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from torch import nn
from torch.utils.data import DataLoader

from llava_uta.eval.zeroshot import topk_accuracy
from llava_uta.eval.zeroshot_data import class_folder, clip_eval_transform, load_json_list


class ZeroShotProbe:
    """Classifies an ImageFolder with any image encoder whose `encode_image` lands in the text tower's space."""

    def __init__(self, names: list[str], prompts: list[str], loader: DataLoader, device: torch.device):
        self.names, self.prompts, self.loader, self.device = names, prompts, loader, device
        self.classifier: torch.Tensor | None = None
        self.teacher_accuracy: dict[str, float] = {}

    @classmethod
    def build(cls, folder: str, image_size: int, device: torch.device, classnames: str | None = None,
              templates: str | None = None, batch_size: int = 256, workers: int = 2) -> ZeroShotProbe:
        names = load_json_list(classnames, "class name") if classnames else list(IMAGENET_CLASSNAMES)
        prompts = load_json_list(templates, "template") if templates else list(OPENAI_IMAGENET_TEMPLATES)
        dataset = class_folder(folder, clip_eval_transform(image_size))
        if len(dataset.classes) != len(names):
            raise ValueError(f"{folder} has {len(dataset.classes)} class folders but {len(names)} class names")
        return cls(names, prompts, DataLoader(dataset, batch_size=batch_size, num_workers=workers), device)

    @torch.no_grad()
    def set_text_tower(self, clip: nn.Module, tokenizer) -> None:
        """(Re)build the class weights with `clip.encode_text` (eval mode; the caller restores train mode)."""
        clip.eval()
        self.classifier = build_zero_shot_classifier(clip, tokenizer, self.names, self.prompts,
                                                     device=self.device).float()

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """top-1 / top-5 of `model.encode_image` (eval mode; the caller restores train mode)."""
        if self.classifier is None:
            raise RuntimeError("ZeroShotProbe.set_text_tower must be called before evaluate")
        model.eval()
        logits, labels = [], []
        dtype = next(model.parameters()).dtype
        for images, batch_labels in self.loader:
            features = model.encode_image(images.to(self.device, dtype)).float()
            logits.append(100.0 * nn.functional.normalize(features, dim=-1) @ self.classifier)
            labels.append(batch_labels.to(self.device))
        return topk_accuracy(torch.cat(logits).cpu(), torch.cat(labels).cpu())
