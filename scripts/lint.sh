#!/usr/bin/env bash
# Lint, format and import order (ruff), then the type checker (mypy); both configured in pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
