# celery-idem developer tasks. GNU make >= 4.
#
#   make test      lint + typecheck + the whole pytest suite (PYTEST_ARGS appended)
#   make lint      ruff check + ruff format --check
#   make typecheck mypy (strict; config and files in pyproject.toml)
#   make faults    only tests/faults
#   make test-matrix  the fast tests (unit, contract) and the quickstart from the built
#                  wheel (tests/install) at the declared floors (the oldest Python, every
#                  `>=` of the dependencies pinned) and at the newest releases, in venvs
#                  under build/matrix (MATRIX=floors or MATRIX=newest: one of them)
#   make bench-topologies  per-key cost on standalone, Sentinel and Cluster
#   make bench-lag how soon a waiting duplicate is answered after its holder completes
#   make demo      run example_project.demo
#   make docs      build the documentation site into build/site (mkdocs --strict), then
#                  check in headless Chromium that its diagrams render (needs npm)
#   make chaos     the chaos soak: 3 min of overlapping faults over a mixed workload, then
#                  the checker (CHAOS_SECONDS, CHAOS_SEED to replay; CHAOS_STORE=postgres,
#                  CHAOS_BROKER=rabbitmq); writes its section of docs/reliability.md
#   make test-celery-compat  Celery's own t/unit/tasks with IdempotentTask as the default
#                  task base, against tests/celery_compat/expected.txt (COMPAT_PLAIN=1:
#                  plain Celery only)
#   make clean     remove caches/build artefacts (keeps .venv; `make distclean` drops it)
#
# The suite starts its own throwaway redis-server; set REDIS_URL to use an
# existing server instead (it is never flushed).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
VENV_PY := $(BIN)/python
STAMP := $(VENV)/.installed
# The example's own requirements (an SMTP server), reinstalled when the file changes.
EXAMPLE_STAMP := $(VENV)/.example-installed
PYTEST_ARGS ?=

# Only directories that exist (example_project may be added later).
LINT_DIRS := $(wildcard celery_idem devtools tests example_project benchmarks docs/examples docs/hooks)

.DEFAULT_GOAL := test
.PHONY: all $(VENV) venv install lint format typecheck test test-matrix demo docs faults bench-topologies test-celery-compat chaos clean distclean

all: test

# Create the virtualenv only if it is missing.
$(VENV_PY):
	$(PYTHON) -m venv $(VENV)

# (Re)install the package + dev extras whenever pyproject.toml changes.
$(STAMP): pyproject.toml | $(VENV_PY)
	$(BIN)/pip install -e '.[dev]'
	touch $@

# `make .venv` / `make venv`: create + install if missing or stale.
$(VENV) venv install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check $(LINT_DIRS)
	$(BIN)/ruff format --check $(LINT_DIRS)

# Rewrites files: not part of `make test`.
format: $(STAMP)
	$(BIN)/ruff check --fix $(LINT_DIRS)
	$(BIN)/ruff format $(LINT_DIRS)

typecheck: $(STAMP)
	$(BIN)/mypy

# The example's requirements too: the suite runs the demo end to end.
test: lint typecheck $(EXAMPLE_STAMP)
	$(VENV_PY) -m pytest $(PYTEST_ARGS)

# tests/matrix.py: each environment in its own venv (build/matrix/floors-py3.10, ...),
# kept between runs; the newest is upgraded at every run. Standard library only, so it
# runs on $(PYTHON), not in .venv. About 75 s per environment (two thirds of it pytest).
MATRIX ?=

test-matrix:
	$(PYTHON) tests/matrix.py $(MATRIX) $(if $(PYTEST_ARGS),-- $(PYTEST_ARGS))

# The fault suite alone, writing docs/reliability.md from this run's figures.
faults: $(STAMP)
	IDEM_FAULTS_REPORT=docs/reliability.md $(VENV_PY) -m pytest tests/faults $(PYTEST_ARGS)

$(EXAMPLE_STAMP): example_project/requirements.txt | $(STAMP)
	$(BIN)/pip install -r example_project/requirements.txt
	touch $@

demo: $(STAMP) $(EXAMPLE_STAMP)
	$(VENV_PY) -m example_project.demo

clean:
	rm -rf build dist .pytest_cache .mypy_cache .ruff_cache .hypothesis
	rm -rf *.egg-info
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)

# Benchmarks (docs/benchmarks.md, docs/benchmarks.png): the peers celery-once and
# celery-singleton, matplotlib and pyinstrument, from benchmarks/requirements.txt,
# reinstalled when that file changes. Benchmark-only: not project dependencies.
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): benchmarks/requirements.txt | $(STAMP)
	$(BIN)/pip install -r benchmarks/requirements.txt
	touch $@

.PHONY: bench
bench: $(STAMP) $(BENCH_STAMP)
	$(VENV_PY) -m benchmarks

# Per-key cost on each deployment the suite can start (standalone, Sentinel, Cluster;
# with and without idem_min_replicas): a Markdown table on stdout, about 35 s.
bench-topologies: $(STAMP)
	$(VENV_PY) -m benchmarks.topologies

# A waiting duplicate's lag after its holder's completion, live and after a takeover:
# a Markdown table on stdout, about a minute (docs/performance.md).
.PHONY: bench-lag
bench-lag: $(STAMP) $(BENCH_STAMP)
	$(VENV_PY) -m benchmarks.lag

# The documentation site (mkdocs.yml, docs/): built with warnings as errors into
# build/site. Its requirements (docs/requirements.txt, pinned) go into the same venv,
# reinstalled when that file changes: mkdocstrings reads the package's docstrings and
# the CLI page documents its click commands.
DOCS_STAMP := $(VENV)/.docs-installed
DOCS_DIR := build/site

$(DOCS_STAMP): docs/requirements.txt | $(STAMP)
	$(BIN)/pip install -r docs/requirements.txt
	touch $@

# The site's JavaScript, pinned in docs/npm/package-lock.json: mermaid (11, the major
# mkdocs-material's styles are written for), which docs/hooks/mermaid.py copies into the
# site so that the diagrams need no CDN, and playwright-core for the check below.
# `npm ci` in build/docs-npm (not under docs/, which MkDocs walks), again when the lock
# changes; about 20 s the first time.
DOCS_NPM := build/docs-npm
DOCS_NPM_STAMP := $(DOCS_NPM)/.installed

$(DOCS_NPM_STAMP): docs/npm/package.json docs/npm/package-lock.json
	@command -v npm >/dev/null || { echo "docs: npm (Node 20+) is needed to install the site's pinned mermaid (docs/npm/)" >&2; exit 1; }
	mkdir -p $(DOCS_NPM)
	cp docs/npm/package.json docs/npm/package-lock.json $(DOCS_NPM)/
	cd $(DOCS_NPM) && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error
	touch $@

# The browser for the diagram check: CHROMIUM, else chromium on PATH. In CI (CI=true)
# a missing one is installed with apt-get (CI runs as root); elsewhere the check is
# skipped, loudly.
CHROMIUM ?= $(shell command -v chromium || command -v chromium-browser)

# NO_MKDOCS_2_WARNING: mkdocs-material's banner about its successor, not a build warning.
# The greps: the protocol page's two diagrams reached the HTML as mermaid blocks (which
# the theme renders in the browser), not as plain code. Then docs/npm/check-diagrams.cjs
# opens every page with a diagram in headless Chromium, from a server on 127.0.0.1 with
# every other address refused, and fails unless each diagram became an SVG (a few s).
docs: $(STAMP) $(DOCS_STAMP) $(DOCS_NPM_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir $(DOCS_DIR)
	@for diagram in sequenceDiagram stateDiagram-v2; do \
	  grep -q "<pre class=\"mermaid\"><code>$$diagram" $(DOCS_DIR)/protocol/index.html \
	    || { echo "docs: the $$diagram of docs/protocol.md is not a mermaid block in the site" >&2; exit 1; }; \
	done
	@chromium="$(CHROMIUM)"; \
	if [ -z "$$chromium" ] && [ "$$CI" = true ]; then \
	  echo "docs: no Chromium for the diagram check; CI: apt-get install -y chromium"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || exit 1; \
	  chromium=$$(command -v chromium); \
	fi; \
	if [ -z "$$chromium" ]; then \
	  echo "" >&2; \
	  echo "docs: ************************************************************************" >&2; \
	  echo "docs: SKIPPED the diagram check: no Chromium (apt-get install chromium, or set" >&2; \
	  echo "docs: CHROMIUM=/path/to/chrome). The site is built, but nothing checked that its" >&2; \
	  echo "docs: diagrams render. CI (CI=true) installs Chromium and never skips this." >&2; \
	  echo "docs: ************************************************************************" >&2; \
	else \
	  NODE_PATH=$(DOCS_NPM)/node_modules node docs/npm/check-diagrams.cjs $(DOCS_DIR) "$$chromium"; \
	fi

# Celery's own unit tests for tasks, canvas, tracing, results and chords (t/unit/tasks
# of the installed Celery's source release, downloaded once into build/celery-src) run
# on plain Celery, then with IdempotentTask as every app's default task base on the
# in-memory store. A failure outside tests/celery_compat/expected.txt, a listed test
# that now passes, or any failure on plain Celery fails the target (see docs/testing.md).
# Its test requirements (pinned) go into the same venv, reinstalled when that file
# changes. About 50 s. COMPAT_PLAIN=1: the plain-Celery run only.
COMPAT_STAMP := $(VENV)/.celery-compat-installed

$(COMPAT_STAMP): tests/celery_compat/requirements.txt | $(STAMP)
	$(BIN)/pip install -r tests/celery_compat/requirements.txt
	touch $@

test-celery-compat: $(STAMP) $(COMPAT_STAMP)
	$(VENV_PY) tests/celery_compat/run.py

# The chaos soak (tests/chaos): a seeded workload on 3 prefork workers while a nemesis
# kills, stops and cuts off workers and the store, then a checker that reads only the
# publisher's history and the effect ledger. CHAOS_SECONDS (default 180) and CHAOS_SEED
# (default: random, printed) replay a run; every fault kind must be injected at least
# CHAOS_MIN_EACH times (default 5). CHAOS_BROKER=rabbitmq runs the second configuration
# (RabbitMQ at AMQP_URL, else 127.0.0.1:5672). CHAOS_STORE=postgres keeps the records in a
# private PostgreSQL (behind the same fault proxy; restarted, killed, its sessions
# terminated) where every task also commits a row inside idem_atomic(), and the checker
# counts duplicate database effects. Writes its section of docs/reliability.md.
CHAOS_MIN_EACH ?= 5
CHAOS_BROKER ?= redis
CHAOS_STORE ?= redis

chaos: $(STAMP)
	$(VENV_PY) -m tests.chaos.run --report docs/reliability.md --min-each $(CHAOS_MIN_EACH) \
	  --broker $(CHAOS_BROKER) --store $(CHAOS_STORE)
