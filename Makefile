# Visual-preference GRPO: the commands a user runs. `make help` lists them.
PY      := .venv/bin/python
STAMP   := .venv/.installed
BENCH   := .venv/.bench-installed
SERVE   := .venv/.serve-installed
WATCH   := .venv/.watch-installed
RUNS    := runs
MODEL   ?= Qwen/Qwen2.5-VL-7B-Instruct
DATA    ?=
TINY    := $(RUNS)/tiny-model

.PHONY: help install test lint format demo demo-full demo-robust ablate train-imagereward train-hpsv2 eval-imagereward eval-hpsv2 bench tiny-model

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s "$$(printf '\t')"

$(STAMP): requirements.lock setup.py
	test -d .venv || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	@! $(PY) -c "import torchvision" 2>/dev/null || (echo "torchvision must not be installed beside torch 2.13.0 (see docs/facts.md)"; exit 1)
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the pinned dependencies (idempotent)

# The bench extra (trl, a benchmark peer only) adds one package and changes neither torch nor
# anything else; tests/test_bench.py needs it, so `make test` installs it rather than skip that test.
$(BENCH): $(STAMP)
	$(PY) -m pip install --quiet -e ".[bench]"
	@! $(PY) -c "import torchvision" 2>/dev/null || (echo "torchvision must not be installed beside torch 2.13.0 (see docs/facts.md)"; exit 1)
	touch $(BENCH)

# The serve extra (FastAPI, uvicorn) runs python -m eval.serve; serve-test adds the HTTP and OpenAI
# clients tests/test_serve*.py call it with. Neither changes torch or anything else pinned.
$(SERVE): $(STAMP)
	$(PY) -m pip install --quiet -e ".[serve,serve-test]"
	@! $(PY) -c "import torchvision" 2>/dev/null || (echo "torchvision must not be installed beside torch 2.13.0 (see docs/facts.md)"; exit 1)
	touch $(SERVE)

# The wandb and browser extras, and a headless Chromium from the npm package @sparticuz/chromium
# (it needs no system libraries) under .venv/node: tests/test_tracking.py reads a wandb offline run,
# tests/test_report_html.py opens report.html in that browser. Without node/npm the browser test skips.
$(WATCH): $(STAMP)
	$(PY) -m pip install --quiet -e ".[wandb,browser]"
	@! $(PY) -c "import torchvision" 2>/dev/null || (echo "torchvision must not be installed beside torch 2.13.0 (see docs/facts.md)"; exit 1)
	@if command -v npm >/dev/null; then npm install --silent --no-audit --no-fund --prefix .venv/node @sparticuz/chromium@153.0.0 \
		|| echo "npm could not install @sparticuz/chromium: the browser test will skip"; \
	else echo "no npm: the browser test will skip"; fi
	touch $(WATCH)

test: $(STAMP) $(BENCH) $(SERVE) $(WATCH)  ## run the whole test suite (CPU, offline); the fast part alone: .venv/bin/python -m pytest -m "not slow"
	$(PY) -m pytest -q

lint: $(STAMP)  ## ruff lint and format check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)  ## apply ruff's formatting and safe fixes
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

tiny-model: $(STAMP)  ## build the tiny offline Qwen2.5-VL into runs/tiny-model
	$(PY) -m models.tiny $(TINY)

demo: $(STAMP)  ## the whole method end to end on CPU: tiny model, synthetic data, cold start, GRPO, evaluation
	$(PY) experiments/demo.py --out $(RUNS)/demo

demo-robust: $(STAMP)  ## the demo over 10 seeds × perturbations (threads, kernels, weight ulps): how many runs meet the targets (~2 h)
	$(PY) experiments/robust.py --out $(RUNS)/robust

demo-full: $(STAMP)  ## make demo, then the stretch run: prompt-conditioned tier, small preset (~36 min)
	$(PY) experiments/demo.py --out $(RUNS)/demo --stretch

ablate: $(STAMP)  ## each GRPO variant (Dr. GRPO, DAPO, GSPO, bnpo, dynamic sampling) × 3 seeds on the demo's tasks; table in runs/ablate (~2 h)
	$(PY) experiments/ablate.py --out $(RUNS)/ablate $(ARGS)

# Real runs (GPU): MODEL=hub id or folder, DATA=dataset folder; extra key=value overrides in ARGS.
train-imagereward: $(STAMP)  ## GRPO on ImageRewardDB (experiments/imagereward.yaml)
	$(PY) -m grpo.train experiments/imagereward.yaml model.name_or_path=$(MODEL) $(if $(DATA),data.root=$(DATA) eval.root=$(DATA)) $(ARGS)

train-hpsv2: $(STAMP)  ## GRPO on 25% of HPDv2's training pairs (experiments/hpsv2.yaml)
	$(PY) -m grpo.train experiments/hpsv2.yaml model.name_or_path=$(MODEL) $(if $(DATA),data.root=$(DATA)) $(ARGS)

eval-imagereward: $(STAMP)  ## soft/hard rating accuracy on the ImageReward test set
	$(PY) -m eval.evaluate experiments/imagereward.yaml model.name_or_path=$(MODEL) eval.split=test eval.max_groups=0 $(if $(DATA),data.root=$(DATA) eval.root=$(DATA)) $(ARGS)

eval-hpsv2: $(STAMP)  ## anchor-based soft ranking accuracy on the HPDv2 test set
	$(PY) -m eval.evaluate experiments/hpsv2.yaml model.name_or_path=$(MODEL) eval.max_groups=0 $(if $(DATA),data.root=$(DATA) eval.root=$(DATA)) $(ARGS)

bench: $(BENCH) $(SERVE)  ## our GRPO step vs TRL's GRPOTrainer on the same workload, and the judge server (writes BENCHMARKS.md)
	$(PY) experiments/bench.py --out $(RUNS)/bench
