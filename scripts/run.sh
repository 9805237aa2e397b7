#!/usr/bin/env bash
# Sets up and runs the mirror. With no arguments: Docker Hub as the default
# upstream, cache in ./mirror-data, listening on 0.0.0.0:5000.
# Any arguments go to `mirror serve` (e.g. --config config/mirror.example.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/mirror serve "$@"
