# Two commands on a fresh machine: `make demo` trains a tiny model on synthetic videos, `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# Without an NVIDIA GPU take the CPU build of torch: a plain `pip install torch` pulls several GB of CUDA wheels.
# Set TORCH_CPU_INDEX= (empty) where pip already finds a CPU build locally.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=

.PHONY: demo test venv clean-demo device-wheels

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if nvidia-smi -L >/dev/null 2>&1 || [ -z "$(TORCH_CPU_INDEX)" ]; then \
		$(PY) -m pip install -q torch==$(TORCH_VERSION); \
	else \
		$(PY) -m pip install -q --retries 1 --timeout 15 torch==$(TORCH_VERSION) --index-url $(TORCH_CPU_INDEX) || { \
		echo "cannot install torch from $(TORCH_CPU_INDEX); trying pip's own index"; \
		$(PY) -m pip install -q torch==$(TORCH_VERSION); }; \
	fi
	$(PY) -m pip install -q -e ".[dev]" -c constraints.txt
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

# The packages a lent GPU machine (Python 3.12, torch, Triton, no network) lacks, as wheels in .whl/ for
# benchmarks/gpu_session.sh; the versions are this venv's. DeepSpeed has no wheel on the index: built here, no ops.
DEVICE_WHEELS := av==18.1.0 webdataset==1.0.2 braceexpand==0.1.7 hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 \
	annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0

device-wheels: venv
	rm -rf .whl && mkdir -p .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(DEVICE_WHEELS)
	DS_BUILD_OPS=0 $(PY) -m pip wheel -q --no-deps deepspeed==$$($(PY) -c "import importlib.metadata as m; print(m.version('deepspeed'))") -w .whl
	@du -sh .whl
