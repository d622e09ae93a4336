#!/usr/bin/env bash
# UTA-L/14 on ImageNet-1K with EVA-02-L's values (lr 5e-5, layer decay 0.8, drop path 0.15, smoothing 0.2).
MODEL=${MODEL:-uta_l14_224} INIT=${INIT:-runs/uta_l14_224/student.safetensors} OUT=${OUT:-runs/uta_l14_in1k} \
  LR=5e-5 LAYER_DECAY=0.8 DROP_PATH=0.15 SMOOTHING=0.2 MICRO_BATCH=${MICRO_BATCH:-16} \
  exec "$(dirname "$0")/finetune_cls.sh" "$@"
