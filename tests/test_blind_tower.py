"""The blind baseline's tower: same architecture and token count, the same tokens for every image."""

from __future__ import annotations

import pytest
import torch
from llava_helpers import make_lm_dir, make_tokenizer_dir
from transformers import AutoModel, AutoTokenizer

from llava_uta.model.checkpoint import save_uta_vit
from llava_uta.model.convert import main as convert_main
from llava_uta.model.llava_builder import build_llava
from llava_uta.model.uta_vit import build_uta_vit
from llava_uta.train.train import parse_args, prepare_model


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("blind")
    torch.manual_seed(0)
    save_uta_vit(build_uta_vit("uta_test_p8_32"), root / "student.safetensors")
    convert_main([str(root / "student.safetensors"), str(root / "tower")])
    convert_main(["--blind", str(root / "tower"), str(root / "blind")])
    return AutoModel.from_pretrained(root / "tower").eval(), AutoModel.from_pretrained(root / "blind").eval()


def test_blind_tower_gives_the_same_tokens_for_every_image(towers):
    tower, blind = towers
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        seen = tower(images, output_hidden_states=True).hidden_states[-2]
        unseen = blind(images, output_hidden_states=True).hidden_states[-2]
    assert unseen.shape == seen.shape == (2, 1 + 16, 32)
    assert not torch.allclose(seen[0], seen[1])
    torch.testing.assert_close(unseen[0], unseen[1])
    unnamed = {"_name_or_path": ""}
    assert blind.config.to_diff_dict() | unnamed == tower.config.to_diff_dict() | unnamed | {"image_withheld": True}
    differing = [k for k, v in blind.state_dict().items() if not torch.equal(v, tower.state_dict()[k])]
    assert differing and all("patch_embed" in k for k in differing)


def test_training_the_blind_tower_never_trains_its_patch_embedding(towers, tmp_path):
    """--unfreeze_mm_vision_tower trains the tower, but a blind one (config `image_withheld`) keeps its zeroed
    patch embedding frozen: trained, it would learn to see."""
    _, blind = towers
    assert blind.config.image_withheld and not getattr(towers[0].config, "image_withheld", False)
    lm = make_lm_dir(tmp_path / "lm", make_tokenizer_dir(tmp_path / "tok"))
    for tower, embedding_trains in ((towers[0], True), (blind, False)):
        model_args, _, training_args = parse_args(["--model_name_or_path", str(lm), "--data_path", "unused.json",
                                                   "--output_dir", str(tmp_path / "out"),
                                                   "--unfreeze_mm_vision_tower", "True"])
        model = prepare_model(build_llava(lm, tower, AutoTokenizer.from_pretrained(lm)), model_args, training_args)
        vision = model.model.vision_tower
        embedding = list(vision.get_input_embeddings().parameters())
        assert embedding and all(p.requires_grad == embedding_trains for p in embedding)
        embedding = {id(p) for p in embedding}
        assert all(p.requires_grad for p in vision.parameters() if id(p) not in embedding)


def test_blind_needs_exactly_one_source(tmp_path):
    with pytest.raises(SystemExit):
        convert_main(["--blind", str(tmp_path / "a"), "--from-open-clip", "open_clip:ViT-B-16", str(tmp_path / "b")])


def test_random_init_tower_is_the_probes_random_twin(tmp_path):
    """`llava-uta-convert --random-init CONFIG --seed S`: the architecture at the probes' seeded initialisation."""
    from llava_uta.eval.probe.towers import load_tower, parse_tower

    save_uta_vit(build_uta_vit("uta_test_p8_32"), tmp_path / "student.safetensors")
    convert_main(["--random-init", "uta_test_p8_32", "--seed", "3", str(tmp_path / "random")])
    tower = AutoModel.from_pretrained(tmp_path / "random").eval()
    twin = load_tower(parse_tower(str(tmp_path / "student.safetensors")).twin(), seed=3)
    for key, value in twin.module.state_dict().items():
        assert torch.equal(value, tower.state_dict()[f"vit.{key}"]), key
    with pytest.raises(SystemExit):
        convert_main(["--random-init", "vit_base_patch16_224", str(tmp_path / "other")])
