#!/usr/bin/env bash
# LLaVA stage 2 with LoRA on the LLM (projector trained in full): the stage-2 recipe of llava_stage2.sh with
# LLaVA's LoRA settings (r 128, alpha 256, lr 2e-4, projector lr 2e-5) under ZeRO-2. Then merge:
#   llava-uta-merge-lora --model_path "$OUT" --save_model_path "$OUT-merged"
# Usage: NUM_GPUS=8 bash scripts/llava_stage2_lora.sh [--hostfile hostfile]
OUT=${OUT:-checkpoints/llava-uta-vicuna-7b-lora} DS_CONFIG=${DS_CONFIG:-scripts/zero2.json} LR=${LR:-2e-4} \
EXTRA_ARGS="--lora_enable True --lora_r 128 --lora_alpha 256 --mm_projector_lr 2e-5 ${EXTRA_ARGS:-}" \
  exec "$(dirname "$0")/llava_stage2.sh" "$@"
