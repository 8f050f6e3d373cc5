# Two commands on a fresh machine: `make demo` trains a tiny model on synthetic videos, `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# Without an NVIDIA GPU take the CPU build of torch: a plain `pip install torch` pulls several GB of CUDA wheels.
# Set TORCH_CPU_INDEX= (empty) where pip already finds a CPU build locally.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=

.PHONY: demo test venv clean-demo

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if nvidia-smi -L >/dev/null 2>&1 || [ -z "$(TORCH_CPU_INDEX)" ]; then \
		$(PY) -m pip install -q torch==$(TORCH_VERSION); \
	else \
		$(PY) -m pip install -q --retries 1 --timeout 15 torch==$(TORCH_VERSION) --index-url $(TORCH_CPU_INDEX) || { \
		echo "cannot install torch from $(TORCH_CPU_INDEX); trying pip's own index"; \
		$(PY) -m pip install -q torch==$(TORCH_VERSION); }; \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

DEMO := runs/tiny_1level

demo: venv
	$(VENV)/bin/hpdm train --config configs/tiny_1level.yaml
	@$(MAKE) --no-print-directory $(DEMO)/eval-synthetic.json

# measured again only when training wrote a newer checkpoint
$(DEMO)/eval-synthetic.json: $(DEMO)/checkpoints/latest
	$(VENV)/bin/hpdm eval-synthetic $(DEMO) -n 16 --batch 16 --out $@

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean-demo:
	rm -rf runs/tiny_1level data/synthetic16
