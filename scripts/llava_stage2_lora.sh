#!/usr/bin/env bash
# LLaVA stage 2 with LoRA on the LLM (projector trained in full): the stage-2 recipe with LLaVA's LoRA settings
# (r 128, alpha 256, lr 2e-4, projector lr 2e-5). Then merge:
#   llava-uta-merge-lora --model_path "$OUT" --save_model_path "$OUT-merged"
# Usage: NUM_GPUS=8 bash scripts/llava_stage2_lora.sh [--hostfile hostfile]
set -euo pipefail

LLM=${LLM:-lmsys/vicuna-7b-v1.3}
TOWER=${TOWER:-checkpoints/towers/uta-l14-336}
STAGE1=${STAGE1:-checkpoints/llava-uta-vicuna-7b-stage1}
DATA=${DATA:-playground/data/llava_instruct_150k.json}
IMAGES=${IMAGES:-playground/data/coco/train2014}
OUT=${OUT:-checkpoints/llava-uta-vicuna-7b-lora}
PROJECTOR=${PROJECTOR:-linear}
NUM_GPUS=${NUM_GPUS:-8}
PER_DEVICE=${PER_DEVICE:-4}
GLOBAL_BATCH=32
GRAD_ACC=$((GLOBAL_BATCH / (NUM_GPUS * PER_DEVICE)))

deepspeed --num_gpus "$NUM_GPUS" "$@" --module llava_uta.train \
    --deepspeed scripts/zero2.json \
    --lora_enable True --lora_r 128 --lora_alpha 256 --mm_projector_lr 2e-5 \
    --model_name_or_path "$LLM" \
    --version v1 \
    --data_path "$DATA" \
    --image_folder "$IMAGES" \
    --vision_tower "$TOWER" \
    --pretrain_mm_mlp_adapter "$STAGE1/mm_projector.bin" \
    --mm_projector_type "$PROJECTOR" \
    --mm_vision_select_layer -2 \
    --bf16 True \
    --output_dir "$OUT" \
    --num_train_epochs 3 \
    --per_device_train_batch_size "$PER_DEVICE" \
    --gradient_accumulation_steps "$GRAD_ACC" \
    --eval_strategy no \
    --save_strategy steps --save_steps 5000 --save_total_limit 1 \
    --learning_rate 2e-4 --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine \
    --logging_steps 1 --model_max_length 2048 --gradient_checkpointing True \
    --dataloader_num_workers 4 --lazy_preprocess True --report_to none
