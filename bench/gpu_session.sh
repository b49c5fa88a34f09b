#!/usr/bin/env bash
# Every GPU measurement of the project in one device call (its 10-minute limit; about 9 minutes
# of work). Prepare the wheels here first (bash bench/gpu_wheels.sh), then with the device tool:
#
#     run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=590)
#
# Each step has its own time limit and writes its output to $OUT (what comes back): the
# device, the suite on CUDA at batch 1, 8 and 32 in full float32 (a `suite-cuda` block of
# $OUT/RESULTS.md, a copy of bench/RESULTS.md: bring the block over, and teach
# bench/readme_speed.py to render it), check_cuda.py (automatic chunks, host syncs, copies,
# chunking independence, a real out-of-memory error redone, the rectifier rules at their nodes
# against the mode: same bits), the CAM methods against pytorch-grad-cam and torchcam
# (bench_cam.py), the fixed cost of a call at batch 1
# (an `overhead-cuda` block), LRP and the speed settings
# (channels-last, compile with CUDA graphs). A step that runs out of time leaves what it
# printed (the suite prints each row as it goes). DEVICE=cpu QUICK=1 runs a smoke test.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_session}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
fi
{
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/device.txt"

step() {  # step NAME SECONDS COMMAND...: run it with a time limit, output to $OUT/NAME.txt
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit} s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    echo "== $name: exit ${PIPESTATUS[0]}"
}

if [ -n "$QUICK" ]; then
    step check_cuda 120 python3 bench/check_cuda.py --device "$DEVICE" --size 32 --repeats 1 --oom
    step performance 120 python3 bench/bench_performance.py --device "$DEVICE" --quick
    step lrp 120 python3 bench/bench_lrp.py --device "$DEVICE" --quick
    step overhead 120 python3 bench/bench_overhead.py --device "$DEVICE" --models resnet \
        --methods gradient grad_cam --repeats 2 --out "$OUT/RESULTS.md" --block overhead
    exit 0
fi
cp bench/RESULTS.md "$OUT/RESULTS.md"
# Most wanted first: the suite (the targets), then the checks, then the extras.
step suite 290 python3 bench/suite.py --device "$DEVICE" --batch 1 8 32 --heavy-batches 1 8 \
    --tf32 off --repeats 3 --out "$OUT/RESULTS.md" --block suite-cuda
step check_cuda 120 python3 bench/check_cuda.py --device "$DEVICE" --models lite0 \
    --batch 1 32 --repeats 3 --oom
step cam 45 python3 bench/bench_cam.py --device "$DEVICE" --repeats 5 --score-cam-repeats 3
step overhead 40 python3 bench/bench_overhead.py --device "$DEVICE" --size 224 --repeats 20 \
    --out "$OUT/RESULTS.md" --block overhead-cuda
step lrp 30 python3 bench/bench_lrp.py --device "$DEVICE" --repeats 7 --batch 1 8
step performance 45 python3 bench/bench_performance.py --device "$DEVICE" --batch 1 8 \
    --repeats 3 --compile-mode reduce-overhead
