# rlfuse: set-up and main commands. Every target creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1

.PHONY: demo test test-fast browser bench install clean reproduce-paper
SCALE ?= paper

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)  ## the main job on the embedded default (model=toy, reward=shapes, DDPO), on the CPU
	$(BIN)/python -m rlfuse.train run_root=outputs/demo
	@echo "Done. In the newest folder under outputs/demo/: eval/before_after.png (held-out prompts, same seeds,"
	@echo "each held-out caption beside its images before and after), metrics.jsonl (eval_reward_* per criterion), samples/, checkpoints/;"
	@echo "curves: $(BIN)/tensorboard --logdir outputs/demo"

TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal
test: $(STAMP) browser  ## the whole test suite, CPU, offline, in TEST_WORKERS processes (pytest-xdist)
	$(PYTEST)

test-fast: $(STAMP) browser  ## the test suite without the tests marked slow (learning runs, multi-process runs)
	$(PYTEST) -m "not slow"

CHROMIUM_HINT := rlfuse: the browser tests need Chromium: run 'sudo apt-get install chromium' (Debian/Ubuntu) or set RLFUSE_CHROMIUM=/path/to/chromium
browser:  ## Chromium for the browser tests (tests/annotate): apt-get installs it if missing (as root, or with passwordless sudo), else one line says what to install
	@if [ -n "$$RLFUSE_CHROMIUM" ]; then \
	    [ -f "$$RLFUSE_CHROMIUM" ] && [ -x "$$RLFUSE_CHROMIUM" ] \
	        || echo "rlfuse: RLFUSE_CHROMIUM=$$RLFUSE_CHROMIUM is not an executable file: the browser tests will fail"; \
	elif command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then \
	    :; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
	    echo "$(CHROMIUM_HINT)"; \
	else \
	    if [ "$$(id -u)" = 0 ]; then sudo=""; \
	    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; \
	    else echo "$(CHROMIUM_HINT)"; exit 0; fi; \
	    echo "rlfuse: installing Chromium for the browser tests: $${sudo:+$$sudo }apt-get install -y chromium"; \
	    { $$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	        || echo "$(CHROMIUM_HINT) (apt-get install failed, see above)"; \
	fi

bench: $(STAMP)  ## loop throughput on model=tiny, reward throughput, rlfuse vs TRL, floor -> benchmarks/results/*.json
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/core.py
	$(BIN)/python benchmarks/rewards.py
	$(BIN)/python benchmarks/trl_side_by_side.py  # --quick (tiny, 3 pairs x 5 epochs); --full: tiny and toy, 10 epochs
	$(BIN)/python benchmarks/floor.py --models tiny --repeats 3  # add --scaling for docs/scaling.png

reproduce-paper: $(STAMP)  ## the papers' experiments -> outputs/reproduce/REPORT.md (SCALE=paper: GPUs, hub weights | SCALE=toy: CPU, minutes)
	$(BIN)/python -m rlfuse.reproduce --scale $(SCALE) --out outputs/reproduce

clean:
	rm -rf $(VENV) outputs .pytest_cache
