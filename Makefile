# One command to run, one to test. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

# The real Claude Code CLI, pinned (.claude-code-version), in a project-local
# folder: the real-CLI tests use it, nothing global is touched. npm, not the
# claude-agent-sdk wheel: the npm package is the CLI's own release channel and
# its exact version is what `claude --version` reports; the wheel bundles
# whichever CLI its SDK release was built with, ties the pin to the SDK's
# version and puts a second ~400 MB binary in the venv.
CLAUDE_CODE_VERSION := $(shell cat .claude-code-version)
CLAUDE_DIR := .tools/claude-code
CLAUDE_STAMP := $(CLAUDE_DIR)/.installed-$(CLAUDE_CODE_VERSION)

.PHONY: run test typecheck bench clean claude

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $@

run: $(BIN)/.installed
	$(BIN)/progress-service dev $(ARGS)

test: $(BIN)/.installed
	$(BIN)/python -m pytest $(ARGS)

# mypy --strict on progress_service/ and worker/ (configured in pyproject.toml).
typecheck: $(BIN)/.installed
	$(BIN)/mypy

bench: $(BIN)/.installed
	$(BIN)/pip install -q -e ".[test,bench]"
	$(BIN)/python -m bench run all

claude: $(CLAUDE_STAMP)

$(CLAUDE_STAMP): .claude-code-version
	npm install --prefix $(CLAUDE_DIR) --no-audit --no-fund --loglevel=error @anthropic-ai/claude-code@$(CLAUDE_CODE_VERSION)
	test "$$($(CLAUDE_DIR)/node_modules/.bin/claude --version)" = "$(CLAUDE_CODE_VERSION) (Claude Code)"
	touch $@

clean:
	rm -rf $(VENV) progress.db progress.db-* .pytest_cache
