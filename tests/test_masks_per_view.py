"""`--masks_per_view M`: one teacher forward serves M student passes with different keep sets."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from run_helpers import engine_args
from tolerances import assert_close_to_scale, grads
from transformers import HfArgumentParser

from llava_uta.model.checkpoint import load_state_dict_file
from llava_uta.model.uta_vit import build_uta_vit
from pretrain.data import MaskedViews, mask_seed, sample_seed
from pretrain.engine import PretrainArguments, Pretrainer
from pretrain.masking import MASKING_KINDS, KeepIndexGenerator, check_mask_pairing, complement_keep
from pretrain.objectives import objective_loss


@pytest.fixture(scope="module")
def world(tiny_world) -> Path:
    return tiny_world


def views(masks_per_view: int, pairing: str = "independent", kind: str = "reversed_block", grid: int = 4,
          ratio: float = 0.5, seed: int = 0) -> MaskedViews:
    """MaskedViews over 64 placeholder images: keep_sets never looks at them."""
    return MaskedViews(list(range(64)), None, KeepIndexGenerator(grid, ratio, kind), seed,
                       masks_per_view=masks_per_view, pairing=pairing)


def assert_same_grads(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    """Equal to 1e-6 of each tensor's scale (fp32 sums in another order; the tiny student's grads reach ~100)."""
    assert "head.weight" in got
    assert_close_to_scale(expected, got, rel=1e-6)


@pytest.mark.parametrize("objective", ["uta", "mim"])
@pytest.mark.parametrize("cls_weight", [None, 0.3])
def test_m_passes_are_the_mean_of_m_separate_batches(objective, cls_weight):
    torch.manual_seed(0)
    student = build_uta_vit("uta_test_p8_32", use_mask_token=objective == "mim")
    images, targets = torch.randn(3, 3, 32, 32), torch.randn(3, 17, 32)
    data = views(3, kind="random")
    keep = torch.stack([data.keep_sets(0, index) for index in range(3)])  # (B, M, K): 3 images, M = 3
    loss, stats = objective_loss(objective, student, images, targets, keep, cls_weight)
    loss.backward()
    together = grads(student)
    student.zero_grad(set_to_none=True)
    separate = []
    for m in range(3):  # M separate batches on the same teacher targets, their losses averaged
        loss_m, _ = objective_loss(objective, student, images, targets, keep[:, m], cls_weight)
        (loss_m / 3).backward()
        separate.append(loss_m.item())
    assert loss.item() == pytest.approx(sum(separate) / 3, abs=1e-6)
    assert_same_grads(together, grads(student))
    assert ("mask_token" in together) == (objective == "mim")


def test_objectives_without_masks_refuse_several_passes():
    student = build_uta_vit("uta_test_p8_32")
    keep = torch.arange(16).view(1, 2, 8)
    for objective in ("fd", "cls"):
        with pytest.raises(ValueError, match=f"--objective {objective} uses no masks"):
            objective_loss(objective, student, torch.randn(1, 3, 32, 32), torch.randn(1, 17, 32), keep)
        objective_loss(objective, student, torch.randn(1, 3, 32, 32), torch.randn(1, 17, 32), keep[:, :1])  # M = 1


@pytest.mark.parametrize("kind", MASKING_KINDS)
def test_complement_pairs_cover_every_patch_exactly_once(kind):
    for grid in (4, 16):
        data = views(2, "complement", kind, grid)
        for index in range(20):
            keep = data.keep_sets(epoch=index % 3, index=index)
            assert keep.shape == (2, grid * grid // 2)
            assert torch.equal(keep.flatten().sort().values, torch.arange(grid * grid))  # each patch once
            assert (keep[1, 1:] > keep[1, :-1]).all()  # sorted, as every keep set
            assert torch.equal(keep[0], views(1, kind=kind, grid=grid).keep_sets(index % 3, index))  # set 0 = M=1's
    assert torch.equal(complement_keep(torch.tensor([0, 2]), 4), torch.tensor([1, 3]))


def test_settings_that_cannot_be_drawn_are_refused():
    with pytest.raises(ValueError, match="--masks_per_view 2, got 3"):
        check_mask_pairing("complement", 3)
    with pytest.raises(ValueError, match="--mask_ratio 0.5"):
        check_mask_pairing("complement", 2, mask_ratio=0.4)
    with pytest.raises(ValueError, match="at least 1"):
        check_mask_pairing("independent", 0)
    with pytest.raises(ValueError, match="--mask_pairing must be one of"):
        check_mask_pairing("halves", 2)
    with pytest.raises(ValueError, match="even number of patches.*25"):
        views(2, "complement", grid=5)  # 5x5 at 0.5 keeps 13 of 25 (round half to even masks 12)
    parse = lambda *flags: HfArgumentParser(PretrainArguments).parse_args_into_dataclasses(  # noqa: E731
        args=["--data_path", "d", "--output_dir", "o", *flags])[0]
    for objective in ("fd", "cls"):
        with pytest.raises(ValueError, match=f"--objective {objective} uses no masks"):
            parse("--objective", objective, "--masks_per_view", "2")
    assert parse("--objective", "mim", "--masks_per_view", "4").masks_per_view == 4  # MIM takes M > 1 too
    assert parse("--objective", "fd").masks_per_view == 1 and parse().mask_pairing == "independent"
    with pytest.raises(ValueError, match="--mask_ratio 0.5"):
        parse("--masks_per_view", "2", "--mask_pairing", "complement")  # the default ratio is 0.4
    args = parse("--masks_per_view", "2", "--mask_pairing", "complement", "--mask_ratio", "0.5")
    assert (args.masks_per_view, args.mask_pairing) == (2, "complement")


def test_masks_are_a_function_of_seed_epoch_index_and_m():
    four, two, one = views(4), views(2), views(1)
    first = {(e, i): four.keep_sets(e, i) for e in range(3) for i in range(10)}
    for (e, i), keep in reversed(list(first.items())):  # any order, fresh generators, fewer passes: same sets
        assert torch.equal(views(4).keep_sets(e, i), keep) and torch.equal(four.keep_sets(e, i), keep)
        assert torch.equal(two.keep_sets(e, i), keep[:2]) and torch.equal(one.keep_sets(e, i), keep[0])
        masks = KeepIndexGenerator(4, 0.5)
        for m in range(4):  # set m is drawn from mask_seed(seed, epoch, index, m) alone
            masks.seed(mask_seed(0, e, i, m))
            assert torch.equal(masks(), keep[m])
        masks.seed(sample_seed(0, e, i))  # set 0 is what one mask per view always drew
        assert torch.equal(masks(), keep[0])
        assert len({tuple(k.tolist()) for k in keep}) > 1  # the M sets of a view differ
    assert not torch.equal(views(4, seed=1).keep_sets(0, 0), first[0, 0])
    assert len({mask_seed(0, e, i, m) for e in range(3) for i in range(100) for m in range(4)}) == 3 * 100 * 4
    four.set_epoch(2)
    assert four.keep_sets(2, 7).shape == (4, 8)


def test_one_teacher_forward_serves_m_passes_of_an_engine_micro_step(world, teacher_dir, tmp_path):
    trainer = Pretrainer(engine_args(world, teacher_dir, tmp_path / "run", masks_per_view=2, drop_path=0.0))
    images, keep = next(iter(trainer.loader(0, 0)))
    assert images.shape == (8, 3, 32, 32) and keep.shape == (8, 2, 8)
    calls = []
    trainer.teacher.register_forward_hook(lambda *_: calls.append(1))
    trainer.accum = 1
    loss, stats, _ = trainer.micro_step(images, keep)  # both passes on one teacher forward
    assert len(calls) == 1 and {"cos_cls", "cos_patch"} <= set(stats)
    together = grads(trainer.student)
    trainer.student.zero_grad(set_to_none=True)
    targets = trainer.teacher(images, trainer.grid)
    trainer.accum = 2  # two separate micro-batches, accumulated
    separate = [trainer.micro_step(images, keep[:, m], targets)[0] for m in range(2)]
    assert len(calls) == 2  # the cached targets: no further teacher forward
    assert loss == pytest.approx(sum(separate) / 2, abs=1e-6)
    assert_same_grads(together, grads(trainer.student))


def test_a_run_with_two_masks_per_view_resumes_exactly(world, teacher_dir, tmp_path):
    """64 images, batch 16: 4 steps an epoch; stopped after step 2, resumed across the epoch boundary to step 6."""
    run = lambda name, **extra: Pretrainer(engine_args(  # noqa: E731
        world, teacher_dir, tmp_path / name, masks_per_view=2, mask_pairing="complement", save_every=2, max_steps=6,
        **extra)).train()
    summary = run("straight")
    assert summary["steps"] == 6 and summary["passes_per_s"] == pytest.approx(2 * summary["images_per_s"])
    for record in map(json.loads, (tmp_path / "straight/log.jsonl").read_text().splitlines()):
        assert record["passes_per_s"] == pytest.approx(2 * record["images_per_s"])
        assert record["tokens_per_s"] == pytest.approx(record["images_per_s"] * 2 * (1 + 8))  # M passes of CLS + K
    (tmp_path / "resumed/checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "straight/checkpoints/step_00000002", tmp_path / "resumed/checkpoints/step_00000002")
    assert run("resumed", resume=True)["steps"] == 6
    expected = load_state_dict_file(tmp_path / "straight/student.safetensors")
    got = load_state_dict_file(tmp_path / "resumed/student.safetensors")
    for key, value in expected.items():
        assert torch.allclose(value, got[key], atol=1e-6), key
