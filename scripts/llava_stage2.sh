#!/usr/bin/env bash
# LLaVA stage 2 with the UTA tower (paper card): Instruct-150K, projector + LLM (tower frozen),
# global batch 32, lr 2e-5 cosine, no weight decay; starts from the stage-1 mm_projector.bin.
# Usage: NUM_GPUS=8 bash scripts/llava_stage2.sh [--hostfile hostfile]
set -euo pipefail

LLM=${LLM:-lmsys/vicuna-7b-v1.3}
TOWER=${TOWER:-checkpoints/towers/uta-l14-336}
STAGE1=${STAGE1:-checkpoints/llava-uta-vicuna-7b-stage1}
DATA=${DATA:-playground/data/llava_instruct_150k.json}
IMAGES=${IMAGES:-playground/data/coco/train2014}
OUT=${OUT:-checkpoints/llava-uta-vicuna-7b}
PROJECTOR=${PROJECTOR:-linear}
DS_CONFIG=${DS_CONFIG:-scripts/zero3.json}
LR=${LR:-2e-5}
EXTRA_ARGS=${EXTRA_ARGS:-}                 # more llava-uta-train flags (llava_stage2_lora.sh sets the LoRA ones)
NUM_GPUS=${NUM_GPUS:-8}
PER_DEVICE=${PER_DEVICE:-4}
GLOBAL_BATCH=32
GRAD_ACC=$((GLOBAL_BATCH / (NUM_GPUS * PER_DEVICE)))

deepspeed --num_gpus "$NUM_GPUS" "$@" --module llava_uta.train \
    --deepspeed "$DS_CONFIG" \
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
    --learning_rate "$LR" --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine \
    --logging_steps 1 --model_max_length 2048 --gradient_checkpointing True \
    --dataloader_num_workers 4 --lazy_preprocess True --report_to none \
    $EXTRA_ARGS
