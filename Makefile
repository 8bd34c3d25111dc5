# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
TORCH_VERSION ?= 2.13.0
RUN ?= runs/demo
CORPUS ?= runs/demo-corpus
SFT_DATA ?= runs/demo-sft

.PHONY: setup test test-fast lint demo bench clean

setup: $(VENV)/.installed

# CPU torch first (a wheel on disk here; pip finds it via its find-links), so the `torch>=2.6`
# requirement of the package is already met and pip never downloads a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "torch==$(TORCH_VERSION)"
	$(PIP) install -e ".[dev]"
	touch $@

test: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -q -x --durations=15

test-fast: setup
	$(PY) -m pytest -q -x -m "not slow"

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

# The main job: build a corpus from this machine's text, then every stage of configs/demo.yaml.
demo: setup
	test -f $(CORPUS)/stats.json || $(VENV)/bin/smalltalk corpus demo $(CORPUS) --max-chars 4e6
	test -f $(SFT_DATA)/stats.json || $(VENV)/bin/smalltalk corpus sft-demo $(SFT_DATA) --from $(CORPUS)
	$(VENV)/bin/smalltalk run --config configs/demo.yaml --run $(RUN) --set "data.inputs=[$(CORPUS)]" \
		--set "sft.data=$(SFT_DATA)"
	# the final table: the test split, evaluated once (every choice above was made on validation)
	test -f $(RUN)/eval-final/results.json || $(VENV)/bin/smalltalk eval --run $(RUN) --final
	test -f $(RUN)/sft/results-final.json || $(VENV)/bin/smalltalk sft --run $(RUN) --final

bench: setup
	$(PY) benchmarks/speed/bench_data.py
	$(PY) benchmarks/speed/bench_train.py
	$(PY) benchmarks/speed/bench_training_forward.py
	$(PY) benchmarks/speed/bench_vs_nanogpt.py
	$(PY) benchmarks/speed/bench_attention.py
	$(PY) benchmarks/speed/bench_routing.py

clean:
	rm -rf runs .pytest_cache
