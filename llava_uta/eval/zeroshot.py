"""Zero-shot classification and image-text retrieval (the UTA / CLIP protocol, paper.md §1.9).

Classification: each class weight is the mean of the L2-normalised text embeddings of its prompts (one per
template), re-normalised; logits = 100 * normalised image embedding @ weights; top-1 / top-5 as fractions.
Retrieval: cosine similarity between all images and all captions; image->text counts an image as found at K
if any of its captions ranks in the top K; text->image counts a caption as found if its image does.

    llava-uta-zeroshot --model uta --checkpoint uta_b16.pt --imagenet val/ --out results.json
    llava-uta-zeroshot --model uta --checkpoint runs/uta/student.safetensors \\
        --text-model openclip:EVA01-g-14-plus --text-weights teacher.bin --imagenet val/ --out student.json
    llava-uta-zeroshot --model openclip:ViT-B-16 --checkpoint vitb16.bin --retrieval coco_test.json --out r.json
"""

from __future__ import annotations

import argparse
import json
import os
from contextlib import nullcontext

import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from llava_uta.eval.clip_models import ZeroShotModel, load_zeroshot_model
from llava_uta.eval.zeroshot_data import CaptionedImages, class_folder, clip_eval_transform, load_json_list
from llava_uta.io_utils import write_json_atomic

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
    zs: ZeroShotModel, loader: DataLoader, device: torch.device, amp: bool, desc: str
) -> tuple[Tensor, Tensor | None]:
    """Normalised image embeddings (N, D) and the loader's labels (if it yields any), in dataset order."""
    features, labels = [], []
    for batch in tqdm(loader, desc=desc, unit="batch"):
        images, batch_labels = batch if isinstance(batch, list | tuple) else (batch, None)
        with _autocast(device, amp):
            features.append(zs.model.encode_image(images.to(device), normalize=True).float().cpu())
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


def zero_shot_classification(
    zs: ZeroShotModel,
    root: str | os.PathLike,
    classnames: list[str],
    templates: list,
    device: torch.device,
    batch_size: int = 64,
    workers: int = 4,
    amp: bool = False,
) -> dict[str, float]:
    dataset = class_folder(root, clip_eval_transform(zs.image_size, zs.mean, zs.std))
    if len(dataset.classes) != len(classnames):
        raise ValueError(f"{root} has {len(dataset.classes)} class folders but {len(classnames)} class names")
    with _autocast(device, amp):
        classifier = build_zero_shot_classifier(
            zs.model, zs.tokenizer, classnames, templates, device=device, use_tqdm=True
        )
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    features, labels = encode_images(zs, loader, device, amp, desc="images")
    logits = 100.0 * features @ classifier.float().cpu()
    return {**topk_accuracy(logits, labels), "num_images": len(dataset), "num_classes": len(classnames)}


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
    image_features, _ = encode_images(zs, loader, device, amp, desc="images")
    text_features = encode_texts(zs, dataset.captions, device, amp, batch_size)
    similarity = image_features @ text_features.T
    recalls = retrieval_recall(similarity, torch.tensor(dataset.caption_image))
    return {**recalls, "num_images": len(dataset), "num_captions": len(dataset.captions)}


# ---- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="'uta' or 'openclip:NAME'")
    p.add_argument("--checkpoint", help="released UTA checkpoint, UTA student .safetensors, or open_clip weights")
    p.add_argument("--text-model", help="openclip:NAME whose text tower and tokenizer pair with a UTA student")
    p.add_argument("--text-weights", help="weights file of --text-model")
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
    return args


def evaluate(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    zs = load_zeroshot_model(args.model, args.checkpoint, args.text_model, args.text_weights)
    zs.model.to(device)
    if args.image_size:
        zs.image_size = args.image_size
    results: dict = {"model": args.model, "checkpoint": args.checkpoint, "text_model": args.text_model}
    if args.imagenet:
        classnames = load_json_list(args.classnames, "class name") if args.classnames else list(IMAGENET_CLASSNAMES)
        templates = load_json_list(args.templates, "template") if args.templates else list(OPENAI_IMAGENET_TEMPLATES)
        results["classification"] = zero_shot_classification(
            zs, args.imagenet, classnames, templates, device, args.batch_size, args.workers, args.amp
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
