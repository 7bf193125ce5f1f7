# Visual-preference GRPO: the commands a user runs. `make help` lists them.
PY      := .venv/bin/python
STAMP   := .venv/.installed
RUNS    := runs
MODEL   ?= Qwen/Qwen2.5-VL-7B-Instruct
DATA    ?=
TINY    := $(RUNS)/tiny-model

.PHONY: help install test lint format demo train-imagereward train-hpsv2 eval-imagereward eval-hpsv2 bench tiny-model

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s "$$(printf '\t')"

$(STAMP): requirements.lock setup.py
	test -d .venv || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	@! $(PY) -c "import torchvision" 2>/dev/null || (echo "torchvision must not be installed beside torch 2.13.0 (DESIGN §8)"; exit 1)
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the pinned dependencies (idempotent)

test: $(STAMP)  ## run the test suite (CPU, offline)
	$(PY) -m pytest -q

lint: $(STAMP)  ## ruff lint and format check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)  ## apply ruff's formatting and safe fixes
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

tiny-model: $(STAMP)  ## build the tiny offline Qwen2.5-VL into runs/tiny-model
	$(PY) -m models.tiny $(TINY)

demo: $(STAMP)  ## the whole method end to end on CPU with the tiny model
	$(PY) -m models.tiny $(TINY)
