#!/usr/bin/env bash
# Lint, type-check and run the whole test suite under a virtual display.
# Extra arguments go to pytest, e.g. `scripts/test.sh -k slide -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PYTHONDONTWRITEBYTECODE=1
.venv/bin/ruff check src tests training benchmarks
.venv/bin/mypy src/napari_anopilad
xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python -m pytest -p no:cacheprovider "$@"
