#!/usr/bin/env bash
# The GPU steps of issue 15 ("The T4's kernels, proven without a T4") in one call, ~3-4 minutes on
# an H200 (cold Triton cache):
#   1. benchmarks/t4_kernels.py all: every T4 case from sm_75 PTX, one expert through the fused
#      kernel / the fallbacks / the old torch path, the T4 estimate -> $OUT/t4_kernels.{json,md}
#   2. the GPU tests of the sm_75 harness, the fallback and the per-model self-test
# Then, on any machine: cp $OUT/t4_kernels.json docs/ && python benchmarks/t4_kernels.py report
# docs/t4_kernels.json --out docs   (renders docs/t4_kernels.md with docs/benchmarks.json's rows).
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
t0=$SECONDS
timeout ${T4_SECONDS:-300} python3 benchmarks/t4_kernels.py all --out "$OUT" --max-seconds ${T4_BUDGET:-240} > "$OUT/t4_kernels.log" 2>&1
echo "=== t4_kernels rc=$? $((SECONDS - t0))s"
grep -E "^(FAIL|[0-9]+ distinct|[0-9]+ cases run|time budget|stopping)" "$OUT/t4_kernels.log" | head -40
tail -n 30 "$OUT/t4_kernels.log"
t0=$SECONDS
timeout ${T4_TEST_SECONDS:-200} python3 -m pytest -q -m gpu tests/test_t4_kernels.py tests/test_fallback.py tests/test_compute_selftest.py \
  tests/test_kernels.py::test_gpu_fallback_warns_once tests/test_kernels.py::test_gpu_dequant_kernel_and_dispatch \
  > "$OUT/t4_tests.log" 2>&1
echo "=== gpu tests rc=$? $((SECONDS - t0))s"
tail -n 25 "$OUT/t4_tests.log"
