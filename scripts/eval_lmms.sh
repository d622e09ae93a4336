#!/usr/bin/env bash
# LLaVA-1.5's benchmark suite with lmms-eval on a trained LLaVA-UTA folder (needs `pip install -e ".[lmms]"`).
# Usage:
#   MODEL=checkpoints/llava-uta-vicuna-7b bash scripts/eval_lmms.sh                       # the standard suite
#   MODEL=checkpoints/llava-uta-lora MODEL_BASE=lmsys/vicuna-7b-v1.5 NUM_GPUS=8 bash scripts/eval_lmms.sh
#   MODEL=runs/shapes/llava/uta/stage2 TASKS=shapesworld bash scripts/eval_lmms.sh        # local, offline
# MODEL is any folder llava-uta-chat loads (stage 2, LoRA + base, stage 1 + base). The standard tasks fetch their
# data from the HF hub (lmms-lab-encoder/*) on first use into the HF datasets cache. Scoring: vqav2_test writes an
# EvalAI submission file (VQAv2 test-dev, as LLaVA-1.5 reports it); mmbench_en_dev and llava_in_the_wild are
# judged by an OpenAI model ($OPENAI_API_KEY); the others score locally. SEED-Bench's video questions carry several
# frames: multi_image=middle answers about the middle one (LLaVA's convention); the model answers about one image.
# NUM_GPUS > 1 runs `accelerate launch` with one data-parallel process per GPU.
set -euo pipefail

MODEL=${MODEL:?set MODEL to a LLaVA-UTA training output folder}
MODEL_BASE=${MODEL_BASE:-}                 # base LLM of a LoRA / stage-1 folder (default: from its config.json)
CONV_MODE=${CONV_MODE:-}                   # default: the model's (config.json), else v1
NAME=${NAME:-$(basename "$MODEL")}
TASKS=${TASKS:-mme,pope,gqa,vqav2_test,textvqa_val,mmbench_en_dev,scienceqa_img,seedbench,llava_in_the_wild}
BATCH_SIZE=${BATCH_SIZE:-1}                # questions per generate call (left-padded)
NUM_GPUS=${NUM_GPUS:-1}
OUT=${OUT:-runs/lmms/$NAME}
SHAPES_DIR=${SHAPES_DIR:-playground/data/shapes}   # the ShapesWorld of TASKS=shapesworld

model_args="pretrained=$MODEL,multi_image=middle"
[[ -n "$MODEL_BASE" ]] && model_args+=",model_base=$MODEL_BASE"
[[ -n "$CONV_MODE" ]] && model_args+=",conv_mode=$CONV_MODE"
launcher=(python -m lmms_eval)
((NUM_GPUS > 1)) && launcher=(accelerate launch --num_processes "$NUM_GPUS" -m lmms_eval)

mkdir -p "$OUT"
LLAVA_UTA_SHAPES_DIR=$SHAPES_DIR "${launcher[@]}" --model llava_uta --model_args "$model_args" \
  --tasks "$TASKS" --include_path llava_uta/eval/lmms/tasks --batch_size "$BATCH_SIZE" \
  --output_path "$OUT" --log_samples 2>&1 | tee "$OUT/lmms_eval.log"
# lmms-eval logs a failed evaluation and still exits 0: fail here instead
if grep -q "Error during evaluation" "$OUT/lmms_eval.log"; then
  echo "eval_lmms.sh: lmms-eval failed, see $OUT/lmms_eval.log" >&2
  exit 1
fi
