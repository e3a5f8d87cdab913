#!/usr/bin/env bash
# One call on a GPU machine: install the carried wheels, check the engine's switchable kernel paths, benchmark, run
# every GPU test.
#   scripts/gpu_check.sh [all|gate|bench|tests|verify] [bench args...]
#   all = every kernel family compiled in parallel; gate and the other GPU test files side by side (one pytest
#   process each); then bench, alone, with the switches gate left on.
# gate: each switchable path (engines/cuda/switches.py; the SWITCHES table below names its tests) runs its own GPU
# tests first (they switch the path on themselves); the bench then runs with every path that passed switched on
# (DS4CUPY_<NAME>=1) and every one that failed switched off (=0), and $OUT/switches.txt says which. The bench report
# records the DS4CUPY_* variables in effect (meta.env): a benchmark never silently measures a path that failed its
# tests. A path that passes here can then become on by default (switches.DEFAULTS).
# Logs and JSON go to $OUT (the device tool's output folder: the logs packed into logs.tgz, since it brings back at
# most 8 files) or ./gpu-check-out. The test files are named (not the
# whole tests/ folder): the device image lacks the CPU suite's test extras (openai, anthropic, jsonschema, ...).
# GATE_TIMEOUT (default 150) and TEST_TIMEOUT (default 1800) bound each pytest process in seconds: a hung kernel
# counts as a failure (rc 124), and a short device budget still leaves time for the bench.
# GATES="NAME ..." runs only those switches' tests (a short budget: the paths that changed since their last GPU run);
# the others are exported at their defaults (switches.DEFAULTS), so the bench report's meta.env still names every
# switch. TESTS="tests/test_gpu_x.py ..." replaces the list of other GPU test files.
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

# switch name | the tests that decide it (pytest arguments)
SWITCHES=(
  "MOE_GROUPED|tests/test_gpu_moe_grouped.py"
  "PREFILL_MMA|tests/test_gpu_matmul_mma.py"
  "PREFILL_ATTN_MMA|tests/test_gpu_attention_mma.py"
  "DECODE_ATTN_MMA|tests/test_gpu_attention_decode_mma.py"
  "HC_FUSED|tests/test_gpu_ops.py -k hc_step"
  "BRANCHES|tests/test_gpu_model.py -k side_branches"
  "GPU_SAMPLING|tests/test_gpu_sampling.py"
  "MOE_I8|tests/test_gpu_moe_i8.py"
  "MOE_STAGED|tests/test_gpu_moe_staged.py"
  "MOE_DOWN_STAGED|tests/test_gpu_moe_down_staged.py"
  "MOE_GROUPED_PIPE|tests/test_gpu_moe_grouped_pipe.py"
  "PDL|tests/test_gpu_pdl.py"
  "HC_SIDE_SINKHORN|tests/test_gpu_hc_side_sinkhorn.py"
  "INDEXER_FP4|tests/test_gpu_indexer_fp4.py"
  "TOPK_MULTI|tests/test_gpu_topk_multi.py"
)
gate_files=()
rc=0
if [ "$what" != bench ]; then      # every kernel family compiled at once, one process per core
  python3 -m ds4cupy.engines.cuda.compile 2>&1 | tail -n 5
fi
# gate and the other GPU test files start together, one pytest process each (one GPU, independent tests; the other
# files run with every path on, so a path that fails its gate shows there too), each
# bounded by GATE_TIMEOUT / TEST_TIMEOUT seconds; the bench runs after all of them, alone on the GPU.
names=()
files=()
if [ "$what" = gate ] || [ "$what" = all ]; then
  : > "$out/switches.txt"
  for entry in "${SWITCHES[@]}"; do
    name=${entry%%|*}; args=${entry#*|}
    read -r -a argv <<< "$args"
    [ -e "${argv[0]}" ] || continue
    if [ -n "${GATES:-}" ] && [[ " $GATES " != *" $name "* ]]; then
      default=$(python3 -c "from ds4cupy.engines.cuda.switches import DEFAULTS; print(int(DEFAULTS['$name']))")
      export "DS4CUPY_$name=$default"
      echo "DS4CUPY_$name=$default: not gated this run (GATES), its default" >> "$out/switches.txt"
      continue
    fi
    [ "${argv[1]:-}" = -k ] || gate_files+=("${argv[0]}")
    names+=("$name|$args")
    ( timeout "${GATE_TIMEOUT:-150}" python3 -m pytest -m gpu -q -p no:cacheprovider -rfEs "${argv[@]}" \
        > "$out/gate-$name.log" 2>&1; echo $? > "$out/gate-$name.rc" ) &
  done
fi
if [ "$what" = tests ] || [ "$what" = all ]; then
  for f in ${TESTS:-tests/test_gpu_*.py}; do    # every GPU test file but those gate runs whole
    [[ " ${gate_files[*]} " == *" $f "* ]] || files+=("$f")
  done
  for f in "${files[@]}"; do
    b=$(basename "$f" .py)
    ( timeout "${TEST_TIMEOUT:-1800}" python3 -m pytest -m gpu -q -p no:cacheprovider -rfEs "$f" > "$out/$b.log" 2>&1
      echo $? > "$out/$b.rc" ) &
  done
fi
wait
for entry in "${names[@]}"; do
  name=${entry%%|*}; args=${entry#*|}
  if [ "$(cat "$out/gate-$name.rc")" = 0 ]; then
    export "DS4CUPY_$name=1"
    echo "DS4CUPY_$name=1: $args passed ($(tail -n 1 "$out/gate-$name.log"))" | tee -a "$out/switches.txt"
  else
    export "DS4CUPY_$name=0"
    rc=1
    echo "DS4CUPY_$name=0: $args FAILED (rc $(cat "$out/gate-$name.rc"); 124 = timed out), path off for what" \
         "follows" | tee -a "$out/switches.txt"
    grep -E "^(FAILED|ERROR)|Error" "$out/gate-$name.log" | head -n 12
  fi
done
for f in "${files[@]}"; do
  b=$(basename "$f" .py)
  echo "$f: rc $(cat "$out/$b.rc"): $(tail -n 1 "$out/$b.log")" | tee -a "$out/gpu-tests.log"
  if [ "$(cat "$out/$b.rc")" != 0 ]; then
    rc=1
    grep -E "^(FAILED|ERROR)" "$out/$b.log" | head -n 12
  fi
done
if [ "$what" = bench ] || [ "$what" = all ]; then
  python3 -m ds4cupy bench "$@" --json-out "$out/bench.json" 2>&1 | tee "$out/bench.log" | tail -n 45
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
if [ "$what" = verify ]; then
  python3 -m ds4cupy verify 2>&1 | tee "$out/verify.log" | tail -n 30
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
# the device tool brings back at most 8 files: every log goes back in one archive (bench.json stays beside it)
if [ -n "${OUT:-}" ]; then
  (cd "$out" && tar czf logs.tgz --remove-files --exclude=bench.json --exclude=logs.tgz -- * 2>/dev/null)
fi
exit $rc
