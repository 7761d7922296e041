# One-command entry points. Every target installs what it needs into .venv first.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup simulate test lint typecheck table clean tff-env browser deploy-tools

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip uv

setup: $(BIN)/python
	$(BIN)/uv pip install --quiet --python $(BIN)/python -e '.[server,dev]'

# The main job: FedRecon on the embedded synthetic data (no download), outputs in runs/latest/.
ROUNDS ?= 200
simulate: setup
	$(BIN)/fedrecon simulate --data synthetic --rounds $(ROUNDS) --biases --clip --out runs/latest

# The suite on TEST_WORKERS processes (pytest-xdist), each test file on one of them: much of the suite waits
# on real processes, deadlines and sockets rather than the CPU, so two workers finish sooner even on two
# cores. TEST_WORKERS=0 runs it in this process. The 25 slowest tests are listed at the end.
TEST_WORKERS ?= 2
test: setup
	$(BIN)/ruff check .
	$(MAKE) --no-print-directory typecheck
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=25

# mypy over the package as installed (the folders mapped into fedrecon.*), built afresh into build/.
typecheck: setup
	rm -rf build/typecheck
	$(BIN)/uv pip install --quiet --python $(BIN)/python --target build/typecheck --no-deps .
	cd build/typecheck && ../../$(BIN)/mypy --python-executable ../../$(BIN)/python -p fedrecon

# Debian's chromium, which the dashboard's browser test drives headless through Playwright (Playwright never
# downloads a browser of its own here). Installed only when missing; needs root (or sudo) for apt-get.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium; }
	@chromium --version 2>/dev/null

# The checkers deploy/ is validated with beyond PyPI's (tests/test_deploy_files.py, tests/test_observe.py):
# promtool from Debian's prometheus package (scrape config, alert rules and their unit test) and the
# docker-compose client (compose.yaml renders, and refuses to without the database password). Debian
# packages no compose v2 plugin; a `docker compose` already on the machine is used first.
deploy-tools:
	@command -v promtool >/dev/null && command -v docker-compose >/dev/null || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus docker-compose; }
	@promtool --version 2>&1 | head -1; docker-compose version --short 2>/dev/null

lint: setup
	$(BIN)/ruff check .

# The MovieLens table (needs a MovieLens folder: make table DATA=path/to/ml-1m).
DATA ?= ../shared/data/movielens/ml-1m-2998u
table: setup
	$(BIN)/python benchmarks/movielens_table.py --data $(DATA) --out benchmarks/results/movielens_table.json

clean:
	rm -rf $(VENV) runs build .pytest_cache .ruff_cache .mypy_cache

# A separate environment with TensorFlow Federated 0.87 (TensorFlow 2.14), the reference implementation
# we measure against (issue 5). Pinned in tff/requirements.lock; jax overridden (tff/overrides.txt).
TFF_VENV ?= .venv-tff
tff-env: $(BIN)/python
	$(BIN)/uv venv --quiet --python $(PYTHON) $(TFF_VENV)
	$(BIN)/uv pip install --quiet --python $(TFF_VENV)/bin/python -r tff/requirements.lock --override tff/overrides.txt
	$(TFF_VENV)/bin/python -c "import tensorflow_federated as tff; assert tff.learning.algorithms.build_fed_recon"
