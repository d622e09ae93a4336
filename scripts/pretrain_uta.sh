#!/usr/bin/env bash
# UTA pre-training on ImageNet-21K (paper card: 224 px, patch 14, 150 epochs, global batch 4096, AdamW wd 0.05,
# lr warmed up linearly to 1.5e-3 over 1 epoch then cosine to 1e-5; mask ratio 0.4 base / 0.5 large),
# aligned to a frozen giant EVA-CLIP. pretrain_uta_b14.sh and pretrain_uta_l14.sh set the model variables.
# Multi-node: put the nodes in HOSTFILE. Extra arguments are passed to llava-uta-pretrain.
set -euo pipefail
DATA=${DATA:-/data/imagenet21k/train}                # ImageFolder root, or a folder of tar shards
TEACHER=${TEACHER:-EVA01-g-14-plus}                  # open_clip name: the teacher is open_clip:TEACHER@TEACHER_WEIGHTS
TEACHER_WEIGHTS=${TEACHER_WEIGHTS:-/ckpt/EVA01_CLIP_g_14_plus_psz14_s11B.pt}   # (docs/model-sources.md)
MODEL=${MODEL:-uta_b14_224}
MASK_RATIO=${MASK_RATIO:-0.4}
DROP_PATH=${DROP_PATH:-0.0}
OUT=${OUT:-runs/$MODEL}
GPUS=${GPUS:-8}
HOSTFILE=${HOSTFILE:-}                               # empty: one node
MICRO_BATCH=${MICRO_BATCH:-128}                      # per GPU; accumulation fills the global batch of 4096

launcher=(deepspeed --num_gpus "$GPUS")
[ -n "$HOSTFILE" ] && launcher=(deepspeed --hostfile "$HOSTFILE")
"${launcher[@]}" --module pretrain.train \
  --data_path "$DATA" --output_dir "$OUT" \
  --teacher "open_clip:$TEACHER@$TEACHER_WEIGHTS" --teacher_precision bf16 \
  --model "$MODEL" --objective uta --masking reversed_block --mask_ratio "$MASK_RATIO" \
  --epochs 150 --batch_size 4096 --micro_batch_size "$MICRO_BATCH" \
  --lr 1.5e-3 --min_lr 1e-5 --warmup_epochs 1 --weight_decay 0.05 --adam_beta2 0.98 --grad_clip 3.0 \
  --drop_path "$DROP_PATH" --bf16 --zero_stage 1 --workers 10 --save_every 1000 --keep_last 3 --resume \
  "$@"
