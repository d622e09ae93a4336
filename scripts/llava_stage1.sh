#!/usr/bin/env bash
# LLaVA stage 1 with the UTA tower (paper card): CC-3M-595K captions, projector only, AdamW lr 2e-3,
# 150 warm-up iterations then cosine to 0, global batch 128, no weight decay, 1 epoch.
# Usage: NUM_GPUS=8 bash scripts/llava_stage1.sh [--hostfile hostfile]   (every path below can be overridden)
set -euo pipefail

LLM=${LLM:-lmsys/vicuna-7b-v1.3}                    # a local Vicuna-7B folder
TOWER=${TOWER:-checkpoints/towers/uta-l14-336}       # from: llava-uta-convert <uta checkpoint> <folder>
DATA=${DATA:-playground/data/LLaVA-CC3M-Pretrain-595K/chat.json}
IMAGES=${IMAGES:-playground/data/LLaVA-CC3M-Pretrain-595K/images}
OUT=${OUT:-checkpoints/llava-uta-vicuna-7b-stage1}
PROJECTOR=${PROJECTOR:-linear}                       # original LLaVA; mlp2x_gelu for LLaVA-1.5
NUM_GPUS=${NUM_GPUS:-8}
PER_DEVICE=${PER_DEVICE:-16}
GLOBAL_BATCH=128
GRAD_ACC=$((GLOBAL_BATCH / (NUM_GPUS * PER_DEVICE)))

deepspeed --num_gpus "$NUM_GPUS" "$@" --module llava_uta.train \
    --deepspeed scripts/zero2.json \
    --model_name_or_path "$LLM" \
    --version plain \
    --data_path "$DATA" \
    --image_folder "$IMAGES" \
    --vision_tower "$TOWER" \
    --mm_projector_type "$PROJECTOR" \
    --tune_mm_mlp_adapter True \
    --mm_vision_select_layer -2 \
    --bf16 True \
    --output_dir "$OUT" \
    --num_train_epochs 1 \
    --per_device_train_batch_size "$PER_DEVICE" \
    --gradient_accumulation_steps "$GRAD_ACC" \
    --eval_strategy no \
    --save_strategy steps --save_steps 2400 --save_total_limit 1 \
    --learning_rate 2e-3 --weight_decay 0. --warmup_steps 150 --lr_scheduler_type cosine \
    --logging_steps 1 --model_max_length 2048 --gradient_checkpointing True \
    --dataloader_num_workers 4 --lazy_preprocess True --report_to none
