#!/usr/bin/env bash
# The test suite (unit, parity with transformers, CLI, doctests). Needs `bash scripts/setup.sh` first.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
