#!/usr/bin/env bash
# Contrastive fine-tuning on DataComp-1B (paper card: image tower from UTA pre-training, text tower from the CLIP
# teacher, temperature fixed at 0.01, global batch 49,152, LAMB, peak lr 2e-4 base / 4e-4 large, layer-wise lr decay
# 0.75 base / 0.85 large, weight decay 0.05, cosine to 0). finetune_clip_b.sh and finetune_clip_l.sh set the model
# variables. The number of samples seen and the warm-up are not in the paper card: EPOCHS and WARMUP are ours.
# Multi-node: put the nodes in HOSTFILE. Extra arguments are passed to llava-uta-finetune-clip.
set -euo pipefail
DATA=${DATA:-/data/datacomp1b/shards}                # webdataset shards (.jpg + .txt), or an open_clip CSV
INIT=${INIT:-runs/uta_b14_224/student.safetensors}   # a llava-uta-pretrain student, or a released UTA checkpoint
TEXT_MODEL=${TEXT_MODEL:-EVA01-g-14-plus}           # open_clip name of the teacher, whose text tower is fine-tuned:
TEXT_WEIGHTS=${TEXT_WEIGHTS:-/ckpt/EVA01_CLIP_g_14_plus_psz14_s11B.pt}   # open_clip:TEXT_MODEL@TEXT_WEIGHTS
LR=${LR:-2e-4}
LAYER_DECAY=${LAYER_DECAY:-0.75}
EPOCHS=${EPOCHS:-1}
WARMUP=${WARMUP:-2000}
OUT=${OUT:-runs/uta_clip}
GPUS=${GPUS:-8}
HOSTFILE=${HOSTFILE:-}                               # empty: one node
MICRO_BATCH=${MICRO_BATCH:-256}                      # per GPU; accumulation (feature caching) fills 49,152

launcher=(deepspeed --num_gpus "$GPUS")
[ -n "$HOSTFILE" ] && launcher=(deepspeed --hostfile "$HOSTFILE")
"${launcher[@]}" --module pretrain.finetune_clip \
  --train_data "$DATA" --output_dir "$OUT" --init "$INIT" \
  --text_model "open_clip:$TEXT_MODEL@$TEXT_WEIGHTS" --logit_scale 100 \
  --epochs "$EPOCHS" --batch_size 49152 --micro_batch_size "$MICRO_BATCH" \
  --optimizer lamb --lr "$LR" --min_lr 0 --warmup_steps "$WARMUP" --weight_decay 0.05 --layer_decay "$LAYER_DECAY" \
  --beta1 0.9 --beta2 0.98 --eps 1e-6 --bf16 --grad_checkpointing --workers 10 --save_every 500 --keep_last 3 \
  --resume \
  "$@"
