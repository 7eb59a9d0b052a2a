#!/usr/bin/env bash
# One command: set up the environment (with the Airflow extra) and run the whole test suite.
# Usage: scripts/test.sh [pytest options]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --with-airflow
export PATH="$PWD/.venv/bin:$PATH" BENTOML_DO_NOT_TRACK=true
exec python -m pytest "$@"
