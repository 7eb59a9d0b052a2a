#!/usr/bin/env bash
# Create .venv and install the pinned working set (idempotent: reinstalls only when a requirements file changed).
# Usage: scripts/setup.sh [--with-airflow]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"niteru needs Python 3.11, found {sys.version.split()[0]}"'

reqs=(requirements.txt)
if [[ "${1:-}" == "--with-airflow" ]]; then reqs+=(requirements-airflow.txt); fi
stamp_value="$(cat "${reqs[@]}" pyproject.toml | sha256sum | cut -d' ' -f1)"
stamp_file=".venv/.niteru-install-$(IFS=-; echo "${reqs[*]}" | tr -c 'a-z0-9-' '_')"

if [[ ! -x .venv/bin/python ]]; then
  echo "[setup] creating .venv with $PY"
  "$PY" -m venv .venv
fi
if [[ ! -f "$stamp_file" || "$(cat "$stamp_file")" != "$stamp_value" ]]; then
  echo "[setup] installing ${reqs[*]} (a few minutes on a fresh machine)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  args=(); for r in "${reqs[@]}"; do args+=(-r "$r"); done
  # one pip command for everything, so the resolver sees all pins at once (Airflow + BentoML)
  .venv/bin/python -m pip install --quiet "${args[@]}"
  .venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
  .venv/bin/python -m pip check
  echo "$stamp_value" > "$stamp_file"
else
  echo "[setup] .venv is up to date"
fi
