#!/usr/bin/env bash
# UTA-L contrastive fine-tuning (lr 4e-4, layer decay 0.85: the paper card's large setting); see finetune_clip.sh.
INIT=${INIT:-runs/uta_l14_224/student.safetensors} OUT=${OUT:-runs/uta_l14_clip} LR=4e-4 LAYER_DECAY=0.85 \
  MICRO_BATCH=${MICRO_BATCH:-128} exec "$(dirname "$0")/finetune_clip.sh" "$@"
