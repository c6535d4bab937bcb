# chexnet_hvd: `make demo` and `make test` are the two commands a newcomer needs.
# Both call `make setup`, which installs whatever is missing (Debian packages, .venv, Horovod).
VENV   := .venv
PY     := $(VENV)/bin/python
GPU    ?= 0
PYTEST ?= $(PY) -m pytest
# Test files run on this many workers (pytest-xdist), each file on one worker: the Slurm
# rehearsal's tests stay together, and 2 workers keep a 2-core machine busy (most tests wait on
# process start-up and I/O), about 36 instead of 50 minutes.
TEST_JOBS ?= 2

.PHONY: setup demo test test-fast lint bench clean

setup:            ## install everything (idempotent); GPU=1 for the CUDA + NCCL variant
	GPU=$(GPU) bash tools/install.sh

demo: setup       ## synthetic data -> records -> train on 1 and 2 ranks -> AUROC + scaling table
	bash tools/demo.sh

test: setup       ## lint, then the whole suite (fast + slow + mpi)
	$(VENV)/bin/ruff check chexnet_hvd tools tests bench
	$(PYTEST) -q -n $(TEST_JOBS) --dist loadfile --durations=25

test-fast: setup  ## the fast set only (seconds)
	$(PYTEST) -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check chexnet_hvd tools tests bench

bench: setup      ## regenerate docs/benchmarks.md
	$(PY) bench/run_all.py

clean:
	rm -rf demo .pytest_cache .ruff_cache
