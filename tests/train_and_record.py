"""`llava-uta-train` under the DeepSpeed launcher, plus what the trained model computes in memory (for the tests).

    deepspeed --num_gpus 2 tests/train_and_record.py --record RECORD.safetensors TRAIN_ARGS...

After training, every rank runs the in-memory model on one fixed batch of the run's data (under ZeRO-3 the forward
gathers the partitioned weights collectively); rank 0 writes the batch and its logits to RECORD, so that a test can
compare them with what the saved outputs compute.
"""

from __future__ import annotations

import argparse

import torch
from safetensors.torch import save_file

from llava_uta.distributed import end_process_group
from llava_uta.train.train import train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--record", required=True)
    args, train_argv = parser.parse_known_args()
    trainer = train(train_argv)
    dataset = trainer.train_dataset
    batch = trainer.data_collator([dataset[i] for i in (0, 1, len(dataset) - 1)])
    with torch.no_grad():
        logits = trainer.model.eval()(**batch).logits
    if trainer.is_world_process_zero():
        save_file({**batch, "logits": logits.contiguous()}, args.record)
    end_process_group()


if __name__ == "__main__":
    main()
