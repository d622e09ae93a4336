"""Zero-shot classification and retrieval: metrics on hand-made cases, the CLI on constructed folders."""

from __future__ import annotations

import csv
import json

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from llava_uta.eval.clip_models import load_zeroshot_model
from llava_uta.eval.zeroshot import main, retrieval_recall, topk_accuracy
from llava_uta.eval.zeroshot_data import CaptionedImages, clip_eval_transform
from llava_uta.model.checkpoint import save_uta_vit
from llava_uta.model.uta_vit import build_uta_vit

CLASSNAMES = ["red square", "blue circle", "green triangle", "yellow star", "purple hexagon", "orange cross", "cat"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]
TINY_CLIP = {  # an open_clip config small enough for the tests, registered under the name "uta-test-clip"
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def test_topk_accuracy_hand_made():
    logits = torch.tensor([[9.0, 1, 2, 3, 4, 5, 0], [1.0, 9, 8, 7, 6, 5, 4], [0.0, 1, 2, 3, 4, 5, 6]])
    labels = torch.tensor([0, 6, 0])  # rank 1, rank 6, rank 7
    assert topk_accuracy(logits, labels) == {"top1": pytest.approx(1 / 3), "top5": pytest.approx(1 / 3)}
    assert topk_accuracy(logits, torch.tensor([0, 2, 2]), ks=(1, 3)) == {  # ranks 1, 2, 5
        "top1": pytest.approx(1 / 3),
        "top3": pytest.approx(2 / 3),
    }


def test_retrieval_recall_hand_made():
    # 3 images; captions 0,1 -> image 0, caption 2 -> image 1, caption 3 -> image 2
    similarity = torch.tensor(
        [
            [0.9, 0.1, 0.8, 0.0],  # image 0: best caption 0 (its own) -> i2t hit at 1
            [0.7, 0.6, 0.2, 0.5],  # image 1: its caption 2 is ranked last -> hit only at 4
            [0.1, 0.2, 0.3, 0.4],  # image 2: its caption 3 ranked first
        ]
    )
    caption_image = torch.tensor([0, 0, 1, 2])
    r = retrieval_recall(similarity, caption_image, ks=(1, 2, 4))
    assert r["image_to_text_R@1"] == pytest.approx(2 / 3)
    assert r["image_to_text_R@2"] == pytest.approx(2 / 3)
    assert r["image_to_text_R@4"] == pytest.approx(1.0)
    # rank of each caption's own image: c0 -> 1, c1 -> 3, c2 -> 3, c3 -> 2
    assert r["text_to_image_R@1"] == pytest.approx(1 / 4)
    assert r["text_to_image_R@2"] == pytest.approx(2 / 4)
    assert r["text_to_image_R@4"] == pytest.approx(1.0)


def _random_images(folder, n, size=32, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        paths.append(folder / f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def _expected_logits(zs, paths):
    """Per-image class logits computed prompt by prompt, the slow obvious way."""
    transform = clip_eval_transform(zs.image_size, zs.mean, zs.std)
    with torch.no_grad():
        images = zs.model.encode_image(torch.stack([transform(Image.open(p).convert("RGB")) for p in paths]))
        weights = []
        for name in CLASSNAMES:
            prompts = [F.normalize(zs.model.encode_text(zs.tokenizer([t.format(name)])), dim=-1) for t in TEMPLATES]
            weights.append(F.normalize(torch.cat(prompts).mean(dim=0), dim=-1))
    return 100 * F.normalize(images, dim=-1) @ torch.stack(weights).T


def _class_folder_with_known_answers(root, zs):
    """10 images filed under their 1st (5 images), 2nd (3) or last-ranked (2) class: top-1 0.5, top-5 0.8."""
    paths = _random_images(root / "pool", 10)
    ranks = _expected_logits(zs, paths).argsort(dim=1, descending=True)
    for i, path in enumerate(paths):
        label = ranks[i, 0] if i < 5 else ranks[i, 1] if i < 8 else ranks[i, -1]
        (root / "val" / f"c{label}").mkdir(parents=True, exist_ok=True)
        path.rename(root / "val" / f"c{label}" / path.name)
    for c in range(len(CLASSNAMES)):
        (root / "val" / f"c{c}").mkdir(exist_ok=True)
    (root / "classnames.json").write_text(json.dumps(CLASSNAMES))
    (root / "templates.json").write_text(json.dumps(TEMPLATES))


def _run_classification(tmp_path, *model_args):
    out = tmp_path / "results" / "zs.json"
    main(
        [
            *model_args,
            "--imagenet",
            str(tmp_path / "val"),
            "--classnames",
            str(tmp_path / "classnames.json"),
            "--templates",
            str(tmp_path / "templates.json"),
            "--out",
            str(out),
            "--workers",
            "0",
            "--batch-size",
            "4",
        ]
    )
    return json.loads(out.read_text())


def test_classification_with_an_official_checkpoint(tmp_path, official_checkpoint):
    zs = load_zeroshot_model(f"uta:{official_checkpoint}")
    _class_folder_with_known_answers(tmp_path, zs)
    results = _run_classification(tmp_path, "--model", f"uta:{official_checkpoint}")
    assert results["classification"] == {"top1": 0.5, "top5": 0.8, "num_images": 10, "num_classes": 7}
    assert not list((tmp_path / "results").glob(".*.tmp"))  # the temporary file was renamed into place


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """An open_clip model registered as "uta-test-clip", saved as a weights file."""
    root = tmp_path_factory.mktemp("open_clip")
    (root / "uta-test-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(root / "uta-test-clip.json")
    torch.manual_seed(0)
    torch.save(open_clip.create_model("uta-test-clip").state_dict(), root / "clip.pt")
    return root / "clip.pt"


def test_classification_with_a_student_and_teacher_text(tmp_path, tiny_clip):
    torch.manual_seed(0)
    save_uta_vit(build_uta_vit("uta_test_p8_32"), tmp_path / "student.safetensors")
    student, text = f"uta:{tmp_path / 'student.safetensors'}", f"open_clip:uta-test-clip@{tiny_clip}"
    zs = load_zeroshot_model(student, text)
    _class_folder_with_known_answers(tmp_path, zs)
    assert _run_classification(tmp_path, "--model", student, "--text-model", text)["classification"]["top5"] == 0.8
    with pytest.raises(ValueError, match="--text-model"):
        load_zeroshot_model(student)
    old = [  # the last release's spelling
        "--model",
        "uta",
        "--checkpoint",
        str(tmp_path / "student.safetensors"),
        "--text-model",
        "openclip:uta-test-clip",
        "--text-weights",
        str(tiny_clip),
    ]
    with pytest.warns(FutureWarning) as warned:
        results = _run_classification(tmp_path, *old)
    assert results["classification"]["top5"] == 0.8 and results["model"] == student
    messages = [str(w.message) for w in warned]
    assert any(f"write --model {student} " in m for m in messages)
    assert any("'openclip:'" in m and "write 'open_clip:uta-test-clip'" in m for m in messages)
    assert any(f"write --text-model {text} " in m for m in messages)


def test_classification_with_an_open_clip_model(tmp_path, tiny_clip):
    source = f"open_clip:uta-test-clip@{tiny_clip}"
    zs = load_zeroshot_model(source)
    _class_folder_with_known_answers(tmp_path, zs)
    results = _run_classification(tmp_path, "--model", source)
    assert (results["classification"]["top1"], results["classification"]["top5"]) == (0.5, 0.8)
    with pytest.warns(FutureWarning) as warned:  # the last release's prefix and --checkpoint
        old = _run_classification(tmp_path, "--model", "openclip:uta-test-clip", "--checkpoint", str(tiny_clip))
    assert old["classification"] == results["classification"] and old["model"] == source
    assert any(f"write --model {source} " in str(w.message) for w in warned)


def test_retrieval_from_csv_and_karpathy_json(tmp_path, official_checkpoint):
    paths = _random_images(tmp_path / "images", 4, seed=1)
    captions = {0: ["a dog", "a dog on grass"], 1: ["a red car"], 2: ["two cats", "cats", "a cat pair"], 3: ["sea"]}
    with (tmp_path / "captions.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "title"])
        writer.writerows([f"images/{paths[i].name}", c] for i, cs in captions.items() for c in cs)
    karpathy = {
        "images": [
            {"filepath": "images", "filename": paths[i].name, "split": "test", "sentences": [{"raw": c} for c in cs]}
            for i, cs in captions.items()
        ]
    }
    karpathy["images"].append({"filepath": "images", "filename": "x.png", "split": "train", "sentences": []})
    (tmp_path / "karpathy.json").write_text(json.dumps(karpathy))
    from_csv = CaptionedImages(tmp_path / "captions.csv", transform=lambda im: im)
    from_json = CaptionedImages(tmp_path / "karpathy.json", transform=lambda im: im, split="test")
    assert from_csv.captions == from_json.captions and from_csv.caption_image == [0, 0, 1, 2, 2, 2, 3]
    assert from_csv.images == from_json.images == [str(p) for p in paths]

    out = tmp_path / "retrieval.json"
    main(
        [
            "--model",
            f"uta:{official_checkpoint}",
            "--retrieval",
            str(tmp_path / "captions.csv"),
            "--out",
            str(out),
            "--workers",
            "0",
        ]
    )
    results = json.loads(out.read_text())["retrieval"]
    zs = load_zeroshot_model(f"uta:{official_checkpoint}")
    transform = clip_eval_transform(32)
    with torch.no_grad():
        img = zs.model.encode_image(torch.stack([transform(Image.open(p).convert("RGB")) for p in paths]), True)
        txt = zs.model.encode_text(zs.tokenizer(from_csv.captions), True)
    sim = img @ txt.T
    owner = from_csv.caption_image
    for k in (1, 5, 10):
        i2t = np.mean([any(owner[j] == i for j in sim[i].argsort(descending=True)[:k].tolist()) for i in range(4)])
        t2i = np.mean([owner[j] in sim[:, j].argsort(descending=True)[:k].tolist() for j in range(len(owner))])
        assert results[f"image_to_text_R@{k}"] == pytest.approx(i2t)
        assert results[f"text_to_image_R@{k}"] == pytest.approx(t2i)
    assert results["text_to_image_R@5"] == 1.0 and results["num_captions"] == 7


def test_bad_inputs(tmp_path, official_checkpoint):
    (tmp_path / "val" / "a").mkdir(parents=True)
    _random_images(tmp_path / "val" / "a", 1)
    (tmp_path / "classnames.json").write_text(json.dumps(["a", "b"]))
    with pytest.raises(ValueError, match="1 class folders but 2 class names"):
        main(
            [
                "--model",
                f"uta:{official_checkpoint}",
                "--imagenet",
                str(tmp_path / "val"),
                "--classnames",
                str(tmp_path / "classnames.json"),
                "--out",
                str(tmp_path / "r.json"),
                "--workers",
                "0",
            ]
        )
    (tmp_path / "bad.csv").write_text("path,caption\nx.png,hello\n")
    with pytest.raises(ValueError, match="`filepath` and `title` columns"):
        CaptionedImages(tmp_path / "bad.csv", transform=lambda im: im)
    with pytest.raises(FileNotFoundError, match="model source 'clip': no such file or folder"):
        load_zeroshot_model("clip")
    with pytest.raises(ValueError, match="is a transformers tower folder; a UTA checkpoint or an open_clip model"):
        load_zeroshot_model(f"hf:{tmp_path}")
