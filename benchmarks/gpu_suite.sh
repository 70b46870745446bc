#!/usr/bin/env bash
# Run every GPU benchmark in one call of the GPU machine (about 8 minutes on an H200).
#
# Prepare once, on a machine with network access: bash benchmarks/fetch_gpu_wheels.sh
# Then, on the GPU machine, from the repository root (results go to $OUT, else benchmarks/results/gpu):
#
#     bash benchmarks/gpu_suite.sh
#
# Extra arguments go to benchmarks/gpu_suite.py (for example --budget-s 400 or --skip-compile).
# `bash benchmarks/gpu_suite.sh --tiny` checks the code paths on a CPU in a few minutes.
set -uo pipefail
cd "$(dirname "$0")/.."

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the wheels in .whl failed" >&2; exit 1; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# The package runs from the source tree when it is not installed.
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

PYTHON=${PYTHON:-python3}
# Results go to --out when given, else to $OUT (set by the GPU machine's runner), else to
# benchmarks/results/gpu. A --tiny check without either writes to a temporary folder.
OUT_DIR=${OUT:-benchmarks/results/gpu}
previous=""
for argument in "$@"; do
    [[ "$argument" == "--tiny" && -z "${OUT:-}" ]] && OUT_DIR="${TMPDIR:-/tmp}/anopilad-gpu-suite-tiny"
    [[ "$previous" == "--out" ]] && OUT_DIR="$argument"
    previous="$argument"
done
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv \
    >"$OUT_DIR/gpu-suite-nvidia-smi.csv" 2>&1 || true
"$PYTHON" benchmarks/gpu_suite.py --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/gpu-suite.log"
