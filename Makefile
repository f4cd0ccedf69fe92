# The two commands a new user needs: `make run` and `make test`. Both set up everything first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The js-libp2p peer of the interop test (tests/test_interop_js.py), installed from its lock file.
JS_PEER := interop/node_modules/.installed

.PHONY: run test lint bench setup service clean

setup: $(STAMP) $(JS_PEER)

$(STAMP): pyproject.toml
	@# Debian and Ubuntu ship venv and ensurepip in a separate package.
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || { \
	  echo "installing python3-venv (Debian package)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q python3-venv; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# js-libp2p 3 needs Node.js 20 or later (Debian 12 and Ubuntu 24.04 ship 18: use NodeSource or
# nodejs.org there). With an older Node the install is skipped and the interop test says why.
$(JS_PEER): interop/package.json interop/package-lock.json
	@command -v npm >/dev/null 2>&1 || { \
	  echo "installing nodejs and npm (Debian packages)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q nodejs npm; }
	@if node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)'; then \
	  cd interop && npm ci --no-audit --no-fund && touch node_modules/.installed; \
	else \
	  echo "WARNING: Node.js $$(node --version) is too old for js-libp2p 3 (needs 20 or later):"; \
	  echo "         the js interop test will fail until a newer Node.js is installed."; \
	fi

# Start a node in the foreground with its defaults (identity created on first start).
run: $(STAMP)
	$(BIN)/ostrom daemon

# The whole test suite, slow tests included.
test: $(STAMP) $(JS_PEER)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench

# Install the node as a systemd user service that runs this checkout's `ostrom` (README:
# "Run it as a service"). Enabling it is left to you.
SYSTEMD_USER_DIR := $(or $(XDG_CONFIG_HOME),$(HOME)/.config)/systemd/user
service: $(STAMP)
	mkdir -p $(SYSTEMD_USER_DIR)
	sed 's|@OSTROM@|$(abspath $(BIN))/ostrom|' contrib/systemd/ostrom.service \
	  > $(SYSTEMD_USER_DIR)/ostrom.service
	systemctl --user daemon-reload
	@echo "installed $(SYSTEMD_USER_DIR)/ostrom.service; start it with:"
	@echo "  systemctl --user enable --now ostrom"
	@echo "  loginctl enable-linger $$USER    # once: start at boot, before you log in"

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache interop/node_modules
