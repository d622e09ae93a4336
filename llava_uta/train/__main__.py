"""`python -m llava_uta.train ...` (also `deepspeed --module llava_uta.train ...`): see llava_uta/train/train.py."""

from llava_uta.train.train import main

main()
