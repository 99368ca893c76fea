#!/usr/bin/env bash
# Lint, format and import order (ruff), the type checker (mypy), then the layers and the absence of import
# cycles (import-linter's lint-imports); all configured in pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/lint-imports --no-cache
