# `make test` and `make demo` create .venv on first use. CPU torch is installed first so that no
# CUDA wheels are pulled on machines without a GPU (set TORCH_SPEC to override).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: test lint demo shapes-model shapes-miniature bench-speed clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# the optional lmms-eval plugin is tested too; its torchvision pin has no CPU wheel, hence --no-deps
	$(BIN)/python -m pip install -q --no-deps "lmms-eval==0.7.3" loguru pytz
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# The main job: the shipped shapes model with and without the method, pictures in demo-output/.
demo: $(STAMP)
	$(BIN)/unclutter demo

# Rebuild the shipped model from nothing (about 30 min on 2 CPU cores): world -> tokenizer and random
# init -> ViT pretrained on the world's ground truth -> stage 1 (captions) -> stage 2 (conversations)
# -> fp16 copy into the package.
shapes-model: $(STAMP)
	$(BIN)/unclutter data shapes --out build/shapes/train --num 8000 --seed 0
	$(BIN)/unclutter data shapes --out build/shapes/test --num 500 --seed 1 --if-per-task 10
	$(BIN)/python -m unclutter.shapes.model init build/shapes/train build/shapes/init
	$(BIN)/python -m unclutter.shapes.model vision build/shapes/train build/shapes/init/vision build/shapes/vision
	$(BIN)/unclutter train --config configs/shapes/pretrain.yaml
	$(BIN)/unclutter train --config configs/shapes/finetune.yaml
	$(BIN)/python -m unclutter.shapes.model ship build/shapes/stage2

# The README's miniature of the paper: every method on the held-out shapes benchmarks.
shapes-miniature: $(STAMP)
	scripts/shapes_miniature.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
