# `make test` and `make demo` work on a fresh clone of a fresh machine: they create .venv if
# missing, install the local CPU torch wheel first (a plain `torch` would pull a CUDA build),
# then the project with its test extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
export NO_ALBUMENTATIONS_UPDATE := 1
export TOKENIZERS_PARALLELISM := false
export MPLBACKEND := Agg

.PHONY: install test demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q "torch>=2.11"
	$(BIN)/pip install -q -e ".[test]"
	# CLIP_benchmark for the eval parity test, without its torchvision/open_clip dependencies
	# (they cannot load beside this torch); its metrics modules need only torch, tqdm, scikit-learn
	$(BIN)/pip install -q --no-deps "clip-benchmark==1.6.2"
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

test: $(STAMP)
	$(BIN)/pytest

demo: $(STAMP)
	$(BIN)/python examples/demo.py --out demo_out

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b --quick || exit 1; done

clean:
	rm -rf $(VENV) demo_out
