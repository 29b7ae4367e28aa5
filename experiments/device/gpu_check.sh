#!/usr/bin/env bash
# The device check for issue 4 and `method="pallas"`, prepared for a session that is lent a GPU
# (the `device` tool's `run`; 15 minutes of device time in all, so this fits in ~8 minutes).
#
# The nvidia-h200 image has jax with CUDA, equinox, optax, jaxtyping, chex, hypothesis and
# pytest, but not beartype. Here, once, in the repo root (.whl/ is git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl beartype==0.23.1
# then: run(command="bash experiments/device/gpu_check.sh", carry=[".whl"], timeout_s=560)
#
# Writes into $OUT: devices.txt, agreement.txt (Pallas vs chunked vs sequential in float32),
# test_pallas.txt (the CPU suite's Pallas tests, float64, on the GPU), bench_scan_gpu.txt.
set -uo pipefail
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

python3 -c "import jax; print(jax.__version__, jax.devices())" 2>&1 | tee "$OUT/devices.txt"
timeout 150 python3 experiments/device/pallas_agreement.py 2>&1 | tee "$OUT/agreement.txt"
HYPOTHESIS_PROFILE=ci timeout 150 python3 -m pytest -q -x -p no:cacheprovider \
    tests/test_pallas.py "tests/test_exact_chunked.py::test_pallas_kernel_equals_sequential_with_gradients" \
    2>&1 | tail -n 40 | tee "$OUT/test_pallas.txt"
timeout 180 python3 -m experiments bench scan --methods sequential chunked pallas \
    --setups linear+gd mlp+momentum --lengths 2048 8192 --chunk-sizes 64 --repeats 5 \
    2>&1 | tee "$OUT/bench_scan_gpu.txt"
