# Two commands: `make bench` runs the default suite end to end (train, measure, report);
# `make test` runs the tests. Each creates or refreshes the virtual environment it needs.
PYTHON ?= python3
VENV ?= .venv
# Extras installed with the package; .ci/run adds examples (diffusers, for the outside-library example).
EXTRAS ?= test
SUITE ?= suites/mnist.yaml
ARGS ?=
BIN := $(VENV)/bin

.PHONY: bench bench-seeds report test test-slow gpu-check install clean-venv

# Re-install whenever pyproject.toml changes; torch and torchvision come from the registry together.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

# The report is built even when a run failed (it marks the failure); the exit status is the run's.
bench: $(VENV)/.installed
	$(BIN)/trilemma run $(SUITE) $(ARGS); status=$$?; $(BIN)/trilemma report $(SUITE) $(ARGS) && exit $$status

# Three seeds of every run (the reference report's intervals): seeds 1 and 2 join `make bench`'s seed 0 in
# the same results folder (a suite's name is its file's stem here), their seed noise for `trilemma compare`
# (noise.json there), then the report over all three.
bench-seeds: $(VENV)/.installed
	$(BIN)/trilemma run $(SUITE) 'seeds=[0,1,2]' --name $(basename $(notdir $(SUITE))) $(ARGS); status=$$?; \
	$(BIN)/python -m trilemma.results.noise results/$(basename $(notdir $(SUITE))); \
	$(BIN)/trilemma report $(SUITE) $(ARGS) && exit $$status

report: $(VENV)/.installed
	$(BIN)/trilemma report $(SUITE) $(ARGS)

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

test-slow: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m slow

# What works on this device (every family built, trained and sampled, a FID-50k timed; the tiny preset on
# a CPU): reports/gpu-check/report.md. Under 8 minutes on one H100 (--budget, default 480 s).
gpu-check: $(VENV)/.installed
	$(BIN)/trilemma gpu-check $(ARGS)

clean-venv:
	rm -rf $(VENV)
