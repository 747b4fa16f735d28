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

BENCH_STAMP := $(VENV)/.bench-peers-$(shell cat pyproject.toml benchmarks/install_peers.py | cksum | cut -d' ' -f1)

.PHONY: install browser test demo bench bench-install clean

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

# the suite in TEST_WORKERS processes, a test file to a process (its module fixtures built once);
# the tests wait on events, never on time, so they hold on a machine this busy
TEST_WORKERS ?= 2
# tests/test_serve.py drives Debian's chromium through playwright (never `playwright install`):
# installed with apt-get when missing and we are root, else the browser test is skipped
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) \
	  || echo "browser: apt-get install chromium failed: tests/test_serve.py's browser test will be skipped"; \
	else echo "browser: /usr/bin/chromium is missing and we are not root: tests/test_serve.py's browser test will be skipped (apt-get install chromium as root)"; fi

test: $(STAMP) browser
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile

demo: $(STAMP)
	$(BIN)/python examples/demo.py --out demo_out

# bench_store's peers (litdata, mosaic streaming, Lance, moto) without moving any of the project's
# packages: benchmarks/install_peers.py says how, and fails if numpy/transformers/torch changed.
# `make test` never needs them.
$(BENCH_STAMP): $(STAMP) benchmarks/install_peers.py
	$(BIN)/python benchmarks/install_peers.py
	rm -f $(VENV)/.bench-peers-* && touch $@

bench-install: $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	for b in benchmarks/bench_*.py; do echo "== $$b --quick"; $(BIN)/python $$b --quick || exit 1; done

clean:
	rm -rf $(VENV) demo_out
