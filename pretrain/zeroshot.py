"""Zero-shot accuracy of the student during pre-training, with the teacher's CLIP text tower.

The class weights are built once from the teacher's text tower (mean of normalised prompt embeddings,
re-normalised); the student's CLIP-space CLS embedding is classified against them with logits x100.
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
    """Classifies an ImageFolder with any image encoder whose `encode_image` lands in the teacher's space."""

    def __init__(self, classifier: torch.Tensor, loader: DataLoader, device: torch.device):
        self.classifier, self.loader, self.device = classifier, loader, device
        self.teacher_accuracy: dict[str, float] = {}

    @classmethod
    def build(cls, clip: nn.Module, tokenizer, folder: str, image_size: int, device: torch.device,
              classnames: str | None = None, templates: str | None = None, batch_size: int = 256,
              workers: int = 2) -> ZeroShotProbe:
        names = load_json_list(classnames, "class name") if classnames else list(IMAGENET_CLASSNAMES)
        prompts = load_json_list(templates, "template") if templates else list(OPENAI_IMAGENET_TEMPLATES)
        dataset = class_folder(folder, clip_eval_transform(image_size))
        if len(dataset.classes) != len(names):
            raise ValueError(f"{folder} has {len(dataset.classes)} class folders but {len(names)} class names")
        with torch.no_grad():
            classifier = build_zero_shot_classifier(clip.to(device), tokenizer, names, prompts, device=device)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
        return cls(classifier.float(), loader, device)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """top-1 / top-5 of `model.encode_image` (eval mode; the caller restores train mode)."""
        model.eval()
        logits, labels = [], []
        dtype = next(model.parameters()).dtype
        for images, batch_labels in self.loader:
            features = model.encode_image(images.to(self.device, dtype)).float()
            logits.append(100.0 * nn.functional.normalize(features, dim=-1) @ self.classifier)
            labels.append(batch_labels.to(self.device))
        return topk_accuracy(torch.cat(logits).cpu(), torch.cat(labels).cpu())
