#!/usr/bin/env bash
# UTA-B/14 on ImageNet-1K with EVA-02-B's values (lr 1e-4, layer decay 0.7, drop path 0.1, smoothing 0.1).
MODEL=${MODEL:-uta_b14_224} INIT=${INIT:-runs/uta_b14_224/student.safetensors} OUT=${OUT:-runs/uta_b14_in1k} \
  LR=1e-4 LAYER_DECAY=0.7 DROP_PATH=0.1 SMOOTHING=0.1 MICRO_BATCH=${MICRO_BATCH:-32} \
  exec "$(dirname "$0")/finetune_cls.sh" "$@"
