# Two commands a new user needs; each sets itself up (virtual environment, install, data).
#   make run    the main job: full MNIST, the paper's MLP pair, all five stages (~6 min on 2 CPU cores)
#   make test   the test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test bench clean

$(BIN)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "varstudent needs Python 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch==2.13.0 is pinned exactly: pip takes the CPU wheel from the local disk where there is one
	$(BIN)/python -m pip install -q -e ".[dev,dvc]"
	touch $@

run: $(BIN)/.installed
	$(BIN)/varstudent run

# two pytest-xdist workers: most of the suite's time is subprocesses starting (torch, mlflow, kfp imports),
# sqlite and PostgreSQL, which one core leaves half idle (~11 min in one process, ~7.5 in two)
test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -n 2 --dist worksteal

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/epoch_speed.py
	$(BIN)/python benchmarks/reproduce.py mnist-mlp

clean:
	rm -rf artifacts benchmarks/out mlruns.db
