"""Model sources: every spelling of one model parses to one source, every command's model flag takes the syntax, and
the last release's spellings still work, with a FutureWarning that gives the new one."""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava_uta.eval.probe.towers import parse_tower
from llava_uta.model.checkpoint import save_uta_vit
from llava_uta.model.convert import main as convert_main
from llava_uta.model.model_source import ModelSource, parse_model_source, with_weights_flag
from llava_uta.model.uta_vit import build_uta_vit
from llava_uta.quickstart.pipeline import Layout, Pipeline
from llava_uta.quickstart.profiles import PROFILES, get_profile
from pretrain.teacher_cache import TeacherCache


@contextmanager
def current_spelling() -> Iterator[None]:
    """A FutureWarning (an old spelling) inside is an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        yield


def warned_of(warned: pytest.WarningsRecorder, text: str) -> bool:
    """Whether one of the recorded warnings says `text`."""
    return any(text in str(w.message) for w in warned)


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    """What a bare path can be: an open_clip folder, a transformers tower folder, a UTA checkpoint file."""
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "open_clip_config.json").write_text("{}")
    (tmp_path / "tower").mkdir()
    (tmp_path / "tower" / "config.json").write_text("{}")
    (tmp_path / "student.safetensors").write_bytes(b"")
    return {"open_clip": tmp_path / "clip", "hf": tmp_path / "tower", "uta": tmp_path / "student.safetensors"}


def test_every_spelling_of_a_model_parses_to_one_source(files):
    folder, tower, checkpoint = files["open_clip"], files["hf"], files["uta"]
    spellings = {
        ModelSource("open_clip", f"local-dir:{folder}"): [f"open_clip:local-dir:{folder}", str(folder)],
        ModelSource("open_clip", "ViT-B-16", "/w/vit@1.bin"): ["open_clip:ViT-B-16@/w/vit@1.bin"],
        ModelSource("uta", str(checkpoint)): [f"uta:{checkpoint}", str(checkpoint), checkpoint],
        ModelSource("hf", str(tower)): [f"hf:{tower}", str(tower)],
    }
    with current_spelling():
        for source, texts in spellings.items():
            for text in texts:
                assert parse_model_source(text) == source, text
                assert parse_model_source(f"random:{text}") == dataclasses.replace(source, random_init=True), text
            assert parse_model_source(str(source)) == source  # its str() is its spelling
            assert parse_model_source(source) is source
    assert ModelSource("open_clip", "ViT-B-16", "/w/vit.bin").has_weights
    assert ModelSource("open_clip", f"local-dir:{folder}").has_weights
    assert not ModelSource("open_clip", "ViT-B-16").has_weights


def test_the_last_release_spellings_still_parse_with_a_warning_giving_the_new_one(files):
    folder = files["open_clip"]
    old_to_new = {
        f"openclip:local-dir:{folder}": f"open_clip:local-dir:{folder}",
        f"local-dir:{folder}": f"open_clip:local-dir:{folder}",
        "openclip:ViT-B-16@/w/vit.bin": "open_clip:ViT-B-16@/w/vit.bin",
        "random:openclip:ViT-B-16": "random:open_clip:ViT-B-16",
        "ViT-B-16": "open_clip:ViT-B-16",
    }
    for old, new in old_to_new.items():
        with pytest.warns(FutureWarning, match=re.escape(f"is deprecated and goes in the next release; write {new!r}")):
            assert parse_model_source(old) == parse_model_source(new), old


def test_a_weights_flag_of_the_last_release_folds_into_the_source_with_a_warning(files):
    folder, checkpoint = files["open_clip"], files["uta"]
    cases = [
        ("ViT-B-16", "/w/vit.bin", "--teacher", "--teacher_pretrained", "open_clip:ViT-B-16@/w/vit.bin"),
        ("open_clip:ViT-B-16", "/w/vit.bin", "--text_model", "--text_pretrained", "open_clip:ViT-B-16@/w/vit.bin"),
        ("openclip:ViT-B-16", "/w/vit.bin", "--model", "--checkpoint", "open_clip:ViT-B-16@/w/vit.bin"),
        ("ViT-B-16", "/w/vit.bin", "--from-open-clip", "--open-clip-pretrained", "open_clip:ViT-B-16@/w/vit.bin"),
        ("open_clip:ViT-B-16", "/w/vit.bin", "--text-model", "--text-weights", "open_clip:ViT-B-16@/w/vit.bin"),
        ("uta", checkpoint, "--model", "--checkpoint", f"uta:{checkpoint}"),
    ]
    for source, weights, source_flag, weights_flag, new in cases:
        with pytest.warns(FutureWarning) as warned:  # and one for the source's own old spelling, if it has one
            assert with_weights_flag(source, weights, source_flag, weights_flag) == new
        assert warned_of(warned, f"{weights_flag} {weights} is deprecated and goes in the next release; write "
                                 f"{source_flag} {new} ")
    with current_spelling():  # no weights flag: the source as given
        assert with_weights_flag(f"open_clip:local-dir:{folder}", None, "--teacher", "--teacher_pretrained") == \
            f"open_clip:local-dir:{folder}"
        assert with_weights_flag(None, None, "--text-model", "--text-weights") is None
    for holds_weights in (f"open_clip:local-dir:{folder}", "open_clip:ViT-B-16@/w/a.bin", f"uta:{checkpoint}"):
        with pytest.raises(ValueError, match="holds its own weights"):
            with_weights_flag(holds_weights, "/w/b.bin", "--teacher", "--teacher_pretrained")


def test_what_is_not_a_source_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder; give open_clip:NAME@WEIGHTS"):
        parse_model_source(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="neither open_clip_config.json"):
        parse_model_source(tmp_path)
    with pytest.raises(ValueError, match="empty open_clip weights file"):
        parse_model_source("open_clip:ViT-B-16@")
    with pytest.raises(ValueError, match="empty uta target"):
        parse_model_source("uta:")
    with pytest.raises(ValueError, match="'uta:x.pt' is a UTA checkpoint; an open_clip model is needed here"):
        parse_model_source("uta:x.pt", ("open_clip",))


def test_a_teacher_cache_is_found_under_every_spelling_of_its_teacher(tmp_path, files):
    cache, folder = TeacherCache(tmp_path / "cache"), files["open_clip"]
    with pytest.warns(FutureWarning):  # what the last release wrote in cache.json, for its spelling
        old = cache.describe(teacher=f"local-dir:{folder}", teacher_pretrained=None, views=1)
    assert (old["teacher"], old["teacher_pretrained"]) == (f"local-dir:{folder}", None)
    with current_spelling():
        assert cache.describe(teacher=f"open_clip:local-dir:{folder}", teacher_pretrained=None, views=1) == old
        assert cache.describe(teacher=str(folder), teacher_pretrained=None, views=1) == old
        named = cache.describe(teacher="open_clip:ViT-B-16@/w/vit.bin", teacher_pretrained=None)
    with pytest.warns(FutureWarning):
        assert cache.describe(teacher="ViT-B-16", teacher_pretrained="/w/vit.bin") == named
    assert (named["teacher"], named["teacher_pretrained"]) == ("ViT-B-16", "/w/vit.bin")


# ---- every command's model flag


def test_convert_takes_a_uta_checkpoint_as_a_source(tmp_path):
    torch.manual_seed(0)
    student = tmp_path / "student.safetensors"
    save_uta_vit(build_uta_vit("uta_test_p8_32"), student)
    with current_spelling():
        convert_main([f"uta:{student}", str(tmp_path / "prefixed")])
        convert_main([str(student), str(tmp_path / "bare")])
    prefixed, bare = (load_file(tmp_path / name / "model.safetensors") for name in ("prefixed", "bare"))
    assert prefixed.keys() == bare.keys() and all(torch.equal(v, bare[k]) for k, v in prefixed.items())
    with pytest.raises(SystemExit):  # a random-init tower is --random-init CONFIG
        convert_main([f"random:uta:{student}", str(tmp_path / "random")])


def check_source_and_old_weights_flag(build: Callable[[dict], object], source_flag: str, weights_flag: str,
                                      missing: Path) -> None:
    """`build(fields)` takes open_clip:NAME@FILE quietly, and NAME with the old weights field, warning; the load stops
    at the missing FILE, so the source reached the loader either way."""
    stops = re.escape(f"open_clip weights {missing}: no such")
    source_field, weights_field = source_flag.removeprefix("--"), weights_flag.removeprefix("--")
    with current_spelling(), pytest.raises(FileNotFoundError, match=stops):
        build({source_field: f"open_clip:ViT-S-16@{missing}"})
    with pytest.warns(FutureWarning) as warned, pytest.raises(FileNotFoundError, match=stops):
        build({source_field: "ViT-S-16", weights_field: str(missing)})
    assert warned_of(warned, f"write {source_flag} open_clip:ViT-S-16@{missing} ")


def test_pretraining_takes_the_teacher_as_a_source_and_the_old_weights_flag_with_a_warning(tmp_path):
    from pretrain.engine import PretrainArguments, Pretrainer

    args = dict(data_path=str(tmp_path), output_dir=str(tmp_path / "run"), model="uta_test_p8_32")
    check_source_and_old_weights_flag(lambda fields: Pretrainer(PretrainArguments(**args, **fields)), "--teacher",
                                      "--teacher_pretrained", tmp_path / "vit.bin")


def test_clip_fine_tuning_takes_the_text_model_as_a_source_and_the_old_weights_flag_with_a_warning(tmp_path):
    from pretrain.finetune_clip import FinetuneArguments, build_clip

    torch.manual_seed(0)
    save_uta_vit(build_uta_vit("uta_test_p8_32"), tmp_path / "student.safetensors")
    args = dict(train_data=str(tmp_path), output_dir=str(tmp_path / "run"), init=str(tmp_path / "student.safetensors"))
    check_source_and_old_weights_flag(lambda fields: build_clip(FinetuneArguments(**args, **fields)), "--text_model",
                                      "--text_pretrained", tmp_path / "vit.bin")


MODEL_FLAGS = {"llava-uta-pretrain": "--teacher", "llava-uta-finetune-clip": "--text_model",
               "llava-uta-convert": "--from-open-clip", "llava-uta-linprobe": "--tower",
               "llava-uta-patchprobe": "--tower"}  # the flags that name a model in the quickstart's stages


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_the_quickstart_gives_every_model_in_the_current_spelling(profile, tmp_path):
    paths = Layout(tmp_path / "data", tmp_path / "runs")
    stages = Pipeline(paths, get_profile(profile)).stages(compare=True, ladder=True)
    for stage in stages:
        if stage.tool == "llava-uta-pretrain":  # the students exist once trained: bare paths name files
            stage.output.parent.mkdir(parents=True, exist_ok=True)
            (stage.output.parent / "student.safetensors").touch()
    checked = set()
    with current_spelling():
        for stage in stages:
            argv = stage.argv()
            for i, flag in enumerate(argv[:-1]):
                if MODEL_FLAGS.get(stage.tool) == flag:
                    parse_tower(argv[i + 1]) if flag == "--tower" else parse_model_source(argv[i + 1])
                    checked.add(stage.tool)
    assert checked == set(MODEL_FLAGS)
