"""`llava-uta-pretrain`: UTA pre-training from the command line, as one process or under `deepspeed`.

    llava-uta-pretrain --data_path /data/imagenet21k/train --output_dir runs/uta_b14 \\
        --teacher EVA01-g-14-plus --teacher_pretrained /ckpt/eva01_g14_plus.bin --model uta_b14_224
    deepspeed --hostfile hostfile -m pretrain.train --data_path ... --bf16 --zero_stage 1   # multi-node
"""

from __future__ import annotations

import json

from transformers import HfArgumentParser

from llava_uta.distributed import end_process_group
from llava_uta.preemption import Preempted, exit_preempted
from pretrain.engine import PretrainArguments, Pretrainer


def build_parser() -> HfArgumentParser:
    return HfArgumentParser(PretrainArguments)


def main(argv: list[str] | None = None) -> None:
    (args,) = build_parser().parse_args_into_dataclasses(args=argv)
    trainer = Pretrainer(args)
    try:
        summary = trainer.train()
    except Preempted as err:
        exit_preempted(err)
    if trainer.rank == 0:
        shown = {k: v for k, v in summary.items() if k != "args"}
        print(json.dumps(shown, indent=2))
    end_process_group()


if __name__ == "__main__":
    main()
