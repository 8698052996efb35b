# flux_ray developer entry points. `make demo` and `make test` set everything up on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU machines (and CI) take the CPU build of torch; GPU machines: make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# Two test processes (pytest-xdist, a module at a time): the suite is Ray process start-up, which one process
# leaves partly idle on 2 cores (767 s instead of 857 s measured). PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 2
# xdist hands out modules in collection order (tests/conftest.py puts the longest first) only with
# --no-loadscope-reorder; by default it sorts them by test count, which left a long module for the end.
XDIST   = -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder

.PHONY: setup demo test test-fast clean head-start head-stop

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[test]"
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation "deepspeed>=0.16"
	# On a CPU-only machine DeepSpeed JIT-builds its shared-memory comm op at its first init (~1 min);
	# build it here, once, instead of inside the first training run.
	$(BIN)/python -c "import torch; from deepspeed.accelerator import get_accelerator as g; \
	  b = None if torch.cuda.is_available() else g().create_op_builder('ShareMemCommBuilder'); b and b.load()"
	touch $@

demo: setup
	$(BIN)/flux-ray run jobs/demo.yaml

test: setup
	$(BIN)/python -m pytest -q $(XDIST) $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q $(XDIST) -m "not slow" $(PYTEST_ARGS)

head-start:
	cluster/local-head.sh start

head-stop:
	cluster/local-head.sh stop

clean:
	rm -rf flux_ray_runs .flux_ray
