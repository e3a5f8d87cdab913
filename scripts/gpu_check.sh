#!/usr/bin/env bash
# One call on a GPU machine: install the carried wheels, check the engine's switchable kernel paths, benchmark, run
# every GPU test.
#   scripts/gpu_check.sh [all|gate|bench|tests|verify] [bench args...]
#   all = every kernel family compiled in parallel, gate, bench (with the switches gate left on), then the other GPU
#   tests (same switches; one pytest process per file, side by side).
# gate: each switchable path (DS4CUPY_<NAME>=0 turns it off, see SWITCHES) runs its own GPU tests first; a path whose
# tests fail is switched off for everything after it, and $OUT/switches.txt says so. The bench report records the
# DS4CUPY_* variables in effect (meta.env), so a benchmark never silently measures a path that failed its tests.
# Logs and JSON go to $OUT (the device tool's output folder) or ./gpu-check-out. The test files are named (not the
# whole tests/ folder): the device image lacks the CPU suite's test extras (openai, anthropic, jsonschema, ...).
# GATE_TIMEOUT (seconds, default 150) bounds each gate run: a hung kernel counts as a failure.
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
pytest_gpu() { python3 -m pytest -m gpu -q -p no:cacheprovider -rs "$@"; }

# switch name | the tests that decide it (pytest arguments)
SWITCHES=(
  "MOE_GROUPED|tests/test_gpu_moe_grouped.py"
  "PREFILL_MMA|tests/test_gpu_matmul_mma.py"
  "HC_FUSED|tests/test_gpu_ops.py -k hc_step"
  "BRANCHES|tests/test_gpu_model.py -k side_branches"
)
gate_files=()
rc=0
if [ "$what" != bench ]; then      # every kernel family compiled at once, one process per core
  python3 -m ds4cupy.engines.cuda.compile 2>&1 | tail -n 5
fi
if [ "$what" = gate ] || [ "$what" = all ]; then
  : > "$out/switches.txt"
  names=()
  for entry in "${SWITCHES[@]}"; do             # the gate runs side by side (one GPU, independent tests)
    name=${entry%%|*}; args=${entry#*|}
    read -r -a argv <<< "$args"
    [ -e "${argv[0]}" ] || continue
    [ "${argv[1]:-}" = -k ] || gate_files+=("${argv[0]}")
    names+=("$name|$args")
    ( timeout "${GATE_TIMEOUT:-150}" python3 -m pytest -m gpu -q -p no:cacheprovider -rs "${argv[@]}" \
        > "$out/gate-$name.log" 2>&1; echo $? > "$out/gate-$name.rc" ) &
  done
  wait
  for entry in "${names[@]}"; do
    name=${entry%%|*}; args=${entry#*|}
    if [ "$(cat "$out/gate-$name.rc")" = 0 ]; then
      echo "DS4CUPY_$name on: $args passed ($(tail -n 1 "$out/gate-$name.log"))" | tee -a "$out/switches.txt"
    else
      export "DS4CUPY_$name=0"
      rc=1
      echo "DS4CUPY_$name=0: $args FAILED, path off for what follows" | tee -a "$out/switches.txt"
      grep -E "^(FAILED|ERROR)|Error" "$out/gate-$name.log" | head -n 12
    fi
  done
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  python3 -m ds4cupy bench "$@" --json-out "$out/bench.json" 2>&1 | tee "$out/bench.log" | tail -n 45
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
if [ "$what" = tests ] || [ "$what" = all ]; then
  # every GPU test file but those gate already ran whole, one pytest process per file, side by side
  files=()
  for f in tests/test_gpu_*.py; do
    [[ " ${gate_files[*]} " == *" $f "* ]] || files+=("$f")
  done
  for f in "${files[@]}"; do
    b=$(basename "$f" .py)
    ( pytest_gpu "$f" > "$out/$b.log" 2>&1; echo $? > "$out/$b.rc" ) &
  done
  wait
  for f in "${files[@]}"; do
    b=$(basename "$f" .py)
    echo "$f: $(tail -n 1 "$out/$b.log")" | tee -a "$out/gpu-tests.log"
    if [ "$(cat "$out/$b.rc" 2>/dev/null)" != 0 ]; then
      rc=1
      grep -E "^(FAILED|ERROR)" "$out/$b.log" | head -n 12
    fi
  done
fi
if [ "$what" = verify ]; then
  python3 -m ds4cupy verify 2>&1 | tee "$out/verify.log" | tail -n 30
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
exit $rc
