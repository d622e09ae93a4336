"""`llava-uta-pretrain`: UTA pre-training from the command line, as one process or under `deepspeed`.

    llava-uta-pretrain --data_path /data/imagenet21k/train --output_dir runs/uta_b14 \\
        --teacher open_clip:EVA01-g-14-plus@/ckpt/eva01_g14_plus.bin --model uta_b14_224
    deepspeed --hostfile hostfile -m pretrain.train --data_path ... --bf16 --zero_stage 1   # multi-node
"""

from __future__ import annotations

import json
from functools import partial

from transformers import HfArgumentParser

from pretrain.engine import PretrainArguments, Pretrainer
from pretrain.loop import training_cli


def build_parser() -> HfArgumentParser:
    return HfArgumentParser(PretrainArguments)


def main(argv: list[str] | None = None) -> None:
    training_cli(build_parser(), Pretrainer, argv, show=partial(json.dumps, indent=2))


if __name__ == "__main__":
    main()
