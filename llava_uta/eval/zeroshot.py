"""Zero-shot classification and image-text retrieval (the UTA / CLIP protocol, docs/uta.md#zero-shot-evaluation).

Classification: each class weight is the mean of the L2-normalised text embeddings of its prompts (one per
template), re-normalised; logits = 100 * normalised image embedding @ weights; top-1 / top-5 as fractions.
Retrieval: cosine similarity between all images and all captions; image->text counts an image as found at K
if any of its captions ranks in the top K; text->image counts a caption as found if its image does.

    llava-uta-zeroshot --model uta:uta_b16.pt --imagenet val/ --out results.json
    llava-uta-zeroshot --model uta:runs/uta/student.safetensors \\
        --text-model open_clip:EVA01-g-14-plus@teacher.bin --imagenet val/ --out student.json
    llava-uta-zeroshot --model open_clip:ViT-B-16@vitb16.bin --retrieval coco_test.json --out r.json

--model and --text-model are model sources (docs/model-sources.md).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from llava_uta.argparsing import ArgumentParser
from llava_uta.eval.clip_models import ZeroShotModel, load_zeroshot_model
from llava_uta.eval.zeroshot_data import CaptionedImages, class_folder, clip_eval_transform, load_json_list
from llava_uta.io_utils import write_json_atomic
from llava_uta.model.model_source import with_weights_flag

# ---- metrics


def topk_accuracy(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Fraction of rows whose label is among the k largest logits, for each k (k capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return {f"top{k}": hits[:, :k].any(dim=1).double().mean().item() for k in ks}


def retrieval_recall(similarity: Tensor, caption_image: Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """R@K both ways from an (images, captions) similarity matrix; caption_image[j] is caption j's image."""
    n_images, n_captions = similarity.shape
    ranking_t = similarity.argsort(dim=1, descending=True)  # captions ranked per image
    hit_t = caption_image[ranking_t] == torch.arange(n_images)[:, None]
    ranking_i = similarity.T.argsort(dim=1, descending=True)  # images ranked per caption
    hit_i = ranking_i == caption_image[:, None]
    recalls = {}
    for k in ks:
        recalls[f"image_to_text_R@{k}"] = hit_t[:, :k].any(dim=1).double().mean().item()
        recalls[f"text_to_image_R@{k}"] = hit_i[:, :k].any(dim=1).double().mean().item()
    return recalls


# ---- evaluation loops


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.float16) if amp and device.type == "cuda" else nullcontext()


@torch.no_grad()
def encode_images(
    model: nn.Module, loader: DataLoader, device: torch.device, amp: bool = False, desc: str | None = None
) -> tuple[Tensor, Tensor | None]:
    """Normalised `model.encode_image` embeddings (N, D) on the CPU and the loader's labels (if it yields any), in
    dataset order; images are cast to the model's dtype. `desc` names a progress bar (None: no bar)."""
    features, labels = [], []
    dtype = next(model.parameters()).dtype
    for batch in tqdm(loader, desc=desc, unit="batch", disable=desc is None):
        images, batch_labels = batch if isinstance(batch, list | tuple) else (batch, None)
        with _autocast(device, amp):
            features.append(F.normalize(model.encode_image(images.to(device, dtype)).float(), dim=-1).cpu())
        if batch_labels is not None:
            labels.append(batch_labels)
    return torch.cat(features), torch.cat(labels) if labels else None


@torch.no_grad()
def encode_texts(zs: ZeroShotModel, texts: list[str], device: torch.device, amp: bool, batch_size: int) -> Tensor:
    chunks = []
    for start in tqdm(range(0, len(texts), batch_size), desc="captions", unit="batch"):
        with _autocast(device, amp):
            tokens = zs.tokenizer(texts[start : start + batch_size]).to(device)
            chunks.append(zs.model.encode_text(tokens, normalize=True).float().cpu())
    return torch.cat(chunks)


def class_prompts(
    classnames: str | os.PathLike | None = None, templates: str | os.PathLike | None = None
) -> tuple[list[str], list[str]]:
    """Class names and prompt templates from JSON list files; by default open_clip's ImageNet class names and
    OpenAI's 80 templates."""
    names = load_json_list(classnames, "class name") if classnames else list(IMAGENET_CLASSNAMES)
    prompts = load_json_list(templates, "template") if templates else list(OPENAI_IMAGENET_TEMPLATES)
    return names, prompts


class ZeroShotProbe:
    """Zero-shot classification of a class folder with any image encoder whose `encode_image` lands in the space of
    a CLIP text tower: the CLI's classification, and the periodic evaluation of the training loops.

    The class weights are built once per text tower (`set_text_tower`), so a loop with a frozen text tower builds
    them once and one that trains its text tower rebuilds them before each evaluation.
    """

    def __init__(self, names: list[str], prompts: list[str], loader: DataLoader, device: torch.device,
                 amp: bool = False, progress: bool = False):
        self.names, self.prompts, self.loader, self.device = names, prompts, loader, device
        self.amp, self.progress = amp, progress
        self.classifier: Tensor | None = None

    @classmethod
    def build(cls, folder: str | os.PathLike, image_size: int, device: torch.device,
              classnames: str | os.PathLike | None = None, templates: str | os.PathLike | None = None,
              batch_size: int = 256, workers: int = 2, mean: tuple[float, ...] = OPENAI_DATASET_MEAN,
              std: tuple[float, ...] = OPENAI_DATASET_STD, amp: bool = False, progress: bool = False
              ) -> ZeroShotProbe:
        """The probe of a class folder; `classnames` / `templates` are JSON list files (see `class_prompts`)."""
        names, prompts = class_prompts(classnames, templates)
        dataset = class_folder(folder, clip_eval_transform(image_size, mean, std))
        if len(dataset.classes) != len(names):
            raise ValueError(f"{folder} has {len(dataset.classes)} class folders but {len(names)} class names")
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
        return cls(names, prompts, loader, device, amp, progress)

    @torch.no_grad()
    def set_text_tower(self, clip: nn.Module, tokenizer: Callable[[list[str]], Tensor]) -> None:
        """(Re)build the class weights with `clip.encode_text` (eval mode; the caller restores train mode)."""
        clip.eval()
        with _autocast(self.device, self.amp):
            classifier = build_zero_shot_classifier(clip, tokenizer, self.names, self.prompts, device=self.device,
                                                    use_tqdm=self.progress)
        self.classifier = classifier.float().cpu()

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """top-1 / top-5 of `model.encode_image` (eval mode; the caller restores train mode)."""
        if self.classifier is None:
            raise RuntimeError("ZeroShotProbe.set_text_tower must be called before evaluate")
        model.eval()
        features, labels = encode_images(model, self.loader, self.device, self.amp, "images" if self.progress else None)
        return topk_accuracy(100.0 * features @ self.classifier, labels)


def zero_shot_classification(
    zs: ZeroShotModel,
    root: str | os.PathLike,
    classnames: str | os.PathLike | None,
    templates: str | os.PathLike | None,
    device: torch.device,
    batch_size: int = 64,
    workers: int = 4,
    amp: bool = False,
) -> dict[str, float]:
    """top-1 / top-5 of a class folder; `classnames` / `templates` are JSON list files (None: ImageNet, OpenAI)."""
    probe = ZeroShotProbe.build(root, zs.image_size, device, classnames, templates, batch_size, workers, zs.mean,
                                zs.std, amp, progress=True)
    probe.set_text_tower(zs.model, zs.tokenizer)
    return {**probe.evaluate(zs.model), "num_images": len(probe.loader.dataset), "num_classes": len(probe.names)}


def zero_shot_retrieval(
    zs: ZeroShotModel,
    captions_file: str | os.PathLike,
    device: torch.device,
    batch_size: int = 64,
    workers: int = 4,
    amp: bool = False,
    split: str | None = None,
) -> dict[str, float]:
    dataset = CaptionedImages(captions_file, clip_eval_transform(zs.image_size, zs.mean, zs.std), split)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    image_features, _ = encode_images(zs.model, loader, device, amp, desc="images")
    text_features = encode_texts(zs, dataset.captions, device, amp, batch_size)
    similarity = image_features @ text_features.T
    recalls = retrieval_recall(similarity, torch.tensor(dataset.caption_image))
    return {**recalls, "num_images": len(dataset), "num_captions": len(dataset.captions)}


# ---- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="SOURCE",
                   help="uta:FILE (a released UTA checkpoint, or a student with --text-model) or an open_clip model "
                   "(open_clip:NAME@WEIGHTS, open_clip:local-dir:DIR); see docs/model-sources.md")
    p.add_argument("--checkpoint", help="deprecated, goes in the next release: give --model uta:FILE or "
                   "open_clip:NAME@FILE")
    p.add_argument("--text-model", metavar="SOURCE",
                   help="the open_clip model (e.g. open_clip:local-dir:DIR) whose text tower and tokenizer pair "
                   "with a UTA student")
    p.add_argument("--text-weights", help="deprecated, goes in the next release: give --text-model open_clip:NAME@FILE")
    p.add_argument("--imagenet", help="class-folder root for zero-shot classification")
    p.add_argument("--classnames", help="JSON list of class names, in sorted folder order (default: ImageNet)")
    p.add_argument("--templates", help='JSON list of prompt templates containing "{}" (default: OpenAI 80)')
    p.add_argument("--retrieval", help="captions file (Karpathy JSON, image/caption JSON list, or filepath,title CSV)")
    p.add_argument("--split", help="Karpathy split to keep, e.g. test")
    p.add_argument("--out", required=True, help="results JSON, written atomically")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--image-size", type=int, help="override the model's input size")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true", help="fp16 autocast on CUDA (the official evaluation's setting)")
    args = p.parse_args(argv)
    if not args.imagenet and not args.retrieval:
        p.error("give --imagenet and/or --retrieval")
    args.model = with_weights_flag(args.model, args.checkpoint, "--model", "--checkpoint")
    args.text_model = with_weights_flag(args.text_model, args.text_weights, "--text-model", "--text-weights")
    return args


def evaluate(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    zs = load_zeroshot_model(args.model, args.text_model)
    zs.model.to(device)
    if args.image_size:
        zs.image_size = args.image_size
    results: dict = {"model": args.model, "text_model": args.text_model}
    if args.imagenet:
        results["classification"] = zero_shot_classification(
            zs, args.imagenet, args.classnames, args.templates, device, args.batch_size, args.workers, args.amp
        )
    if args.retrieval:
        results["retrieval"] = zero_shot_retrieval(
            zs, args.retrieval, device, args.batch_size, args.workers, args.amp, args.split
        )
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = evaluate(args)
    write_json_atomic(args.out, results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
