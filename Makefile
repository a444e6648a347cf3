# One-command set-up on a fresh machine: `make serve` and `make test` create .venv as needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000

.PHONY: serve test test-fast browser clean-venv

$(BIN)/.runtime: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

$(BIN)/.dev: $(BIN)/.runtime requirements-dev.txt
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

## serve: run the app with gunicorn and the shipped default model (http://127.0.0.1:$(PORT))
serve: $(BIN)/.runtime
	COVIDSCAN_DEV=$${COVIDSCAN_DEV-1} $(BIN)/gunicorn -c gunicorn.conf.py wsgi:app --bind 127.0.0.1:$(PORT)

## browser: Debian's Chromium for the end-to-end test (no browser download by Playwright)
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

## test: the whole suite, end-to-end browser test included
test: $(BIN)/.dev browser
	$(BIN)/python -m pytest

## test-fast: everything except slow tests (servers, browser, torchrun)
test-fast: $(BIN)/.dev
	$(BIN)/python -m pytest -m "not slow"

clean-venv:
	rm -rf $(VENV)
