#!/usr/bin/env bash
# GPU work in calls of under 10 minutes on a lent GPU machine:
#   bash benchmarks/gpu_tests.sh tests    every GPU-marked test (engine, kernels, quant, faults, soak)
#   bash benchmarks/gpu_tests.sh bench    the kernel timing table, then the offloading benchmark
#   bash benchmarks/gpu_tests.sh diag     decode-sync A/B and traces, full-size plan check, soak
#   bash benchmarks/gpu_tests.sh graphs   CUDA-graph tests and the decode A/B with and without graphs
#   bash benchmarks/gpu_tests.sh final    the benchmark (naive included), then the CUDA-graph tests
#   bash benchmarks/gpu_tests.sh check    after a refactor: engine, quant, fault tests, the T4 kernels
#                                         (benchmarks/t4_gpu.sh) and a small benchmark smoke run
# Logs and outputs go to $OUT (or ./gpu_out).
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/machine.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$OUT/machine.txt"
run() {  # name, seconds, command...
  local name=$1 secs=$2; shift 2
  echo "=== $name"; local t0=$SECONDS
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  tail -n 4 "$OUT/$name.log"; echo "=== $name rc=$rc $((SECONDS - t0))s"
}
case "${1:-tests}" in
check)
  run engine 150 python3 -m pytest -q -x -m gpu tests/test_engine_gpu.py
  run quant_faults 100 python3 -m pytest -q -m gpu tests/test_quant_gpu.py tests/test_faults.py tests/test_planner.py \
    tests/test_routing.py tests/test_kernels.py -k "not fallback_warns and not dequant_kernel_and_dispatch"
  run bench_smoke 70 python3 -m moe_colab bench --scale small --quick --quant paper-2bit \
    --rows full,no_prefetch,no_cache,full_swap --results-dir "$OUT" --name smoke --max-minutes 1
  OUT=$OUT timeout 280 bash benchmarks/t4_gpu.sh
  tar czf /tmp/results.tar.gz -C "$OUT" . && find "$OUT" -maxdepth 1 -type f ! -name '*.gz' ! -name 't4_kernels.*' \
    ! -name 'machine.txt' -delete && mv /tmp/results.tar.gz "$OUT/"
  ;;
tests)
  run engine 100 python3 -m pytest -q -m gpu tests/test_engine_gpu.py
  run kernels 100 python3 -m pytest -q -m gpu tests/test_kernels.py
  run quant 60 python3 -m pytest -q -m gpu tests/test_quant_gpu.py
  run faults_planner 100 python3 -m pytest -q -m gpu tests/test_faults.py tests/test_planner.py \
    tests/test_routing.py tests/test_simulate.py tests/test_bench.py
  MOE_COLAB_SOAK_OUT=$OUT/soak.json run soak 240 python3 -m pytest -q -m gpu tests/test_soak_gpu.py
  ;;
bench)
  run kernels_bench 150 python3 benchmarks/kernels_bench.py --out-dir "$OUT" --timeout 60 --no-sweep
  run bench 420 python3 -m moe_colab bench --quant both --profile --max-minutes 6 \
    --out "$OUT" --results-dir "$OUT" --name h200
  ;;
final)   # the benchmark (both bit widths, naive included), then the GPU tests not yet run
  run bench 420 python3 -m moe_colab bench --quant both --max-minutes 6.5 \
    --out "$OUT" --results-dir "$OUT" --name h200
  run tests 120 python3 -m pytest -q -m gpu tests/test_engine_gpu.py tests/test_kernels.py -k "graphs or trusted"
  tar czf /tmp/results.tar.gz -C "$OUT" --exclude='*.gz' --exclude='benchmarks.*' --exclude=figures . \
    && mv /tmp/results.tar.gz "$OUT/"
  ;;
graphs)  # CUDA graphs: their tests, and the decode A/B with and without them
  run tests 100 python3 -m pytest -q -m gpu tests/test_kernels.py tests/test_engine_gpu.py \
    -k "trusted or host_sync or matches_transformers or graphs"
  run decode_diag 200 python3 benchmarks/decode_diag.py --out "$OUT" --variants mapped,nographs --runs 2
  tar czf /tmp/results.tar.gz -C "$OUT" --exclude='*.gz' . && find "$OUT" -maxdepth 1 -type f ! -name '*.gz' -delete \
    && mv /tmp/results.tar.gz "$OUT/"
  ;;
diag)    # the decode-sync A/B with traces, the plan check at full size, the unverified tests, the soak
  run decode_diag 170 python3 benchmarks/decode_diag.py --out "$OUT" --variants copy,mapped
  run plan_check 110 python3 benchmarks/plan_check.py --out "$OUT"
  run tests 60 python3 -m pytest -q -m gpu tests/test_kernels.py tests/test_engine_gpu.py -k "trusted or host_sync or matches_transformers or graphs"
  MOE_COLAB_SOAK_OUT=$OUT/soak.json run soak 240 python3 -m pytest -q -m gpu tests/test_soak_gpu.py
  # The device tool returns at most 8 files: the traces as they are, everything else in one archive.
  tar czf /tmp/results.tar.gz -C "$OUT" --exclude='*.gz' . && find "$OUT" -maxdepth 1 -type f ! -name '*.gz' -delete \
    && mv /tmp/results.tar.gz "$OUT/"
  ;;
esac
