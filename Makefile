# Two commands for a fresh machine (see README.md):
#   make demo   set up .venv and run the embedded-default pipeline
#   make test   set up .venv and run the test suite
# Both reuse the environment on later runs.

PYTHON ?= python3
VENV ?= .venv
# The torch build to install. The default is a pair that imports together on a CPU-only machine.
# On a GPU box, put your CUDA pair here, or install it into the venv first: an installed torch is kept.
TORCH ?= torch==2.14.1 torchvision==0.29.1
DATA ?= playground/data/shapes
RUNS ?= runs/shapes
SEED ?= 0
# CPU budgets of the embedded default (optimizer steps)
TEACHER_STEPS ?= 400
UTA_STEPS ?= 300
LM_STEPS ?= 300
STAGE1_STEPS ?= 150
STAGE2_STEPS ?= 200

BIN := $(VENV)/bin
STAMP := $(VENV)/.llava-uta-installed

.PHONY: setup demo test lint clean-data clean-runs

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/pip install $(TORCH)
	$(BIN)/python -c "import torch, torchvision; \
		print('torch==' + torch.__version__.split('+')[0]); \
		print('torchvision==' + torchvision.__version__.split('+')[0])" > $(VENV)/torch-constraints.txt
	$(BIN)/pip install -c $(VENV)/torch-constraints.txt -e ".[dev]"
	touch $@

# The embedded-default pipeline. Every stage is a file target: a stage whose output exists is skipped,
# so an interrupted `make demo` resumes where it stopped.
WORLD := $(DATA)/manifest.json
TEACHER := $(RUNS)/teacher/open_clip_config.json
STUDENT := $(RUNS)/uta/student.safetensors
TOWER := $(RUNS)/tower/config.json
LM := $(RUNS)/tiny-lm/config.json
STAGE1 := $(RUNS)/llava-stage1/mm_projector.bin
STAGE2 := $(RUNS)/llava-stage2/model.safetensors
BENCH := $(DATA)/eval/llava-bench-shapes
BENCH_SUMMARY := $(RUNS)/bench/summary.md
ZS_FLAGS = --eval_data $(DATA)/zeroshot/val --eval_classnames $(DATA)/zeroshot/classnames.json \
	--eval_templates $(DATA)/zeroshot/templates.json

demo: $(BENCH_SUMMARY)
	@$(BIN)/python -c "import json; s = json.load(open('$(RUNS)/uta/summary.json')); \
		print('zero-shot top-1 on ShapesWorld: teacher %.3f, UTA student %.3f' \
		% (s['teacher_zeroshot']['top1'], s['zeroshot']['top1']))"
	@echo "LLaVA with the UTA tower: $(RUNS)/llava-stage2 (chat: $(BIN)/llava-uta-chat --model-path $(RUNS)/llava-stage2 --image-file IMAGE)"
	@cat $(BENCH_SUMMARY)

$(WORLD): | $(STAMP)
	$(BIN)/llava-uta-shapes --out $(DATA) --seed $(SEED)

$(TEACHER): $(WORLD)
	$(BIN)/llava-uta-train-clip --train-csv $(DATA)/clip/captions.csv --out $(RUNS)/teacher \
		--steps $(TEACHER_STEPS) --group-size 4 --seed $(SEED)

$(STUDENT): $(TEACHER)
	$(BIN)/uta-pretrain --data_path $(DATA)/pretrain/train --output_dir $(RUNS)/uta --resume \
		--teacher local-dir:$(RUNS)/teacher --model uta_tiny_p8_64 --mask_ratio 0.5 --max_steps $(UTA_STEPS) \
		--batch_size 128 --micro_batch_size 128 --lr 1e-3 --warmup_steps 20 --crop_min_scale 0.5 \
		--workers 1 --save_every 100 --seed $(SEED) $(ZS_FLAGS)

$(TOWER): $(STUDENT)
	$(BIN)/llava-uta-convert $(STUDENT) $(RUNS)/tower

$(LM): $(WORLD)
	$(BIN)/llava-uta-tiny-lm --corpus $(DATA)/text/corpus.txt --chat_json $(DATA)/llava/instruct.json \
		--out $(RUNS)/tiny-lm --steps $(LM_STEPS) --seed $(SEED)

$(STAGE1): $(TOWER) $(LM)
	$(BIN)/llava-uta-train --model_name_or_path $(RUNS)/tiny-lm --vision_tower $(RUNS)/tower --version plain \
		--tune_mm_mlp_adapter True --mm_projector_type mlp2x_gelu --data_path $(DATA)/llava/pretrain.json \
		--image_folder $(DATA) --output_dir $(RUNS)/llava-stage1 --per_device_train_batch_size 32 \
		--max_steps $(STAGE1_STEPS) --learning_rate 2e-3 --warmup_steps 15 --lr_scheduler_type cosine \
		--weight_decay 0. --logging_steps 10 --save_strategy no --report_to none --seed $(SEED)

$(STAGE2): $(STAGE1)
	$(BIN)/llava-uta-train --model_name_or_path $(RUNS)/tiny-lm --vision_tower $(RUNS)/tower --version v1 \
		--pretrain_mm_mlp_adapter $(STAGE1) --mm_projector_type mlp2x_gelu --data_path $(DATA)/llava/instruct.json \
		--image_folder $(DATA) --output_dir $(RUNS)/llava-stage2 --per_device_train_batch_size 16 \
		--max_steps $(STAGE2_STEPS) --learning_rate 1e-3 --warmup_steps 10 --lr_scheduler_type cosine \
		--group_by_modality_length True --logging_steps 10 --save_strategy no --report_to none --seed $(SEED)

# LLaVA-Bench on the held-out ShapesWorld images: answers, offline review against the scene graphs, summary.
# answer and review resume by themselves, so the recipe is one target.
$(BENCH_SUMMARY): $(STAGE2)
	$(BIN)/llava-uta-bench answer --model-path $(RUNS)/llava-stage2 --question-file $(BENCH)/questions.jsonl \
		--image-folder $(BENCH)/images --answers-file $(RUNS)/bench/answers.jsonl --max-new-tokens 128 --batch-size 8
	$(BIN)/llava-uta-bench review --question $(BENCH)/questions.jsonl --context $(BENCH)/context.jsonl \
		--answer-list $(BENCH)/answers_gpt4.jsonl $(RUNS)/bench/answers.jsonl --output $(RUNS)/bench/reviews.jsonl \
		--judge shapes --ground-truth $(BENCH)/ground_truth.jsonl
	$(BIN)/llava-uta-bench summarize $(RUNS)/bench/reviews.jsonl --plot $(RUNS)/bench/summary.png \
		--markdown $(BENCH_SUMMARY)

test: $(STAMP)
	sh tests/install_chromium.sh || echo "no Chromium (needs root): the browser test will be skipped"
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

clean-data:
	rm -rf $(DATA)

clean-runs:
	rm -rf $(RUNS)
