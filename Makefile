# Two commands on a fresh Debian machine, as root: `make up` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
APT    := DEBIAN_FRONTEND=noninteractive apt-get

.PHONY: up test lint bench venv system-deps test-deps clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || { $(APT) update -qq && $(APT) install -y -qq python3-venv python3-pip; }
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@rm -f $(VENV)/.installed-* && touch $@

# nginx with the njs module for the edge; installed only when missing.
system-deps:
	@if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ] || [ ! -e /usr/lib/nginx/modules/ngx_http_js_module.so ]; then \
		$(APT) update -qq && $(APT) install -y -qq nginx libnginx-mod-http-js; \
	fi

# What only the tests need: headless Chromium for pages, promtool for the alert rules (Debian's packages).
test-deps: system-deps
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { $(APT) update -qq && $(APT) install -y -qq chromium chromium-driver; }
	@command -v promtool >/dev/null 2>&1 || { $(APT) update -qq && $(APT) install -y -qq --no-install-recommends prometheus; }
	@bash tests/services/ensure-postgres.sh
	@command -v wrk >/dev/null 2>&1 || { $(APT) update -qq && $(APT) install -y -qq wrk; }

up: venv system-deps
	$(BIN)/llmgate up --config compose/config.yaml --teams compose/teams.yaml --demo

# ruff (lint, import order) and mypy (controller/, authsvc/, proxycore/), configured in pyproject.toml.
lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

test: venv test-deps lint
	$(BIN)/python -m pytest -q

bench: venv system-deps
	@command -v wrk >/dev/null 2>&1 || { $(APT) update -qq && $(APT) install -y -qq wrk; }
	$(BIN)/python bench/bench_proxy.py
	$(BIN)/python bench/bench_cancel.py
	$(BIN)/python bench/bench_usage.py

clean:
	rm -rf $(VENV) run build *.egg-info
