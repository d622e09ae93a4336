#!/usr/bin/env bash
# UTA-B contrastive fine-tuning (lr 2e-4, layer decay 0.75: the paper card's base setting); see finetune_clip.sh.
INIT=${INIT:-runs/uta_b14_224/student.safetensors} OUT=${OUT:-runs/uta_b14_clip} LR=2e-4 LAYER_DECAY=0.75 \
  MICRO_BATCH=${MICRO_BATCH:-256} exec "$(dirname "$0")/finetune_clip.sh" "$@"
