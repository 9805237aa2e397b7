#!/usr/bin/env bash
# Sets up everything the tests need, then runs lint, types and the test suite.
# Extra arguments go to pytest (e.g. -k herd, or tests/unit).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/pytest "$@"
