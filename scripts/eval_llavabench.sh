#!/usr/bin/env bash
# LLaVA-Bench with llava-uta-bench: answer (greedy, one shard per GPU), review with a judge, summarize.
# Usage:
#   BENCH=wild MODEL=checkpoints/llava-uta-vicuna-7b RULE=LLaVA/llava/eval/table/rule.json \
#     bash scripts/eval_llavabench.sh                                                   # In-the-Wild
#   BENCH=coco MODEL=... RULE=LLaVA/llava/eval/table/rule.json bash scripts/eval_llavabench.sh   # COCO qa90
#   BENCH=shapes MODEL=... JUDGE=shapes bash scripts/eval_llavabench.sh                 # ShapesWorld, offline judge
# The judge is any OpenAI-compatible endpoint; its key is read from the variable named by JUDGE_KEY_ENV.
# RULE is the judge's prompt file, required with JUDGE=http: LLaVA's own llava/eval/table/rule.json (from a clone
# of haotian-liu/LLaVA) for LLaVA's protocol, or llava_uta/eval/llavabench/llava_uta_rule.json, this project's
# own prompts (not LLaVA's). Scores are comparable only between runs with the same judge model and rule file;
# LLaVA's published numbers used gpt-4-0314, now retired, so review the baselines you compare with here too.
set -euo pipefail

BENCH=${BENCH:-wild}                       # wild | coco | shapes
MODEL=${MODEL:-checkpoints/llava-uta-vicuna-7b}
MODEL_BASE=${MODEL_BASE:-}                 # base LLM of a LoRA / stage-1 folder
NAME=${NAME:-$(basename "$MODEL")}
CONV_MODE=${CONV_MODE:-vicuna_v1}
NUM_GPUS=${NUM_GPUS:-1}
JUDGE=${JUDGE:-http}                       # http | shapes
JUDGE_BASE_URL=${JUDGE_BASE_URL:-https://api.openai.com/v1}
JUDGE_MODEL=${JUDGE_MODEL:-gpt-4-0613}
JUDGE_KEY_ENV=${JUDGE_KEY_ENV:-OPENAI_API_KEY}
RULE=${RULE:-}                             # judge prompts (see above); the shapes judge reads none

if [[ "$JUDGE" == http && -z "$RULE" ]]; then
  echo "JUDGE=http needs RULE: LLaVA's llava/eval/table/rule.json for LLaVA's protocol," \
    "or llava_uta/eval/llavabench/llava_uta_rule.json (this project's prompts, not LLaVA's)" >&2
  exit 1
fi
[[ -z "$RULE" || -f "$RULE" ]] || { echo "RULE=$RULE: no such file" >&2; exit 1; }

case "$BENCH" in   # the review picks rule keys as LLaVA does: llava_bench_<category>, bare <category> for COCO
  wild)
    ROOT=${ROOT:-playground/data/eval/llava-bench-in-the-wild}
    QUESTIONS=$ROOT/questions.jsonl; IMAGES=$ROOT/images; CONTEXT=$ROOT/context.jsonl
    REFERENCE=$ROOT/answers_gpt4.jsonl ;;
  coco)
    ROOT=${ROOT:-playground/data/coco2014_val_qa_eval}
    QUESTIONS=$ROOT/qa90_questions.jsonl; IMAGES=${IMAGES:-playground/data/coco/val2014}
    CONTEXT=${CONTEXT:-playground/data/caps_boxes_coco2014_val_80.jsonl}
    REFERENCE=$ROOT/qa90_gpt4_answer.jsonl ;;
  shapes)
    ROOT=${ROOT:-playground/data/shapes/eval/llava-bench-shapes}
    QUESTIONS=$ROOT/questions.jsonl; IMAGES=$ROOT/images; CONTEXT=$ROOT/context.jsonl
    REFERENCE=$ROOT/answers_gpt4.jsonl ;;
  *) echo "BENCH must be wild, coco or shapes" >&2; exit 1 ;;
esac

mkdir -p "$ROOT/answers" "$ROOT/reviews"
base_args=(); [[ -n "$MODEL_BASE" ]] && base_args=(--model-base "$MODEL_BASE")
pids=()
for ((i = 0; i < NUM_GPUS; i++)); do
  CUDA_VISIBLE_DEVICES=$i llava-uta-bench answer --model-path "$MODEL" "${base_args[@]}" \
    --question-file "$QUESTIONS" --image-folder "$IMAGES" --conv-mode "$CONV_MODE" --temperature 0 \
    --answers-file "$ROOT/answers/$NAME.chunk$i.jsonl" --num-chunks "$NUM_GPUS" --chunk-idx "$i" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done   # a failed shard stops the script
cat "$ROOT"/answers/"$NAME".chunk*.jsonl > "$ROOT/answers/$NAME.jsonl"

judge_args=(--judge "$JUDGE")
[[ "$JUDGE" == http ]] && judge_args+=(--judge-base-url "$JUDGE_BASE_URL" --judge-model "$JUDGE_MODEL" \
  --judge-api-key-env "$JUDGE_KEY_ENV")
rule_args=(); [[ -n "$RULE" ]] && rule_args=(--rule "$RULE")
llava-uta-bench review --question "$QUESTIONS" --context "$CONTEXT" "${judge_args[@]}" "${rule_args[@]}" \
  --answer-list "$REFERENCE" "$ROOT/answers/$NAME.jsonl" --output "$ROOT/reviews/$NAME.jsonl"

llava-uta-bench summarize "$ROOT/reviews/$NAME.jsonl" --markdown "$ROOT/reviews/$NAME.md" \
  --plot "$ROOT/reviews/$NAME.png"
