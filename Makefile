# rlfuse: set-up and main commands. Every target creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1

.PHONY: demo test bench install clean reproduce-paper
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
	@echo "before | after), metrics.jsonl (eval_reward_* per criterion), samples/, checkpoints/;"
	@echo "curves: $(BIN)/tensorboard --logdir outputs/demo"

TEST_WORKERS ?= 2
test: $(STAMP)  ## the whole test suite, CPU, offline, in TEST_WORKERS processes (pytest-xdist)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

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
