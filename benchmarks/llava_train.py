"""LLaVA stage-2 training throughput and padding, with and without `--group_by_modality_length`, side by side.

    python -m llava_uta.data.shapes --out /tmp/shapes-bench --seed 0 --num-clip 200 --num-stage1 200 \\
        --num-pretrain 800 --num-stage2 800 --num-zeroshot-per-class 1 --num-bench-images 1
    python benchmarks/llava_train.py --data /tmp/shapes-bench

Both runs train one epoch of `llava-uta-train` (stage 2: projector + LLM, tower frozen) over the same samples from
the same start. The data is the world's `llava/instruct.json`, of which `--text-only` of the conversations lose
their image: LLaVA-1.5's 665K mix holds 40K text-only ShareGPT conversations (6 %), ShapesWorld has none. The
models are tiny and built from configs (a sentencepiece tokenizer trained on the world's text, a random Llama, a
random `uta_tiny_p8_64` tower), so the figures are about batching, not about these models.

The grouped sampler sorts each megabatch of batch x ranks x accumulation samples, one modality per megabatch, by
length; on one process `--grad-accum` micro-batches stand in for LLaVA's ranks (a micro-batch of `--batch-size`
is what one rank computes). Tokens are what the LM processes, image tokens included. Padded share = padding / all
tokens of a micro-batch, averaged over the micro-batches; tokens/s counts the real (unpadded) tokens over the
Trainer's `train_runtime`. Runs alternate, `--repeats` times each, and the median is reported, so a busy machine
slows both alike.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from llava_uta.constants import DEFAULT_IMAGE_TOKEN
from llava_uta.model.hf_vision import UTAVisionConfig, UTAVisionModel
from llava_uta.model.processors import clip_image_processor
from llava_uta.model.uta_vit import UTA_VIT_CONFIGS
from llava_uta.train.tiny_lm import chat_texts, tiny_llama_config, train_tokenizer
from llava_uta.train.train import build_trainer, parse_args

TOWER = "uta_tiny_p8_64"


class PaddingMeter:
    """Wraps a collator and counts the real and the padded tokens of every micro-batch it builds."""

    def __init__(self, collate):
        self.collate = collate
        self.real: list[int] = []
        self.total: list[int] = []

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = self.collate(items)
        self.real.append(int(batch["attention_mask"].sum()))
        self.total.append(batch["attention_mask"].numel())
        return batch

    @property
    def padded_share(self) -> float:
        return statistics.fmean(1 - real / total for real, total in zip(self.real, self.total, strict=True))


def mixed_instruct(world: Path, text_only: float, seed: int, out: Path) -> tuple[int, int]:
    """The world's stage-2 samples with a `text_only` share stripped of their image; (samples, text-only)."""
    samples = json.loads((world / "llava" / "instruct.json").read_text())
    stripped = random.Random(seed).sample(range(len(samples)), round(text_only * len(samples)))
    for i in stripped:
        del samples[i]["image"]
        first = samples[i]["conversations"][0]
        first["value"] = first["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip()
    out.write_text(json.dumps(samples))
    return len(samples), len(stripped)


def make_models(world: Path, root: Path, seed: int) -> tuple[Path, Path]:
    """Tokenizer + random tiny Llama, and a random UTA tower with its image processor, as folders."""
    texts = [line for line in (world / "text" / "corpus.txt").read_text().splitlines() if line.strip()]
    texts += chat_texts(world / "llava" / "instruct.json", "v1")
    random.Random(seed).shuffle(texts)
    tokenizer = train_tokenizer(texts, root / "lm", vocab_size=1000)
    torch.manual_seed(seed)
    LlamaForCausalLM(tiny_llama_config(tokenizer)).save_pretrained(root / "lm")
    vit = UTA_VIT_CONFIGS[TOWER]
    UTAVisionModel(UTAVisionConfig.from_vit_config(vit)).save_pretrained(root / "tower")
    clip_image_processor(vit.img_size).save_pretrained(root / "tower")
    return root / "lm", root / "tower"


def run(argv: list[str]) -> dict[str, float]:
    trainer = build_trainer(*parse_args(argv))
    meter = PaddingMeter(trainer.data_collator)
    trainer.data_collator = meter
    seconds = trainer.train().metrics["train_runtime"]
    return {
        "steps": trainer.state.global_step,
        "micro-batches": len(meter.real),
        "real tokens": sum(meter.real),
        "all tokens": sum(meter.total),
        "padded share": meter.padded_share,
        "seconds": seconds,
        "tokens/s": sum(meter.real) / seconds,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a ShapesWorld folder (llava-uta-shapes --out)")
    parser.add_argument("--text-only", type=float, default=0.06, help="share of conversations without their image")
    parser.add_argument("--batch-size", type=int, default=8, help="micro-batch (one LLaVA rank's batch)")
    parser.add_argument("--grad-accum", type=int, default=4, help="micro-batches per step (LLaVA's ranks)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="llava-train-bench-") as tmp:
        root = Path(tmp)
        data = root / "instruct.json"
        num_samples, num_text = mixed_instruct(args.data, args.text_only, args.seed, data)
        lm, tower = make_models(args.data, root, args.seed)
        flags = {
            "model_name_or_path": lm,
            "vision_tower": tower,
            "version": "v1",
            "mm_projector_type": "mlp2x_gelu",
            "data_path": data,
            "image_folder": args.data,
            "per_device_train_batch_size": args.batch_size,
            "gradient_accumulation_steps": args.grad_accum,
            "num_train_epochs": 1,
            "learning_rate": 1e-3,
            "save_strategy": "no",
            "logging_strategy": "no",
            "report_to": "none",
            "disable_tqdm": True,
            "dataloader_num_workers": 0,
            "seed": args.seed,
        }
        results: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
        for repeat in range(args.repeats):
            for mode in results:
                flags.update(output_dir=root / f"run-{mode}-{repeat}", group_by_modality_length=mode == "on")
                results[mode].append(run([f"--{key}={value}" for key, value in flags.items()]))

    print(f"ShapesWorld {args.data}: {num_samples} stage-2 samples, {num_text} without image; tiny Llama + {TOWER}; "
          f"micro-batch {args.batch_size} x {args.grad_accum} accumulation, fp32, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print("| --group_by_modality_length | steps | micro-batches | real tokens | all tokens | padded share "
          "| s | real tokens/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    medians = {}
    for mode, runs in results.items():
        medians[mode] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        m = medians[mode]
        print(f"| {mode} | {m['steps']:.0f} | {m['micro-batches']:.0f} | {m['real tokens']:,.0f} "
              f"| {m['all tokens']:,.0f} | {m['padded share']:.1%} | {m['seconds']:.1f} | {m['tokens/s']:,.0f} |")
    off, on = medians["off"], medians["on"]
    print(f"grouped / ungrouped throughput: {on['tokens/s'] / off['tokens/s']:.2f}x; padded share "
          f"{off['padded share']:.1%} -> {on['padded share']:.1%} ({off['all tokens'] / on['all tokens']:.2f}x fewer "
          "tokens computed)")


if __name__ == "__main__":
    main()
