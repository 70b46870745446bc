#!/usr/bin/env bash
# Download the wheels that benchmarks/gpu_suite.sh needs on a GPU machine without network access.
#
# The GPU machine's Python 3.12 image has torch, transformers, peft, timm, safetensors, scipy,
# scikit-image and pillow, but not the packages below. Its tifffile is of unknown age, so a recent one
# travels too (the slide reader opens tifffile's zarr stores with zarr 3). The versions are those of
# this project's development environment. Run once, from the repository root, on a machine with network access:
#
#     bash benchmarks/fetch_gpu_wheels.sh
#
# The wheels go to .whl/ (ignored by git through .git/info/exclude); gpu_suite.sh installs them when the
# folder travels with the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
    diffusers==0.42.1
    importlib_metadata==10.2.0
    lazy-importer==0.1.0
    compel==2.5.1
    lpips==0.1.4
    open_clip_torch==3.3.0
    conch-fork==0.1.0
    ftfy==6.3.1
    wcwidth==0.9.4
    zarr==3.1.6
    donfig==0.8.1.post1
    google-crc32c==1.9.0
    numcodecs==0.16.6
    dask==2026.8.0
    partd==1.4.2
    locket==1.0.0
    imagecodecs==2026.3.6
    tifffile==2026.3.3
    platformdirs==4.14.9
)

mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${PACKAGES[@]}"
du -sh .whl
