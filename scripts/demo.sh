#!/usr/bin/env bash
# Analyse the bundled sample slide with a freshly made demo bundle, print where the outputs are,
# and open them in napari when a display is available. Extra arguments go to `anopilad demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/anopilad demo "$@"
