#!/usr/bin/env bash
# ImageNet-1K fine-tuning of a UTA ViT with EVA-02's recipe (MIM-pretrained tower -> IN-1K, no intermediate IN-21K
# stage): 448 px, global batch 1024, 30 epochs with 3 of warm-up, AdamW (0.9, 0.999), weight decay 0.05, cosine to 0,
# RandAugment rand-m9-mstd0.5-inc1, random-resized crop from 0.08, no mixup / cutmix / random erasing, EMA of the
# weights, evaluation at crop_pct 1.0. finetune_cls_b.sh and finetune_cls_l.sh set the per-size values (lr, layer
# decay, drop path, label smoothing). Multi-node: put the nodes in HOSTFILE. Extra arguments go to llava-uta-finetune-cls.
set -euo pipefail
DATA=${DATA:-/data/imagenet}                         # ImageFolder with train/ and val/
MODEL=${MODEL:-uta_b14_224}
INIT=${INIT:-runs/uta_b14_224/student.safetensors}   # a llava-uta-pretrain student, or a released UTA checkpoint
LR=${LR:-1e-4}
LAYER_DECAY=${LAYER_DECAY:-0.7}
DROP_PATH=${DROP_PATH:-0.1}
SMOOTHING=${SMOOTHING:-0.1}
OUT=${OUT:-runs/uta_b14_in1k}
GPUS=${GPUS:-8}
HOSTFILE=${HOSTFILE:-}                               # empty: one node
MICRO_BATCH=${MICRO_BATCH:-32}                       # per GPU; accumulation fills the global batch of 1024

launcher=(deepspeed --num_gpus "$GPUS")
[ -n "$HOSTFILE" ] && launcher=(deepspeed --hostfile "$HOSTFILE")
"${launcher[@]}" --module pretrain.finetune_cls \
  --train_data "$DATA/train" --val_data "$DATA/val" --output_dir "$OUT" --model "$MODEL" --init "$INIT" \
  --image_size 448 --global_pool avg --epochs 30 --warmup_epochs 3 --batch_size 1024 \
  --micro_batch_size "$MICRO_BATCH" --lr "$LR" --min_lr 0 --weight_decay 0.05 --layer_decay "$LAYER_DECAY" \
  --beta1 0.9 --beta2 0.999 --drop_path "$DROP_PATH" --smoothing "$SMOOTHING" \
  --auto_augment rand-m9-mstd0.5-inc1 --scale_min 0.08 --reprob 0 --mixup 0 --cutmix 0 --crop_pct 1.0 \
  --model_ema --model_ema_decay 0.9999 --bf16 --workers 10 --eval_every 5000 --save_every 2000 --keep_last 2 \
  --resume \
  "$@"
