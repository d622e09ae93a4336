"""The symbolic tower (the diagnostic of the shape ladder): a symbolic world's code images read back exactly."""

from __future__ import annotations

import json

import pytest
import torch
from llava_helpers import tiny_llama_config
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

from llava_uta.data.shapes import ShapesWorldConfig, build
from llava_uta.model.convert import main as convert_main
from llava_uta.model.llava_builder import build_llava


@pytest.mark.parametrize("grid", [2, 3])
def test_every_cell_token_is_its_objects_one_hot_colour_shape_and_size(grid, tmp_path):
    world = tmp_path / "symbolic"
    build(ShapesWorldConfig(image_size=32, grid=grid, num_clip=16, num_pretrain=16, num_zeroshot_per_class=1,
                            num_stage1=4, num_stage2=4, num_text_instruct=0, num_bench_images=2,
                            num_grounding_images=4, clip_group_size=2, symbolic=True), world, workers=1)
    convert_main(["--symbolic", str(world), str(tmp_path / "tower")])
    tower, processor = (auto.from_pretrained(tmp_path / "tower") for auto in (AutoModel, AutoImageProcessor))
    facts = tower.config.facts
    assert len(facts) == 16 and tower.config.hidden_size == 16 and tower.config.grid == grid
    scenes = [json.loads(line) for line in (world / "scenes.jsonl").read_text().splitlines()]
    pixels = processor([Image.open(world / s["image"]) for s in scenes], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        tokens = tower(pixels, output_hidden_states=True).hidden_states[-2]
    assert tokens.shape == (len(scenes), 1 + grid * grid, 16)
    for scene, got in zip(scenes, tokens, strict=True):
        expected = torch.zeros(grid * grid, len(facts))
        for o in scene["objects"]:
            for fact in (o["color"], o["shape"], o["size"]):
                expected[o["row"] * grid + o["col"], facts.index(fact)] = 1
        assert torch.equal(got[1:], expected), scene["image"]


def test_the_symbolic_tower_serves_llava_and_refuses_a_drawn_world(tiny_world, llava_parts, tmp_path):
    with pytest.raises(ValueError, match="not a symbolic world"):
        convert_main(["--symbolic", str(tiny_world), str(tmp_path / "tower")])
    world = tmp_path / "symbolic"
    build(ShapesWorldConfig(image_size=32, num_clip=8, num_pretrain=8, num_zeroshot_per_class=1, num_stage1=4,
                            num_stage2=4, num_text_instruct=0, num_bench_images=2, num_grounding_images=2,
                            clip_group_size=2, symbolic=True), world, workers=1)
    convert_main(["--symbolic", str(world), str(tmp_path / "tower")])
    tokenizer = AutoTokenizer.from_pretrained(llava_parts["lm"])
    llava = build_llava(tiny_llama_config(tokenizer), str(tmp_path / "tower"), tokenizer, "mlp2x_gelu")
    assert llava.config.image_seq_length == 4  # one token per cell of the 2x2 grid
