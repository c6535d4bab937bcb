# chexnet_hvd: `make demo` and `make test` are the two commands a newcomer needs.
# Both call `make setup`, which installs whatever is missing (Debian packages, .venv, Horovod).
GPU    ?= 0
# The lane: 2.15 (Horovod and both engines) or 2.21 (TensorFlow 2.21 + tf_keras on Python 3.13,
# the tf engine only, in .venv-tf2.21); see constraints.txt.
TF     ?= 2.15
VENV   := $(if $(filter 2.21,$(TF)),.venv-tf2.21,.venv)
PY     := $(VENV)/bin/python
PYTEST ?= $(PY) -m pytest
# Test files run on this many workers (pytest-xdist), each file on one worker, longest files
# first (tests/conftest.py): the Slurm rehearsal's tests stay together, and 2 workers keep a
# 2-core machine busy (the suite is CPU-bound: more workers would not finish sooner).
TEST_JOBS ?= 2

.PHONY: setup demo test test-fast lint bench clean

setup:            ## install everything (idempotent); GPU=1 for the CUDA + NCCL variant, TF=2.21 for that lane
	GPU=$(GPU) TF=$(TF) bash tools/install.sh

demo: setup       ## synthetic data -> records -> train on 1 and 2 ranks -> AUROC + scaling table
	bash tools/demo.sh

# TF=2.21 runs the fast set and the slow tests marked `lane` (tests/conftest.py's LANE: one per
# place another TensorFlow could differ), with CHEXNET_ENGINE=tf as the default engine.
LANE_ENV   := $(if $(filter 2.21,$(TF)),CHEXNET_ENGINE=tf,)
LANE_SET   := $(if $(filter 2.21,$(TF)),-m "not slow or lane",)

test: setup       ## lint, then the whole suite (fast + slow + mpi); TF=2.21: the fast set + the lane's
	$(VENV)/bin/ruff check chexnet_hvd tools tests bench
	$(LANE_ENV) $(PYTEST) -q -n $(TEST_JOBS) --dist loadfile --durations=25 $(LANE_SET)

test-fast: setup  ## the fast set only (seconds)
	$(PYTEST) -q -n $(TEST_JOBS) -m "not slow"

lint: setup
	$(VENV)/bin/ruff check chexnet_hvd tools tests bench

bench: setup      ## regenerate docs/benchmarks.md
	$(PY) bench/run_all.py

clean:
	rm -rf demo .pytest_cache .ruff_cache
