#!/usr/bin/env bash
# Every GPU measurement of the project in one device call (its 10-minute limit: about 7 minutes
# of work on an H200, each step cut at its own limit). Prepare the wheels here first
# (bash bench/gpu_wheels.sh), then with the device tool:
#
#     run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=590)
#
# Each step has its own time limit and writes its output to $OUT (what comes back), most wanted
# first: the device; the suite on CUDA at batch 1, 8 and 32 in full float32 (the `suite-cuda`
# block of $OUT/RESULTS.md, a copy of bench/RESULTS.md: bring it over, then run
# bench/readme_speed.py); check_cuda.py (automatic chunks, host syncs, copies, chunking
# independence, the rectifier rules at their nodes against the mode: same bits; check_heavy:
# occlusion and RISE at batch 32 and a real out-of-memory error redone); the fixed cost of a
# call at batch 1 and where the gradient's goes (the `overhead-cuda` block); check_tf32.py (full
# float32 under every TF32 setting: the flags, the matmul precision, the newer fp32_precision
# settings); profile_call.py (salience's Python in a gradient call, by function); a dataset run's
# images per second (bench_batch.py: Grad-CAM, IG-32, end to end); the CAM methods
# against pytorch-grad-cam and torchcam (bench_cam.py); LRP; the speed settings (channels-last,
# compile with CUDA graphs). A step that runs out of time leaves what it printed (the suite
# prints each row as it goes).
#
#     ONLY="suite overhead" bash bench/gpu_session.sh     # some steps, by name
#     BASE=.ab/base bash bench/gpu_session.sh             # also bench_overhead on BASE/src
#     DEVICE=cpu QUICK=1 bash bench/gpu_session.sh        # a smoke test
set -uo pipefail
OUT=${OUT:-/tmp/gpu_session}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-}
ONLY=${ONLY:-}  # the steps to run, by name (default: all, in about ten minutes)
BASE=${BASE:-}  # another tree whose src/ bench_overhead also times (before and after a change)
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
    if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then
        return 0
    fi
    echo "== $name (at most ${limit} s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    echo "== $name: exit ${PIPESTATUS[0]}"
}

if [ -n "$QUICK" ]; then
    step check_cuda 120 python3 bench/check_cuda.py --device "$DEVICE" --size 32 --repeats 1 --oom
    step performance 120 python3 bench/bench_performance.py --device "$DEVICE" --quick
    step lrp 120 python3 bench/bench_lrp.py --device "$DEVICE" --quick
    step batch 120 python3 bench/bench_batch.py --device "$DEVICE" --images 8 --batch-size 4 \
        --workers 0 --methods grad_cam
    step overhead 120 python3 bench/bench_overhead.py --device "$DEVICE" --models resnet \
        --methods gradient grad_cam --repeats 2 --parts --out "$OUT/RESULTS.md" --block overhead
    exit 0
fi
cp bench/RESULTS.md "$OUT/RESULTS.md"
# Most wanted first: the suite (the targets), then the checks, then the extras.
step suite 290 python3 bench/suite.py --device "$DEVICE" --batch 1 8 32 --heavy-batches 1 8 \
    --tf32 off --repeats 3 --out "$OUT/RESULTS.md" --block suite-cuda
step check_cuda 100 python3 bench/check_cuda.py --device "$DEVICE" --models lite0 \
    --batch 1 32 --methods smoothgrad integrated_gradients score_cam --repeats 3
step check_heavy 90 python3 bench/check_cuda.py --device "$DEVICE" --models lite0 \
    --batch 32 --methods occlusion rise --repeats 1 --oom
step overhead 50 python3 bench/bench_overhead.py --device "$DEVICE" --size 224 --repeats 20 \
    --parts --out "$OUT/RESULTS.md" --block overhead-cuda
if [ -n "$BASE" ]; then  # the same with another tree's src (BASE=dir): before and after
    step overhead_base 50 env PYTHONPATH="$BASE/src:/tmp/site" python3 bench/bench_overhead.py \
        --device "$DEVICE" --size 224 --repeats 20 --parts --out "$OUT/base.md" --block overhead
fi
step tf32 30 python3 bench/check_tf32.py --device "$DEVICE"
step profile 40 python3 bench/profile_call.py --device "$DEVICE" --calls 200
step batch 60 python3 bench/bench_batch.py --device "$DEVICE" --images 512 --batch-size 32 \
    --workers 8
step cam 45 python3 bench/bench_cam.py --device "$DEVICE" --repeats 5 --score-cam-repeats 3
step lrp 30 python3 bench/bench_lrp.py --device "$DEVICE" --repeats 7 --batch 1 8
step performance 60 python3 bench/bench_performance.py --device "$DEVICE" --batch 1 \
    --repeats 3 --compile-mode reduce-overhead
