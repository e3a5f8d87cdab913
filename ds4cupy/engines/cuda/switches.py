"""The GPU backend's switchable kernel paths.

`DS4CUPY_<NAME>=1` in the environment turns a path on, `=0` off; unset, the path takes its default below. A path is on
by default only once its GPU tests have passed on a GPU and a benchmark of it is in BENCHMARKS.md; a path written
since then starts off (opt-in) and says why. `scripts/gpu_check.sh` runs each path's own tests first (its SWITCHES
table) and benchmarks with the ones that passed turned on, so the next GPU run can verify and flip them.

| name             | what it switches                                                                 | default |
|------------------|----------------------------------------------------------------------------------|---------|
| REPACK_Q8_0      | Q8_0 matrices repacked in place into planes at load (q8_0r.py)                   | on      |
| HC_FUSED         | one hc_step launch per hyper-connection step instead of hc_post + mix + collapse | on      |
| BRANCHES         | compressors / indexer / shared expert on a side stream (parallel graph branches) | on      |
| GPU_SAMPLING     | argmax + the sampler's candidates computed in the decode graph (sample.cu)       | on      |
| PREFILL_MMA      | prefill dense projections on tensor cores (matmul_mma.cu)                        | on      |
| MOE_GROUPED      | prefill MoE as grouped tensor-core GEMMs (moe_grouped.cu)                        | on      |
| MOE_I8           | IQ2_XXS expert gate/up: dp4a on three int8 planes of the activations (moe.cu)    | on      |
| PREFILL_ATTN_MMA | prefill attention (chunks of >= 16 tokens) on tensor cores (attention_mma.cu)    | on      |
| DECODE_ATTN_MMA  | decode attention splits of layers with >= 512 key rows on tensor cores           | on      |
| MOE_GROUPED_PIPE | MOE_GROUPED's GEMMs with next k-steps' loads in flight (moe_grouped_pipe_*)      | on      |
| MOE_STAGED       | one-token expert kernels staging through shared memory (moe_*_i8s_*, moe_*_xs_*) | on      |
| PDL              | graph-captured kernels launched with programmatic dependent launch, sm_90+       | on      |
| MOE_DOWN_STAGED  | MOE_STAGED's Q2_K down with each warp's expert rows staged too (moe_down_xsw_*)  | on      |
| HC_SIDE_SINKHORN | hc_step's Sinkhorn deferred to hc_sinkhorn_deferred on the side branch (hc.cu)   | on      |
| INDEXER_FP4      | QAT on: indexer keys packed (68 B a row), exact integer scores (indexer.cu)      | on      |
| TOPK_MULTI       | indexer top-k over G blocks a query, global radix levels (topk_multi.cu)         | off     |

Every path that is on passed its GPU tests on an H200 on 2026-12-03 (scripts/gpu_check.sh at commits ceec17e, a666a91, 5d43b87,
ea5f401 and 1d62150; BENCHMARKS.md has the benchmarks); `=0` keeps the older path for comparison and as a fallback.
DECODE_ATTN_MMA and MOE_GROUPED_PIPE passed theirs on the same day in a later run (tests/test_gpu_attention_decode_mma.py
18 passed at eadf732; tests/test_gpu_moe_grouped.py + test_gpu_moe_grouped_pipe.py 80 passed at 8d1fb39, the branch
merged here). Their speed, measured by scripts/bench_attention_decode.py and bench_moe_prefill.py in that run, is in
docs/PERF_NOTES.md: decode attention on tensor cores is 1.18x faster for 640 key rows and 0.86-0.93x for 128-160
(hence its 512-row floor, attention_decode_mma.MIN_ROWS); the pipelined grouped MoE 1.22x (q2) and 1.18x (q4) at
2,048 tokens, bit-identical.
MOE_STAGED (moe_gate_up_i8s_iq2_xxs and moe_down_xs_q2_k, bit-identical to the kernels they replace) passed
tests/test_gpu_moe_staged.py at 0970b1b (25 passed with test_gpu_quant_ops' MoE tests); scripts/bench_moe.py: IQ2_XXS
gate/up 34.8 -> 30.8 us a layer, Q2_K down 21.7 -> 20.7 (4 rows a warp, XS_RD; 21.9 with 2); the 43-layer decode
step (profile_decode.py --graph --time 50, depth 4,096) 9.10 -> 8.77 ms.
PDL (launch.py, kernels/pdl.cuh) passed tests/test_gpu_pdl.py at ced352d (8 passed: launches bit-identical, the
tiny model's logits with it on and off bit for bit) and the ced352d bench ran with it; decode step 8.73 -> 8.68 ms and
8.85 -> 8.50 ms in two A/Bs (docs/PERF_NOTES.md). Since ced352d it takes only graph-captured launches (the decode
graph): eager launches keep CuPy's own, cheaper argument marshalling.
MOE_DOWN_STAGED, HC_SIDE_SINKHORN and INDEXER_FP4 passed their GPU tests at 36b50d1 (scripts/gpu_check.sh with
GATES: 7, 22 and 19 passed; tests/test_gpu_model.py 16 passed) and the 36b50d1 bench ran with them on (BENCHMARKS.md).
A/B on one model (scripts/profile_decode.py --ab, 43 layers, depth 4,096, 3 rounds a b b a a b, same run):
MOE_DOWN_STAGED 8.614 -> 8.480 ms a step (-1.6 %, every round lower); HC_SIDE_SINKHORN 8.599 -> 8.572 (-0.3 %, within
the rounds' spread: the Sinkhorn was mostly hidden behind hc_step's collapse and norm). Both are bit-identical to the
paths they replace. INDEXER_FP4 (QAT on only; QAT off changes nothing) is exact where the block exponents are within 9
of each other (kernels/indexer.cu) and cuts the indexer cache and its reads 7.5x (2,331 bytes a token for Flash);
its speed at long context is not measured yet.
MOE_DOWN_STAGED: moe_down_xsw_q2_k, bit-identical to moe_down_xs_q2_k (tests/test_gpu_moe_down_staged.py).
HC_SIDE_SINKHORN: the mHC Sinkhorn (20 dependent double normalisations in hc_step's last block) leaves hc_step, which
writes its inputs instead, for a one-warp-a-token kernel on the side branch; only the next hc_step (and the head) wait
for it, one sub-block later. Bit-identical (the same double arithmetic); tests/test_gpu_hc_side_sinkhorn.py.
INDEXER_FP4: with QAT on (model.qat) each CSA layer's indexer rows are stored as e2m1 codes + block exponents
(compressor.cu compressor_emit_fp4, lossless for the fp4_sim'd rows) and scored by indexer_scores_fp4 with exact
integer block dot products (tests/test_gpu_indexer_fp4.py): 512 -> 68 bytes a row.
TOPK_MULTI (off: written 2026-12-03, not yet run on a GPU): indexer_topk's selection (one block of 1,024 threads a
query, six full passes over up to ~262,000 scores at 1M context by one SM) spread over G blocks a query (G from ctx,
ops.topk_multi_blocks): three 11/11/10-bit radix levels with per-query histograms in global memory, then a counted,
deterministic compaction; the same int32 output bit for bit (kernels/topk_multi.cu; tests/test_gpu_topk_multi.py).
Eight launches instead of one, so it can only pay at long context; its speed is not measured yet.
"""
from __future__ import annotations

import os

DEFAULTS = {"REPACK_Q8_0": True, "HC_FUSED": True, "BRANCHES": True, "GPU_SAMPLING": True, "PREFILL_MMA": True,
            "MOE_GROUPED": True, "MOE_I8": True, "PREFILL_ATTN_MMA": True,
            "DECODE_ATTN_MMA": True, "MOE_GROUPED_PIPE": True, "MOE_STAGED": True, "PDL": True,
            "MOE_DOWN_STAGED": True, "HC_SIDE_SINKHORN": True,
            "INDEXER_FP4": True, "TOPK_MULTI": False}


def enabled(name: str) -> bool:
    """Whether path `name` (a key of DEFAULTS) is on: DS4CUPY_<name> = 1 / 0, else its default."""
    if name not in DEFAULTS:
        raise KeyError(f"no switchable path {name!r} (known: {', '.join(DEFAULTS)})")
    var = f"DS4CUPY_{name}"
    value = os.environ.get(var)
    if value is None or value == "":
        return DEFAULTS[name]
    if value not in ("0", "1"):
        raise ValueError(f"{var}={value!r}: use 1 (on) or 0 (off), or leave it unset for the default "
                         f"({'on' if DEFAULTS[name] else 'off'})")
    return value == "1"


__all__ = ["DEFAULTS", "enabled"]
