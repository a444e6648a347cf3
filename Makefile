# One-command set-up on a fresh machine: `make serve` and `make test` create .venv as needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000

.PHONY: serve serve-production test test-fast browser nginx pacs-deps pacs-demo clean-venv

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

## serve-production: nginx (TLS, buffering, timeouts, rate limit) in front of gunicorn on a unix socket, on
## https://0.0.0.0:$(HTTPS_PORT) (default 8443); settings in deploy/serve-production.sh and docs/app.md
serve-production: $(BIN)/.runtime nginx
	HTTPS_PORT=$${HTTPS_PORT-8443} deploy/serve-production.sh

## nginx: Debian's nginx for the production front and its tests (no service is enabled by us; it runs in the foreground)
nginx:
	@command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx >/dev/null)

## browser: Debian's Chromium for the end-to-end test (no browser download by Playwright)
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

## pacs-deps: Debian's Orthanc with its DICOMweb plugin and PostgreSQL (the PACS worklist's tests and demo)
pacs-deps:
	@(test -x /usr/sbin/Orthanc && test -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1) || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq orthanc orthanc-dicomweb postgresql >/dev/null)

## pacs-demo: a throwaway Orthanc with made-up X-rays, the worker, and the app's worklist on http://127.0.0.1:$(PORT)/worklist
pacs-demo: $(BIN)/.runtime pacs-deps
	$(BIN)/python -m pacs.demo --port $(PORT)

## test: the whole suite, end-to-end browser test included
test: $(BIN)/.dev browser nginx pacs-deps
	$(BIN)/python -m pytest

## test-fast: everything except slow tests (servers, browsers, databases, end-to-end training runs); research/tests too,
## spread over every core by pytest-xdist, each test process with one OpenMP thread so that they do not oversubscribe
test-fast: $(BIN)/.dev
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n auto -m "not slow"

clean-venv:
	rm -rf $(VENV)
