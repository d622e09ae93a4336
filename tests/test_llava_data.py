"""LLaVA data: label masks token by token, image tokens, truncation, aspect ratio, bad samples, mixed batches."""

from __future__ import annotations

import json

import pytest
import torch
from llava_helpers import make_dataset, make_tokenizer_dir, solid_image, tiny_llama_config, tiny_tower_config
from PIL import Image
from transformers import AutoTokenizer, LlavaProcessor

from llava_uta.constants import IGNORE_INDEX
from llava_uta.conversation import generation_prompt
from llava_uta.data.llava_dataset import DataCollatorForSupervisedDataset, LazySupervisedDataset
from llava_uta.data.preprocess import BadSampleError
from llava_uta.model.llava_builder import build_llava
from llava_uta.model.processors import clip_image_processor, make_image_processor
from llava_uta.train.trainer import modality_grouped_indices

N_IMAGE = 16  # 32 px / patch 8 = 4x4 patches, CLS dropped


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(make_tokenizer_dir(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_dataset(root, n=6, text_only=2)
    make_dataset(root, n=4, plain=True)
    return root


def _dataset(tokenizer, path, root, version="v1", max_length=512, aspect="square", **kwargs):
    return LazySupervisedDataset(
        path,
        tokenizer,
        make_image_processor(clip_image_processor(32), aspect),
        version,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_text="<image>" * N_IMAGE,
        model_max_length=max_length,
        image_folder=root,
        **kwargs,
    )


def _supervised_runs(tokenizer, item) -> list[str]:
    """Decoded runs of consecutive supervised tokens."""
    runs, current = [], []
    for token, label in zip(item["input_ids"].tolist(), item["labels"].tolist(), strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    return [tokenizer.decode(run) for run in runs]


def test_v1_two_rounds_mask_token_by_token(tokenizer, data_root):
    item = _dataset(tokenizer, data_root / "instruct.json", data_root)[0]
    sample = json.loads((data_root / "instruct.json").read_text())[0]
    answers = [turn["value"] for turn in sample["conversations"][1::2]]
    assert [run.strip() for run in _supervised_runs(tokenizer, item)] == [a + "</s>" for a in answers]
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert tokenizer.decode(ids[:first]).endswith("ASSISTANT:")  # supervision starts where generation starts
    assert ids[0] == tokenizer.bos_token_id and labels[0] == IGNORE_INDEX
    # the whole sequence is exactly the rendered v1 prompt with the image tokens expanded
    prompt = generation_prompt("v1", ["<image>\nWhat is in the image?", answers[0], "What color is it?"])
    expected = tokenizer(prompt + " " + answers[1] + "</s>")["input_ids"]
    image = tokenizer.convert_tokens_to_ids("<image>")
    expected_expanded = [t for tok in expected for t in ([tok] * N_IMAGE if tok == image else [tok])]
    assert ids == expected_expanded


def test_plain_sample_is_image_then_caption(tokenizer, data_root):
    item = _dataset(tokenizer, data_root / "pretrain.json", data_root, version="plain")[1]
    caption = json.loads((data_root / "pretrain.json").read_text())[1]["conversations"][1]["value"]
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    image = tokenizer.convert_tokens_to_ids("<image>")
    assert ids[: 1 + N_IMAGE] == [tokenizer.bos_token_id] + [image] * N_IMAGE
    assert labels[: 1 + N_IMAGE] == [IGNORE_INDEX] * (1 + N_IMAGE)
    assert all(label != IGNORE_INDEX for label in labels[1 + N_IMAGE :])  # the caption and its newline
    assert tokenizer.decode(ids[1 + N_IMAGE :]) == caption + "\n"


def test_image_tokens_match_transformers_llava_processor(tokenizer, data_root):
    """Generation through LlavaProcessor gives the same ids as training's expansion (one block, 16 tokens)."""
    processor = LlavaProcessor(
        image_processor=make_image_processor(clip_image_processor(32), "square"),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    prompt = generation_prompt("v1", ["<image>\nWhat is in the image?"])
    image = Image.open(data_root / "images" / "0.png")
    ours = _dataset(tokenizer, data_root / "instruct.json", data_root)[0]
    theirs = processor(text=prompt, images=image, return_tensors="pt")
    n = theirs["input_ids"].shape[1]
    assert ours["input_ids"][:n].tolist() == theirs["input_ids"][0].tolist()
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"][0])
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    positions = (ours["input_ids"] == image_id).nonzero().flatten()
    assert len(positions) == N_IMAGE and positions[-1] - positions[0] == N_IMAGE - 1


def test_pad_fills_with_the_processor_mean(tokenizer, tmp_path):
    solid_image(tmp_path / "tall.png", "red", size=(16, 32))
    square = make_image_processor(clip_image_processor(32), "square")(images=Image.open(tmp_path / "tall.png"))
    pad = make_image_processor(clip_image_processor(32), "pad")(images=Image.open(tmp_path / "tall.png"))
    square, pad = square["pixel_values"][0], pad["pixel_values"][0]
    assert square[0].mean() > 1.0  # centre crop: red everywhere
    assert pad[:, :, :6].abs().max() < 0.03 and pad[:, :, -6:].abs().max() < 0.03  # mean colour -> ~0 after norm
    assert pad[0, :, 12:20].mean() > 1.0


def test_truncation_never_cuts_image_tokens_and_never_leaves_no_target(tokenizer, data_root):
    path = data_root / "instruct.json"
    full = _dataset(tokenizer, path, data_root)[0]
    with pytest.raises(BadSampleError, match="would cut the image tokens"):
        _dataset(tokenizer, path, data_root, max_length=N_IMAGE)[0]
    first_target = next(i for i, label in enumerate(full["labels"].tolist()) if label != IGNORE_INDEX)
    with pytest.raises(BadSampleError, match="no supervised token left after truncation"):
        _dataset(tokenizer, path, data_root, max_length=first_target)[0]
    short = _dataset(tokenizer, path, data_root, max_length=len(full["input_ids"]) - 2)[0]
    assert short["input_ids"].tolist() == full["input_ids"][:-2].tolist()


BAD = {
    "missing file": ({"image": "images/nope.png"}, "No such file"),
    "corrupt file": ({"image": "corrupt.png"}, "cannot identify image"),
    "no <image>": ({"image": "images/0.png", "drop_image_token": True}, "exactly one <image>"),
    "roles order": ({"image": "images/0.png", "swap_roles": True}, "expected 'human'"),
    "<image> without image": ({}, "<image> in a sample without"),
    "ends with human": ({"image": "images/0.png", "truncate_turns": 1}, "no answer to learn"),
}


def _bad_sample(name: str, spec: dict) -> dict:
    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a red star."}]
    if spec.get("drop_image_token"):
        turns[0]["value"] = "What is it?"
    if spec.get("swap_roles"):
        turns = turns[::-1]
    if spec.get("truncate_turns"):
        turns = turns[: spec["truncate_turns"]]
    sample = {"id": name, "conversations": turns}
    if "image" in spec:
        sample["image"] = spec["image"]
    return sample


@pytest.mark.parametrize("name", sorted(BAD))
def test_each_bad_sample_names_its_id_and_file(tokenizer, data_root, tmp_path, name):
    spec, message = BAD[name]
    (data_root / "corrupt.png").write_bytes(b"not a png at all")
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([_bad_sample(name, spec)]))
    with pytest.raises(BadSampleError, match=message) as err:
        _dataset(tokenizer, path, data_root)[0]
    assert repr(name) in str(err.value) and (spec.get("image", "") in str(err.value))


def test_skip_bad_samples_skips_and_counts(tokenizer, data_root, tmp_path):
    (data_root / "corrupt.png").write_bytes(b"not a png at all")
    good = json.loads((data_root / "instruct.json").read_text())[0]
    path = tmp_path / "mixed.json"
    path.write_text(
        json.dumps([_bad_sample("a", BAD["missing file"][0]), _bad_sample("b", BAD["corrupt file"][0]), good])
    )
    dataset = _dataset(tokenizer, path, data_root, skip_bad_samples=True)
    item = dataset[0]
    assert dataset.num_skipped == 2
    assert item["input_ids"].tolist() == _dataset(tokenizer, path, data_root).load(2)["input_ids"].tolist()


def test_mixed_batch_through_llava(tokenizer, data_root):
    """Text-only and image samples in one batch: each image lands in its own sample, padding changes nothing."""
    dataset = _dataset(tokenizer, data_root / "instruct.json", data_root)
    assert [length > 0 for length in dataset.modality_lengths] == [True] * 6 + [False] * 2
    items = [dataset[6], dataset[0], dataset[7], dataset[1]]
    batch = DataCollatorForSupervisedDataset(tokenizer.pad_token_id)(items)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    lm = tiny_llama_config(tokenizer)
    torch.manual_seed(0)
    model = build_llava(lm, tiny_tower_config(), tokenizer).eval()
    with torch.no_grad():
        out = model(**batch)
        for row, item in enumerate(items):
            alone = {k: v[None] for k, v in item.items() if k != "pixel_values"}
            pixels = item.get("pixel_values")
            logits = model(**alone, pixel_values=None if pixels is None else pixels[None]).logits[0]
            torch.testing.assert_close(out.logits[row, : len(item["input_ids"])], logits, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out.loss)


def test_modality_grouping_keeps_each_megabatch_single_modality():
    lengths = [5, 7, 9, 11, 13, 15, 17, -3, -4, -5, -6, -7, -8, 19, 21]
    order = modality_grouped_indices(lengths, megabatch=4, generator=torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(len(lengths)))
    for chunk in [order[k : k + 4] for k in range(0, 12, 4)]:
        assert len({lengths[i] > 0 for i in chunk}) == 1
        assert [abs(lengths[i]) for i in chunk] == sorted((abs(lengths[i]) for i in chunk), reverse=True)
    assert {lengths[i] > 0 for i in order[12:]} == {True, False}  # 9 images + 6 texts: the leftovers share the tail


def test_chatml_labels_exactly_the_answers_and_their_im_end(chat_gguf, data_root):
    """A ChatML LM's tokenizer (from its GGUF file): every answer and its <|im_end|> is supervised, nothing else."""
    from llava_uta.model.language_model import load_tokenizer
    from llava_uta.model.llava_builder import add_image_token

    tokenizer = load_tokenizer(chat_gguf)
    add_image_token(tokenizer)
    item = _dataset(tokenizer, data_root / "instruct.json", data_root, version="chatml")[0]
    sample = json.loads((data_root / "instruct.json").read_text())[0]
    answers = [turn["value"] for turn in sample["conversations"][1::2]]
    assert _supervised_runs(tokenizer, item) == [a + "<|im_end|>" for a in answers]
    prompt = generation_prompt("chatml", ["<image>\nWhat is in the image?", answers[0], "What color is it?"])
    expected = tokenizer(prompt + answers[1] + "<|im_end|>\n")["input_ids"]
    image = tokenizer.convert_tokens_to_ids("<image>")
    assert item["input_ids"].tolist() == [t for tok in expected for t in ([tok] * N_IMAGE if tok == image else [tok])]


def test_the_data_check_reports_every_bad_sample_by_kind_before_training(data_root, llava_parts, tmp_path):
    from llava_helpers import llava_args

    from llava_uta.data.check import check_llava_data
    from llava_uta.train.train import train

    (data_root / "corrupt.png").write_bytes(b"not a png at all")
    good = json.loads((data_root / "instruct.json").read_text())
    samples = [*good[:3], *(_bad_sample(name, spec) for name, (spec, _) in sorted(BAD.items())), "not a sample"]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(samples))
    report = check_llava_data(path, data_root, "v1")
    assert report.samples == len(samples) and not report.ok
    counts = {kind: len(found) for kind, found in report.problems.items()}
    assert counts == {"missing image": 1, "unreadable image": 1, "malformed conversation": 4, "not a JSON object": 1}
    assert "'missing file': images/nope.png" in report.problems["missing image"][0]
    assert "'roles order'" in " ".join(report.problems["malformed conversation"])
    assert check_llava_data(data_root / "instruct.json", data_root, "v1").ok
    args = llava_args({**llava_parts, "data": data_root}, tmp_path / "out", stage=2, data_path=path)
    with pytest.raises(ValueError, match=r"(?s)bad training data.*missing image: 1.*nope\.png"):
        train(args)
    assert not (tmp_path / "out").exists()  # stopped before the model was even loaded


def test_the_data_check_of_a_large_json_reads_headers_only(tmp_path):
    """100,000 samples over 1,000 images: the check's time (stated in the report) and its verdict."""
    from llava_uta.data.check import check_llava_data

    (tmp_path / "images").mkdir()
    for k in range(1000):
        solid_image(tmp_path / "images" / f"{k}.png", "red", (16, 16))
    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "red."}]
    samples = [{"id": i, "image": f"images/{i % 1000}.png", "conversations": turns} for i in range(100_000)]
    (tmp_path / "big.json").write_text(json.dumps(samples))
    report = check_llava_data(tmp_path / "big.json", tmp_path, "v1")
    assert report.ok and report.samples == 100_000 and report.images == 1000
    assert "100,000 samples, 1,000 images checked in" in report.summary()


def test_every_prompt_starts_with_the_bos_token_as_llava_s_do_and_chat_asks_what_training_taught(tokenizer):
    """LLaMA's tokenizer puts <s> before every LLaVA sample; SmolLM2's adds none, so its BOS is put in front, once."""
    from gguf_helpers import chat_tokenizer

    from llava_uta.conversation import get_template, with_bos
    from llava_uta.data.preprocess import build_conversation, tokenize_conversation
    from llava_uta.serve.chat import ChatSession

    chatml = chat_tokenizer(["a red circle in the top left corner.", "<|im_start|>user\nWhat is it?<|im_end|>"] * 8)
    chatml.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id, bos = chatml.convert_tokens_to_ids("<image>"), chatml.bos_token_id
    assert chatml("")["input_ids"] == []  # like SmolLM2's: no BOS of its own
    turns = [{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "a red circle."}]

    plain = tokenize_conversation(build_conversation(turns, get_template("plain"), has_image=True), chatml, image_id,
                                  "<image>" * 4, 512)
    assert plain.input_ids[:5] == [bos] + [image_id] * 4
    answer = [t for t, label in zip(plain.input_ids, plain.labels, strict=True) if label != IGNORE_INDEX]
    assert chatml.decode(answer) == "a red circle.\n"  # the answer spans moved with the prompt
    chat = tokenize_conversation(build_conversation(turns, get_template("chatml"), has_image=True), chatml, image_id,
                                 "<image>" * 4, 512)
    assert chat.input_ids[0] == bos and chat.input_ids[1] != bos  # a ChatML prompt starts with it already

    assert tokenizer("")["input_ids"] == [tokenizer.bos_token_id]  # the tiny LM's adds its own: nothing is put in front
    assert with_bos("a red circle.", tokenizer) == "a red circle."

    class Loaded:  # what ChatSession.prompt reads of a loaded model
        conv_mode, tokenizer = "plain", chatml

    session = ChatSession(Loaded(), image=Image.new("RGB", (8, 8)))
    prompt = chatml(session.prompt("Describe it."))["input_ids"]
    assert prompt == plain.input_ids[: len(prompt)] and prompt[0] == bos
