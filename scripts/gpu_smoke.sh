#!/usr/bin/env bash
# The first script to run on a GPU box: a few steps of each path a real run takes, every stage a real run of the
# project's tools on a small generated ShapesWorld, each one ending in a PASS or FAIL line with its figures.
#   1. llava-uta-shapes (a world at IMAGE_SIZE px) and llava-uta-train-clip (a tiny teacher CLIP at the student's
#      token grid, a few steps: its quality does not matter here)
#   2. llava-uta-pretrain under deepspeed on NUM_GPUS ranks: bf16, drop path, ZeRO-1, MODEL at IMAGE_SIZE px; the exported
#      student.safetensors must hold fp32 weights
#   3. llava-uta-convert --image-size TOWER_SIZE: the student as a larger tower (224 -> 336 px, as LLaVA-1.5 uses);
#      the tower must give (TOWER_SIZE / patch)^2 + 1 tokens and carry no drop path
#   4. llava-uta-tiny-lm, then LLaVA stage 1 (projector only) for STAGE1_STEPS steps under deepspeed, ZeRO-2, bf16
# Figures: steps/s of both trainings, images/s and student TFLOP/s of pre-training, and the peak memory of each
# stage (GPU: nvidia-smi's memory in use per device, CUDA context included; CPU: the largest process's peak RSS).
#
#   scripts/gpu_smoke.sh                         # the visible GPUs, at most 2
#   NUM_GPUS=1 OUT=/tmp/smoke scripts/gpu_smoke.sh
#   DEVICE=cpu scripts/gpu_smoke.sh              # dry run on 2 CPU ranks (DeepSpeed's CPU accelerator, bf16 too),
#                                                # a tiny student at 64 -> 96 px
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] && export PATH="$PWD/.venv/bin:$PATH"   # as if activated: its tools, and one ninja for
                                                                # DeepSpeed's JIT-built ops in every process

DEVICE=${DEVICE:-cuda}                 # cuda, or cpu for a dry run on CPU ranks
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_smoke.XXXXXX")}
DROP_PATH=${DROP_PATH:-0.1}
STEPS=${STEPS:-8}                      # pre-training steps
STAGE1_STEPS=${STAGE1_STEPS:-2}
if [ "$DEVICE" = cpu ]; then           # the same paths at sizes two CPU cores run in minutes
  export CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu   # CPU ranks even on a GPU box; llava-uta-train then sets use_cpu
  NUM_GPUS=${NUM_GPUS:-2}              # CPU ranks
  MODEL=${MODEL:-uta_tiny_p8_64}
  IMAGE_SIZE=${IMAGE_SIZE:-64}
  TOWER_SIZE=${TOWER_SIZE:-96}
  MICRO_BATCH=${MICRO_BATCH:-8}
else
  if ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "FAIL setup: torch $(python -c 'import torch; print(torch.__version__)') sees no CUDA device: install a CUDA"
    echo "     build of torch (README, Install), or run DEVICE=cpu $0 for a dry run on CPU ranks"
    exit 1
  fi
  NUM_GPUS=${NUM_GPUS:-$(python -c "import torch; print(min(torch.cuda.device_count(), 2))")}
  MODEL=${MODEL:-uta_b14_224}          # student config (llava_uta/model/uta_vit.py)
  IMAGE_SIZE=${IMAGE_SIZE:-224}        # pre-training resolution
  TOWER_SIZE=${TOWER_SIZE:-336}        # the LLaVA tower's resolution
  MICRO_BATCH=${MICRO_BATCH:-16}       # images per rank per step
fi
mkdir -p "$OUT/logs"
PATCH=$(python -c "from llava_uta.model.uta_vit import UTA_VIT_CONFIGS as c; print(c['$MODEL'].patch_size)")
echo "gpu_smoke: DEVICE=$DEVICE NUM_GPUS=$NUM_GPUS MODEL=$MODEL ${IMAGE_SIZE} px -> ${TOWER_SIZE} px tower, OUT=$OUT"
trap 'echo "FAIL gpu_smoke: line $LINENO: $BASH_COMMAND"' ERR

PEAK=""
measure() {  # LOG CMD...: run CMD, its output into LOG; PEAK: the peak memory while it ran
  local log=$1 status=0 sampler
  shift
  if [ "$DEVICE" = cpu ]; then
    python -c 'import resource, subprocess, sys
code = subprocess.call(sys.argv[2:])
open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024))
sys.exit(code)' "$log.mem" "$@" >"$log" 2>&1 || status=$?
    PEAK="peak RSS $(cat "$log.mem" 2>/dev/null || echo '?') MiB per process"
  else
    nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 200 >"$log.mem" &
    sampler=$!
    "$@" >"$log" 2>&1 || status=$?
    kill "$sampler" && wait "$sampler" || true
    PEAK="peak GPU memory $(awk -F', ' '$2 > m[$1] {m[$1] = $2} END {for (g in m) printf "gpu%s %d MiB ", g, m[g]}' \
      "$log.mem")"
  fi
  return "$status"
}

stage() {  # NAME CMD...: run one stage; PASS with its time and memory, or FAIL with the end of its log
  local name=$1 start=$SECONDS
  shift
  if measure "$OUT/logs/$name.log" "$@"; then
    echo "PASS $name: $((SECONDS - start)) s, $PEAK"
  else
    echo "FAIL $name: exit code $?, log $OUT/logs/$name.log, which ends:"
    tail -n 40 "$OUT/logs/$name.log"
    exit 1
  fi
}

check() {  # NAME PYTHON_CODE: a check on a stage's outputs; it prints its figures, or raises (FAIL)
  local log="$OUT/logs/$1.log"
  if ! python -c "$2" >"$log" 2>"$log.err"; then
    echo "FAIL $1:"
    cat "$log" "$log.err"
    exit 1
  fi
  echo "PASS $1: $(cat "$log")"
}

free_port() { python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
ds=(deepspeed --num_gpus "$NUM_GPUS")

# 1. data and a teacher whose token grid matches the student's
stage shapes llava-uta-shapes --out "$OUT/shapes" --image-size "$IMAGE_SIZE" --num-clip 128 \
  --num-pretrain $((4 * NUM_GPUS * MICRO_BATCH)) --num-zeroshot-per-class 1 --num-stage1 $((16 * NUM_GPUS)) \
  --num-stage2 8 --num-bench-images 2 --num-grounding-images 2
cat >"$OUT/teacher_config.json" <<EOF
{"embed_dim": 64,
 "vision_cfg": {"image_size": $IMAGE_SIZE, "patch_size": $PATCH, "width": 64, "layers": 2, "head_width": 32},
 "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
EOF
stage teacher llava-uta-train-clip --train-csv "$OUT/shapes/clip/captions.csv" --out "$OUT/teacher" \
  --model-config "$OUT/teacher_config.json" --steps 3 --batch-size 16

# 2. UTA pre-training: bf16, drop path, DeepSpeed ZeRO-1 on NUM_GPUS ranks (DeepSpeed on one GPU too)
stage pretrain "${ds[@]}" --master_port "$(free_port)" --module pretrain.train \
  --data_path "$OUT/shapes/pretrain/train" --output_dir "$OUT/student" --teacher "open_clip:local-dir:$OUT/teacher" \
  --teacher_precision bf16 --model "$MODEL" --image_size "$IMAGE_SIZE" --drop_path "$DROP_PATH" --bf16 \
  --deepspeed --zero_stage 1 --max_steps "$STEPS" --warmup_steps 1 --batch_size $((NUM_GPUS * MICRO_BATCH)) \
  --micro_batch_size "$MICRO_BATCH" --workers 2 --log_every 1 --save_every 1000000
check student "
import json, math
from safetensors import safe_open
s = json.load(open('$OUT/student/summary.json'))
with safe_open('$OUT/student/student.safetensors', 'pt') as f:
    dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
assert dtypes == {'F32'}, f'student.safetensors holds {dtypes}, not the fp32 master weights'
assert s['steps'] == $STEPS and math.isfinite(s['final_loss']), s
print(f\"{s['steps']} steps, {s['steps'] / s['train_seconds']:.2f} steps/s, {s['images_per_s']:.1f} images/s, \"
      f\"student {s['student_tflops']:.3g} TFLOP/s, final loss {s['final_loss']:.4f}, fp32 export\")"

# 3. the student as a TOWER_SIZE px tower
stage convert llava-uta-convert "$OUT/student/student.safetensors" "$OUT/tower" --image-size "$TOWER_SIZE"
check tower "
import torch
import llava_uta.model  # registers the tower with transformers
from transformers import AutoModel
tower = AutoModel.from_pretrained('$OUT/tower').eval()
out = tower(torch.randn(1, 3, $TOWER_SIZE, $TOWER_SIZE), output_hidden_states=True)
tokens = ($TOWER_SIZE // $PATCH) ** 2 + 1
assert out.last_hidden_state.shape[1] == tokens, (out.last_hidden_state.shape, tokens)
drop = getattr(tower.config, 'drop_path_rate', 0.0)
assert not drop, f'the tower carries drop_path_rate={drop}'
print(f'{tower.config.image_size} px, {tokens} tokens, no drop path')"

# 4. a tiny LM, then LLaVA stage 1 with the tower under deepspeed
stage tiny-lm llava-uta-tiny-lm --corpus "$OUT/shapes/text/corpus.txt" --out "$OUT/lm" --steps 5 \
  --hidden_size 64 --num_layers 2
stage llava-stage1 "${ds[@]}" --master_port "$(free_port)" --module llava_uta.train --deepspeed scripts/zero2.json \
  --bf16 True --model_name_or_path "$OUT/lm" --vision_tower "$OUT/tower" --version plain \
  --tune_mm_mlp_adapter True --mm_projector_type mlp2x_gelu --data_path "$OUT/shapes/llava/pretrain.json" \
  --image_folder "$OUT/shapes" --output_dir "$OUT/llava-stage1" --per_device_train_batch_size 4 \
  --max_steps "$STAGE1_STEPS" --learning_rate 2e-3 --weight_decay 0. --logging_steps 1 --model_max_length 1024 \
  --save_strategy no --report_to none --dataloader_num_workers 2
check llava "
import json, math, os
state = json.load(open('$OUT/llava-stage1/trainer_state.json'))
losses = [e['loss'] for e in state['log_history'] if 'loss' in e]
end = state['log_history'][-1]
assert state['global_step'] == $STAGE1_STEPS and losses and all(map(math.isfinite, losses)), state['log_history']
assert os.path.getsize('$OUT/llava-stage1/mm_projector.bin') > 0
print(f\"{state['global_step']} steps, {end['train_steps_per_second']:.2f} steps/s (first steps included), \"
      f\"loss {losses[0]:.3f} -> {losses[-1]:.3f}, mm_projector.bin written\")"

echo "PASS gpu_smoke: every stage passed; outputs in $OUT"
