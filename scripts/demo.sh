#!/usr/bin/env bash
# One command: set up the environment, generate the demo catalog, run the whole chain (extract -> detect ->
# embed -> index -> evaluate -> package), build the bento and print how to serve and query it.
# Usage: scripts/demo.sh [extra `niteru demo` options, e.g. --products 100]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" BENTOML_DO_NOT_TRACK=true
exec niteru demo "$@"
