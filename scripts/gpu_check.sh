#!/usr/bin/env bash
# One call on a GPU machine: install the carried wheels, run every GPU test, verify, and benchmark.
#   scripts/gpu_check.sh [tests|verify|bench|all] [bench args...]
# Logs and JSON go to $OUT (the device tool's output folder) or ./gpu-check-out.
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}; shift || true
out=${OUT:-gpu-check-out}; mkdir -p "$out"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-/tmp/cupy-cache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee "$out/commit.txt"
rc=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  # the GPU test files only: the device image lacks the test extras (openai, anthropic, jsonschema, llama_benchy)
  # whose imports are errors, not skips, in the CPU suite
  python3 -m pytest -m gpu -q -p no:cacheprovider -rs tests/test_gpu_*.py 2>&1 | tee "$out/gpu-tests.log" | tail -n 25
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
if [ "$what" = verify ] || [ "$what" = all ]; then
  python3 -m ds4cupy verify 2>&1 | tee "$out/verify.log" | tail -n 30
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  python3 -m ds4cupy bench "$@" --json-out "$out/bench.json" 2>&1 | tee "$out/bench.log" | tail -n 40
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
exit $rc
