"""Every tool's flags in either spelling, as transformers' HfArgumentParser takes them."""

from __future__ import annotations

import pytest

from llava_uta.argparsing import ArgumentParser
from llava_uta.eval.llavabench.__main__ import build_parser as bench_parser
from llava_uta.model.convert import build_parser as convert_parser


def test_dashes_and_underscores_are_one_flag_in_groups_and_subcommands():
    parser = ArgumentParser()
    parser.add_argument("--model-path")
    parser.add_argument("--image_size", type=int)
    group = parser.add_argument_group("towers")
    group.add_argument("--random-init", action="store_true")
    for argv in (["--model-path", "m", "--image_size", "3", "--random-init"],
                 ["--model_path=m", "--image-size", "3", "--random_init"]):
        args = parser.parse_args(argv)
        assert (args.model_path, args.image_size, args.random_init) == ("m", 3, True)
    with pytest.raises(SystemExit):
        parser.parse_args(["--model__path", "m"])  # not a spelling of any flag
    answer = bench_parser().parse_args(["answer", "--model_path", "m", "--question_file", "q", "--answers_file", "a",
                                        "--image_folder", "i"])
    assert (answer.model_path, answer.question_file) == ("m", "q")
    convert = convert_parser().parse_args(["--from_open_clip", "open_clip:local-dir:t", "out"])
    assert convert.from_open_clip == "open_clip:local-dir:t" and convert.out == "out"


def test_the_old_console_names_say_the_new_one_and_run_the_tool(capsys, monkeypatch):
    import sys

    from pretrain import deprecated

    monkeypatch.setattr(sys, "argv", ["uta-masks", "--help"])
    with pytest.raises(SystemExit) as done:
        deprecated.uta_masks()
    assert done.value.code == 0
    out = capsys.readouterr()
    assert "uta-masks is deprecated" in out.err and "llava-uta-masks" in out.err and "--mask-ratio" in out.out
