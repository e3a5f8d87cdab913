"""The GPU backend's model and session: the forward pass of ds4cupy.engines.reference (docs/model.md §2) on CuPy arrays with
the kernels of ds4cupy/kernels. Same contract as ReferenceSession (docs/ARCHITECTURE.md, Engine).

Read top to bottom `_forward` is reference.forward_chunk: embedding -> per block (mHC pre, attention with window ring
+ compressed rows + indexer, mHC post, mHC pre, MoE, mHC post) -> hc_head -> norm -> head.

State per layer (device buffers from memory.alloc_kv, the single source of truth for their shapes):
- raw: the window ring; its first `sliding_window` rows hold position p at row p % sliding_window.
- comp / comp_kv_state / comp_score_state: compressed rows (row w at index w) and the compressor's ring of the last
  lanes*ratio tokens' (kv, gate score + ape) rows (slot p % (lanes*ratio)); the partial window of the reference's
  CompressorState and the previous full window of the overlapping ratio-4 compressor both live in that ring.
- index / index_kv_state / index_score_state: the same for the indexer's compressor (ratio-4 layers). With
  model.indexer_fp4 (switch INDEXER_FP4 and QAT on) `index` holds the rows packed, uint8 [ctx // 4 + 2, 68] for Flash's
  128 dims (numerics.fp4_pack: e2m1 codes + block exponents, lossless for the fp4_sim'd rows) instead of float32
  [ctx // 4 + 2, 128]: 17 instead of 128 bytes a token per CSA layer (2,331 bytes a token less for Flash's 21, the KV
  cache 13,760 -> 11,429 bytes a token; memory.budget.kv_layout sizes it), and the indexer reads 7.5x fewer bytes.
Nothing else is state: the number of compressed rows is (pos + 1) // ratio, computed by the kernels from the device
position counter.

Decode-step rules (design.md "Decode speed"): every buffer is allocated when the session is made; a step reads the
position from device memory (`d_pos`, advanced by a kernel at the end of each call) and the token id from `d_ids`;
expert ids and weights go from the router kernel to the MoE kernels through device memory. The only host transfers
of a decode step are the token id upload and the logits download at the end; with switch GPU_SAMPLING on
(engines/cuda/switches.py), decode_top (the fast path) runs the sampler's candidate kernels in the same graph
(engines/cuda/sample_ops.py) and downloads ~8 KB through pinned memory instead of the row.
"""
from __future__ import annotations

import contextlib
import math
import sys

import numpy as np

from ...format.config import ModelConfig
from ...format.model_file import ModelFile
from ...text.candidates import TopCandidates, top_candidates
from ..contract import check_token_ids
from ..numerics import rope_freqs
from ..state import SessionState, chain_of, chain_rows, chain_tokens
from . import attention_decode_mma, attention_mma, moe_grouped, ops
from . import quant_ops as qo
from . import switches
from .q8_0r import Q8_0R
from .sample_ops import DeviceCandidates

DEFAULT_CHUNK = 2048
# decode attention: a layer's key list (its longest at any position < ctx) is cut into at most DECODE_MAX_SPLITS splits
# of at least DECODE_MIN_ROWS_PER_SPLIT entries. H200 (ncu, commit ea5f401): with 32 entries a split, a window layer
# ran 32 CTAs (8 head groups x 4 splits) on 132 SMs for 29 us, each warp stalled on its serial row loop; more, shorter
# splits fill the GPU, and the cap bounds the partial results attn_combine reads back (splits x 64 heads x 2 KB).
DECODE_MIN_ROWS_PER_SPLIT = 8
DECODE_MAX_SPLITS = 32


def decode_rows_per_split(rows: int) -> int:
    """Key-list entries of one decode attention split for a layer whose longest key list is `rows` (the rule above)."""
    return max(DECODE_MIN_ROWS_PER_SPLIT, -(-rows // DECODE_MAX_SPLITS))


def _vector_name(name: str) -> bool:
    return name.endswith(("_norm.weight", "_scale.weight", "_base.weight", "attn_sinks.weight", "exp_probs_b.bias",
                          "attn_norm.weight", "ffn_norm.weight", "output_norm.weight", "compressor_ape.weight"))


class CudaModel:
    """Weights on the GPU + per-layer RoPE frequencies. `new_session(ctx)` gives a CudaSession.

    Built from a file with `CudaModel.from_file(model_file, ...)` (engine.load does this; ds4cupy.memory places the
    weights) or from weights already on the GPU with `CudaModel.from_tensors(config, tensors, ...)` (synthetic
    benchmark models). Either way the model holds every tensor's raw GGUF bytes (`w`), its block type (`qtype`) and the
    small vectors as float32 (`v`).
    """

    backend = "cuda"
    max_decode_batch = 1     # no batched decode step yet (engines/contract.py): the server steps streams in turn

    def __init__(self, config: ModelConfig, weights: dict, qtypes: dict, vectors: dict, mem, kv_mode: str,
                 qat: bool = True, chunk: int = DEFAULT_CHUNK, device: int = 0, decode_graph: bool = True,
                 weights_mode: str = "device", file: ModelFile | None = None, repack_q8_0: bool | None = None):
        import cupy as cp

        self.file = file
        self.config = config
        self.w, self.qtype, self.v = weights, qtypes, vectors
        self.mem, self.kv_mode, self.weights_mode = mem, kv_mode, weights_mode
        self.qat = bool(qat)
        self.chunk = int(chunk)
        self.device = device
        self.decode_graph = bool(decode_graph)
        c = self.config
        with cp.cuda.Device(device):
            yarn = (c.rope_scaling_factor, c.rope_orig_ctx, c.yarn_beta_fast, c.yarn_beta_slow)
            tables: dict[tuple, object] = {}
            self.freqs = []
            for il in range(c.n_layer):
                key = (c.rope_base(il), c.uses_yarn(il))
                if key not in tables:
                    tables[key] = cp.asarray(rope_freqs(c.n_rot, key[0], yarn if key[1] else None))
                self.freqs.append(tables[key])
        for n in ("output_hc_fn.weight",) + tuple(f"blk.{il}.hc_{s}_fn.weight" for il in range(c.n_layer)
                                                  for s in ("attn", "ffn")):
            if self.qtype[n].name not in ("F32", "F16", "BF16"):
                raise NotImplementedError(f"{n}: hyper-connection projections in {self.qtype[n].name} are not "
                                          "supported by the GPU backend yet (F32 / F16 / BF16)")
        # kernel paths (engines/cuda/switches.py): hc_step (one launch per hyper-connection step) or the three
        # launches it fuses; independent chains (the compressors and the indexer beside the query path, the shared
        # expert beside the router and routed experts) on a side stream as parallel branches of the decode graph, or
        # one stream in program order; the sampler's candidates in the decode graph or from the downloaded row
        self.read_switches(device)
        if repack_q8_0 is None:
            repack_q8_0 = switches.enabled("REPACK_Q8_0")
        if repack_q8_0:
            self._repack_q8_0()

    def read_switches(self, device: int | None = None) -> None:
        """The switches sessions read from the model (engines/cuda/switches.py), from the environment now: at build,
        and again when an A/B changes DS4CUPY_* between sessions of one model (scripts/profile_decode.py --ab). The
        others (MOE_*, PDL, ...) are read at each launch; REPACK_Q8_0 only at build (it rewrites the weights)."""
        self.hc_fused = switches.enabled("HC_FUSED")
        self.branches = switches.enabled("BRANCHES")
        self.gpu_sampling = switches.enabled("GPU_SAMPLING")
        # hc_step's Sinkhorn on the side branch, joined before the next hc_step (HC_SIDE_SINKHORN; needs hc_step)
        self.hc_side_sinkhorn = self.hc_fused and switches.enabled("HC_SIDE_SINKHORN")
        # the indexer's rows packed (e2m1 codes + block exponents) and scored with exact integer dot products: only
        # with QAT on, where the rows and queries are fp4_sim'd and so exactly representable (kernels/indexer.cu)
        self.indexer_fp4 = self.qat and switches.enabled("INDEXER_FP4")
        # the indexer's top-k over G blocks a query (TOPK_MULTI, kernels/topk_multi.cu): the same output as indexer_topk
        self.topk_multi = switches.enabled("TOPK_MULTI")
        self.prefill_attn_mma = attention_mma.enabled(device)    # chunks of >= MIN_TOKENS: attention_mma.cu
        self.decode_attn_mma = attention_decode_mma.enabled(device)   # decode and shorter chunks: its splits

    def _repack_q8_0(self) -> None:
        """Q8_0 weights into the plane layout of engines/cuda/q8_0r.py, in place (same bytes and allocation; arrays
        given to from_tensors included), so the decode kernels read them with 16-byte loads: every tensor of
        q8_0r.repack_plan, whose qtype becomes Q8_0R(slab_rows); quant_ops dispatches on it. On by default since
        the launch geometry of q8r_launch_geometry (4 rows a warp): measured on the H200 (43-layer q2, commit dfbc8a5,
        benchmarks/h200/2026-12-03-ab-repack*-dfbc8a5.json) decode 80.9 vs 77.0 t/s at depth 0, 77.2 vs 73.4 at
        4,096, prefill pp512 267 vs 241 t/s. repack_q8_0=False or DS4CUPY_REPACK_Q8_0=0 keeps the GGUF blocks."""
        import cupy as cp

        from .q8_0r import repack_plan, repack_q8_0
        plan = repack_plan(((n, t, self.w[n].shape) for n, t in self.qtype.items() if n in self.w),
                           self.config.o_groups)
        with cp.cuda.Device(self.device):
            for name, slab in plan.items():
                w = self.w[name]
                repack_q8_0(w, w.shape[-1] // 34 * 32, slab)
                self.qtype[name] = Q8_0R(slab)

    @classmethod
    def from_file(cls, mf: ModelFile, qat: bool = True, memory: str = "auto", progress: bool = False,
                  chunk: int = DEFAULT_CHUNK, device: int = 0, decode_graph: bool = True,
                  ctx_hint: int | None = None) -> "CudaModel":
        """Place a ModelFile's weights (memory: auto | device | managed; auto plans for `ctx_hint` tokens)."""
        import cupy as cp

        from ...memory import Budget, DeviceMemory, choose_placement, detect, place_weights

        c = mf.config
        mem = DeviceMemory(device)
        table = [(n, t.qtype, t.nbytes) for n, t in mf.tensors.items()]
        if memory in ("device", "managed"):
            weights_mode = kv_mode = memory
            reason = "as requested (--memory)"
        else:
            budget = Budget.build(c, table, ctx_hint or min(c.n_ctx_train, 65536), chunk,
                                  index_fp4=qat and switches.enabled("INDEXER_FP4"))     # as read_switches will
            placement = choose_placement(detect(device), budget, memory)
            weights_mode, kv_mode, reason = placement.weights_mode, placement.kv_mode, placement.reason
        print(f"ds4cupy: weights in {weights_mode} memory, KV in {kv_mode} memory: {reason}", file=sys.stderr)
        tensors = [(n, t.offset, t.nbytes, t.raw_dtype, t.raw_shape) for n, t in mf.tensors.items()]
        with cp.cuda.Device(device):
            w = place_weights(str(mf.path), tensors, weights_mode, mem, progress=progress)
            # small vectors as float32 (they may be F16 / BF16 on disk)
            v = {n: cp.asarray(mf.dequantize(n).astype(np.float32)) for n in mf.tensors if _vector_name(n)}
        return cls(c, w, {n: t.qtype for n, t in mf.tensors.items()}, v, mem, kv_mode, qat=qat, chunk=chunk,
                   device=device, decode_graph=decode_graph, weights_mode=weights_mode, file=mf)

    @classmethod
    def from_tensors(cls, config: ModelConfig, tensors: dict, qat: bool = True, mem=None,
                     chunk: int = DEFAULT_CHUNK, device: int = 0, decode_graph: bool = True) -> "CudaModel":
        """Weights already on the GPU: tensors = {name: (qtype, numpy-order shape, cupy raw array)} in the raw layout
        of ModelFile.raw (e.g. ds4cupy.tools.synthetic.synthetic_tensors). KV goes to device memory."""
        import cupy as cp

        from ...format import quants
        from ...memory import DeviceMemory

        mem = mem or DeviceMemory(device)
        w = {n: arr for n, (_, _, arr) in tensors.items()}
        qtypes = {n: qt for n, (qt, _, _) in tensors.items()}
        with cp.cuda.Device(device):
            v = {n: cp.asarray(quants.dequantize(cp.asnumpy(arr), qt, shape).astype(np.float32))
                 for n, (qt, shape, arr) in tensors.items() if _vector_name(n)}
        return cls(config, w, qtypes, v, mem, "device", qat=qat, chunk=chunk, device=device,
                   decode_graph=decode_graph)

    def new_session(self, ctx: int | None = None) -> "CudaSession":
        return CudaSession(self, int(ctx or min(self.config.n_ctx_train, 65536)))

    def close(self) -> None:
        self.w = None
        self.v = None


class CudaSession:
    """One sequence on the GPU. prefill(ids) runs in chunks of model.chunk tokens; decode(id) is a chunk of one.

    With model.decode_graph the second decode step captures the step (every launch of `_forward(1)`) into a CUDA graph
    on a private stream, and every later decode only uploads the token id, replays the graph and downloads the logits.
    The graph stays valid across prefill, snapshot/restore and reset: buffers never move, and the position lives in
    device memory.
    """

    def __init__(self, model: CudaModel, ctx: int):
        import cupy as cp

        from ...memory import alloc_kv

        self.model = model
        self.ctx = ctx
        c = model.config
        self.S_max = min(model.chunk, ctx)
        with cp.cuda.Device(model.device):
            self.kv = alloc_kv(model.mem, c, ctx, model.kv_mode, model.chunk, index_fp4=model.indexer_fp4)
            self.d_pos = cp.zeros(1, cp.int32)
            self.d_ids = cp.zeros(self.S_max, cp.int32)
            self._side = cp.cuda.Stream(non_blocking=True)      # the side branch (_side_branch)
            self._groups = self._projection_groups()
            self._grp_rows = max([r + g.total_rows for layer in self._groups for g, r, _ in layer] + [1])
            self._alloc_scratch()
            self._cand = (DeviceCandidates(c.n_vocab, lambda shape, dtype: model.mem.alloc("scratch", shape, dtype))
                          if model.gpu_sampling else None)
        self.tokens: list[int] = []
        self.prefilled_tokens = 0          # tokens consumed by prefill() since the session was made (not decode)
        self._graph = None
        self._graph_stream = None
        self._eager_decodes = 0
        self._steps = 0                    # decode steps run: a TopCandidates' logits() is valid for its step only
        self.decode_timing = False         # bench: CUDA events around each decode step's GPU work
        self._events = None

    # ---- buffers -----------------------------------------------------------------------------------------------------
    def _alloc_scratch(self) -> None:
        c, m = self.model.config, self.model
        S = self.S_max
        n, D, H, hd = c.hc_mult, c.n_embd, c.n_head, c.head_dim
        E, k, ff = c.n_expert, c.n_expert_used, c.n_ff_exp
        cw = max([c.compressor_width(il) for il in range(c.n_layer)] + [0])
        HI, ci = c.indexer_n_head, c.indexer_head_dim
        has_csa = any(c.ratio(il) == 4 for il in range(c.n_layer))
        self.hc_split = max(ops.hc_step_nsplit(n, D, 1), ops.hc_step_nsplit(n, D, S))
        # decode attention splits: enough for the longest key list any position of this session can have
        self.att_rows = [ops.attention_rows(c.sliding_window, c.ratio(il), self._att_mode(il), c.indexer_top_k, self.ctx)
                         for il in range(c.n_layer)]
        self.att_rps = [decode_rows_per_split(r) for r in self.att_rows]
        ns = max(-(-r // rps) for r, rps in zip(self.att_rows, self.att_rps))
        sizes = {
            "X": S * n * D, "u": S * D, "xn": S * D, "coef": S * (n + n * n), "hcpart": S * self.hc_split * 32,
            "qa": S * c.q_lora_rank, "qr": S * c.q_lora_rank, "kvp": S * hd, "kvcur": S * hd,
            "q": S * H * hd, "att": S * H * hd, "part_ml": max(S, ns) * H * 2, "part_o": max(S, ns) * H * hd,
            "low": S * c.o_groups * c.o_lora_rank,
            "y": S * D, "C": S * cw, "Z": S * cw, "rlog": S * E, "ew": S * k,
            "mid": S * k * ff, "mids": S * ff, "logits": c.n_vocab,
            "grp": self._grp_rows,
        }
        if has_csa:
            sizes.update({"Ci": S * 2 * ci, "Zi": S * 2 * ci, "qi": S * HI * ci, "wts": S * HI,
                          "scores": S * (self.ctx // 4 + 2)})
        self._flat = {name: m.mem.alloc("scratch", (max(v, 1),), np.float32) for name, v in sizes.items()}
        self._eids = m.mem.alloc("scratch", (S * k,), np.int32)
        self._topk = m.mem.alloc("scratch", (S * max(c.indexer_top_k, 1),), np.int32) if has_csa else None
        # TOPK_MULTI: the top-k's per-query histograms (zero between calls) and its state / per-block counts; G from ctx
        self._topk_hist = self._topk_meta = None
        if has_csa and m.topk_multi:
            g1 = ops.topk_multi_blocks(self.ctx // 4, 1)     # the most blocks a query gets (S * G(S) <= S * G(1))
            self._topk_hist = m.mem.alloc("scratch", (S * ops.TOPKM_BINS,), np.uint32)
            self._topk_hist.fill(0)
            self._topk_meta = m.mem.alloc("scratch", (ops.topk_multi_meta_size(S, g1),), np.int32)
        self._hc_counter = m.mem.alloc("scratch", (S,), np.uint32)
        self._hc_counter.fill(0)                 # hc_step's arrival counters: every launch leaves them at zero
        # the deferred Sinkhorn's inputs (hc_step sk, float64: the float32 scratch of _b does not fit them)
        self._hc_sk = m.mem.alloc("scratch", (S * (c.hc_mix + 2),), np.float64) if m.hc_side_sinkhorn else None
        self._ring = {il: self.kv[(il, "raw")][: c.sliding_window] for il in range(c.n_layer)}
        # prefill MoE as grouped GEMMs (S >= moe_grouped.MIN_TOKENS): routing buffers and per-pair output rows
        self._moe_prefill = moe_grouped.PrefillMoE(c, m.qtype, m.v, S, lambda shape, dt: m.mem.alloc("scratch", shape,
                                                                                                      dt))

    def _xn_projections(self, il: int) -> list[str]:
        """The attention projections of layer il that read the block's normalised input xn."""
        c = self.model.config
        p = f"blk.{il}."
        names = [p + "attn_q_a.weight", p + "attn_kv.weight"]
        if c.ratio(il):
            names += [p + "attn_compressor_kv.weight", p + "attn_compressor_gate.weight"]
        if c.ratio(il) == 4:
            names += [p + "indexer_compressor_kv.weight", p + "indexer_compressor_gate.weight",
                      p + "indexer.proj.weight"]
        return names

    def _projection_groups(self) -> list[list[tuple]]:
        """Per layer, the decode launches of _xn_projections: matrices of one block type share one MatvecGroup launch
        (q_a + kv; the F16 compressor, indexer-compressor and indexer weights), each group writing its slice of the
        scratch buffer "grp": [(group, first row in grp, names)]. A type with one matrix keeps its own matvec."""
        m = self.model
        groups = []
        for il in range(m.config.n_layer):
            by_type: dict[str, list[str]] = {}
            for name in self._xn_projections(il):
                q = m.qtype[name]       # Q8_0R matrices of one slab each share a launch whatever their row counts
                one_slab = isinstance(q, Q8_0R) and q.slab_rows == m.w[name].shape[0]
                by_type.setdefault("Q8_0R, one slab" if one_slab else str(q), []).append(name)
            layer, row = [], 0
            for names in by_type.values():
                if len(names) > 1:
                    g = qo.MatvecGroup([m.w[n] for n in names], [m.qtype[n] for n in names], m.config.n_embd)
                    layer.append((g, row, names))
                    row += g.total_rows
            groups.append(layer)
        return groups

    def _decode_projections(self, xn, il: int, query: bool) -> dict:
        """Decode (one token): the grouped projections of layer il, {name: [1, rows] view of "grp"}; query=True the
        groups holding the query path's q_a / kv, False the others (the compressors' and the indexer's, which the
        side branch runs)."""
        out = {}
        grp = self._b("grp", self._grp_rows)
        q_a = f"blk.{il}.attn_q_a.weight"
        for g, row, names in self._groups[il]:
            if (q_a in names) == query:
                y = g.run(xn[0], out=grp[row: row + g.total_rows])
                out.update({n: v.reshape(1, -1) for n, v in zip(names, g.split(y))})
        return out

    def _att_mode(self, il: int) -> int:
        """Attention key-list mode of layer il: 0 window only, 1 every compressed row (HCA), 2 indexed (CSA)."""
        ratio = self.model.config.ratio(il)
        return 0 if not ratio else (2 if ratio == 4 else 1)

    def _b(self, name: str, *shape):
        """A C-contiguous view of scratch buffer `name` with `shape` (no allocation)."""
        return self._flat[name][: math.prod(shape)].reshape(shape)

    # ---- contract ----------------------------------------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def reset(self) -> None:
        for a in self.kv.values():
            a.fill(0)
        self.d_pos.fill(0)
        self.tokens = []

    # ---- state (ds4cupy.engines.state): only the rows that hold state are copied ------------------------------------
    def _state_rows(self, il: int, name: str) -> int:
        """Tokens per row of append-only buffer `name` of layer il (compressed rows: the layer's ratio; indexer: 4)."""
        return self.model.config.ratio(il) if name == "comp" else 4

    def snapshot(self, since: int = 0):
        """The state tokens [since, n_tokens) added (since=0: all of it), as GPU copies: compressed and indexer rows
        [since // r, n // r) (append-only), the window ring rows [0, min(n, window)) (attention reads no other ring
        row) and the compressor rings whole. Nothing proportional to ctx is copied."""
        import cupy as cp
        n, window = self.n_tokens, self.model.config.sliding_window
        if not 0 <= since <= n:
            raise ValueError(f"snapshot since={since}: the session holds {n} tokens")
        rows, fixed = {}, {}
        with cp.cuda.Device(self.model.device):
            for (il, name), a in self.kv.items():
                if name in ("comp", "index"):
                    r = self._state_rows(il, name)
                    rows[f"{il}.{name}"] = (since // r, a[since // r: n // r].copy())
                else:
                    fixed[f"{il}.{name}"] = (a[: min(n, window)] if name == "raw" else a).copy()
        return SessionState(since, self.tokens[since:], rows, fixed)

    def restore(self, state) -> None:
        """Become the session that consumed the chain's tokens: a SessionState from snapshot() or a list [complete,
        delta, ...] (ds4cupy.engines.state.chain_of); host (NumPy) pieces are uploaded. Checked before anything is
        written."""
        import cupy as cp
        chain = chain_of(state)
        tokens = chain_tokens(chain)
        n, last = len(tokens), chain[-1].fixed
        if n > self.ctx:
            raise ValueError(f"the state holds {n} tokens, the session context is {self.ctx}")
        writes = []
        for (il, name), buf in self.kv.items():
            key = f"{il}.{name}"
            if name in ("comp", "index"):
                writes += [(buf, start, a) for start, a in chain_rows(chain, key, n // self._state_rows(il, name))]
            elif key not in last:
                raise ValueError(f"the state has no {key!r} (not a state of this model on this backend)")
            else:
                writes.append((buf, 0, last[key]))
        for buf, start, a in writes:
            if start + a.shape[0] > buf.shape[0] or tuple(a.shape[1:]) != tuple(buf.shape[1:]):
                raise ValueError(f"state piece of shape {tuple(a.shape)} at row {start} does not fit a buffer of "
                                 f"shape {tuple(buf.shape)}")
        with cp.cuda.Device(self.model.device):
            for buf, start, a in writes:
                buf[start: start + a.shape[0]] = cp.asarray(a)
            self.d_pos[...] = n
        self.tokens = tokens

    def fill_random_state(self, n_tokens: int, seed: int = 0) -> None:
        """Benchmarks only: put the session at depth n_tokens without prefilling. Every KV buffer (window ring,
        compressed and indexer rows, compressor rings) gets standard-normal values (the scale of RMS-normalised rows)
        and the position becomes n_tokens, so the next step reads exactly the rows a real context of that depth
        makes visible. The values are not a real context's: logits after this are meaningless, speed is not."""
        import cupy as cp
        if not 0 <= n_tokens < self.ctx:
            raise ValueError(f"n_tokens must be in [0, {self.ctx}), got {n_tokens}")
        gen = cp.random.default_rng(seed)
        with cp.cuda.Device(self.model.device):
            for (il, name), a in self.kv.items():
                if a.dtype == cp.uint8:          # packed indexer rows: random codes, block exponents in [-3, 0]
                    ci = self.model.config.indexer_head_dim    # (values of a unit-RMS row's magnitude)
                    a[...] = 0
                    a[:, : ci // 2] = gen.integers(0, 256, (a.shape[0], ci // 2), dtype=cp.int32).astype(cp.uint8)
                    a[:, ci // 2: ci // 2 + ci // 32] = (gen.integers(-3, 1, (a.shape[0], ci // 32), dtype=cp.int32)
                                                         .astype(cp.int8).view(cp.uint8))
                else:
                    a[...] = gen.standard_normal(a.shape, dtype=cp.float32)
            self.d_pos.fill(n_tokens)
        self.tokens = [int(t) for t in np.random.default_rng(seed).integers(0, self.model.config.n_vocab, n_tokens)]

    def prefill(self, ids, all_logits: bool = False) -> np.ndarray:
        import cupy as cp
        ids = check_token_ids(ids, self.model.config.n_vocab, self.n_tokens, self.ctx)
        self.prefilled_tokens += int(ids.size)
        out = []
        with cp.cuda.Device(self.model.device):
            for s in range(0, ids.size, self.S_max):
                chunk = ids[s: s + self.S_max]
                last = s + chunk.size == ids.size
                self.d_ids[: chunk.size].set(chunk.astype(np.int32))
                logits = self._forward(chunk.size, all_logits or last, all_logits)
                if logits is not None:
                    out.append(cp.asnumpy(logits))
                self.tokens.extend(int(t) for t in chunk)
        return np.concatenate(out) if all_logits else out[-1][-1]

    def decode(self, token_id: int) -> np.ndarray:
        import cupy as cp
        stream = self._decode_step(token_id, None)
        with cp.cuda.Device(self.model.device):
            logits = cp.asnumpy(self._b("logits", 1, self.model.config.n_vocab), stream=stream)
            stream.synchronize()
        return logits[0]

    @property
    def candidates_on_device(self) -> bool:
        """Contract: decode_top computes the candidates in the decode graph (switch GPU_SAMPLING)."""
        return self.model.gpu_sampling

    def decode_top(self, token_id: int, temperature: float) -> TopCandidates:
        """The decode fast path (contract): the step's candidate set (kernels/sample.cu, computed in the decode graph
        for `temperature`), one ~8 KB copy into pinned memory; .logits() downloads the row until the next step.
        With switch GPU_SAMPLING off (DS4CUPY_GPU_SAMPLING=0) the row is downloaded and the
        candidates are text.candidates.top_candidates of it, as the reference session does."""
        import cupy as cp
        if not self.model.gpu_sampling:
            row = self.decode(token_id)
            return top_candidates(row, temperature, fetch_logits=lambda: row)
        stream = self._decode_step(token_id, temperature)
        with cp.cuda.Device(self.model.device):
            self._cand.copy_to_host(stream)
            stream.synchronize()
        return self._cand.result(self._logits_fetcher(self._steps))

    def _logits_fetcher(self, step: int):
        def fetch() -> np.ndarray:
            import cupy as cp
            if step != self._steps:
                raise RuntimeError(f"the logits of decode step {step} are gone: the session has run step {self._steps}")
            with cp.cuda.Device(self.model.device):
                return cp.asnumpy(self._b("logits", 1, self.model.config.n_vocab)[0])
        return fetch

    @property
    def last_decode_gpu_ms(self) -> float | None:
        """With decode_timing: GPU milliseconds between the CUDA events around the last decode step's kernels (the
        graph replay, or the eager launches of the first steps); the uploads and the download are outside."""
        if self._events is None:
            return None
        import cupy as cp
        self._events[1].synchronize()
        return float(cp.cuda.get_elapsed_time(*self._events))

    def _decode_step(self, token_id: int, temperature: float | None):
        """Queue one decode step (the forward of one token, then the candidate kernels) and return its stream; nothing
        is downloaded. The first step runs eagerly (kernels get compiled and loaded); with model.decode_graph the
        second captures the same launches into a CUDA graph that every later step replays."""
        import cupy as cp
        ids = check_token_ids([token_id], self.model.config.n_vocab, self.n_tokens, self.ctx)
        V = self.model.config.n_vocab
        with cp.cuda.Device(self.model.device):
            timing = self.decode_timing
            if timing and self._events is None:
                self._events = (cp.cuda.Event(), cp.cuda.Event())
            if not self.model.decode_graph or self._eager_decodes < 1:
                self._eager_decodes += 1
                stream = cp.cuda.get_current_stream()
                if self._cand is not None:
                    self._cand.set_temperature(temperature, stream)
                self.d_ids[:1].set(ids.astype(np.int32))
                if timing:
                    self._events[0].record(stream)
                self._forward(1, True, False)
                if self._cand is not None:
                    self._cand.launch(self._b("logits", 1, V)[0])
            else:
                if self._graph is None:
                    self._graph_stream = cp.cuda.Stream(non_blocking=True)
                    with self._graph_stream:
                        self._graph_stream.begin_capture()
                        try:
                            self._forward(1, True, False)
                            if self._cand is not None:
                                self._cand.launch(self._b("logits", 1, V)[0])
                        finally:
                            self._graph = self._graph_stream.end_capture()
                stream = self._graph_stream
                stream.wait_event(cp.cuda.get_current_stream().record())   # after prefill / restore / reset work
                if self._cand is not None:
                    self._cand.set_temperature(temperature, stream)
                self.d_ids[:1].set(ids.astype(np.int32), stream=stream)
                if timing:
                    self._events[0].record(stream)
                self._graph.launch(stream)
            if timing:
                self._events[1].record(stream)
        self.tokens.append(int(ids[0]))
        self._steps += 1
        return stream

    # ---- the forward pass ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _side_branch(self):
        """Launches in the block go to the side stream, after everything queued so far on the current one (a parallel
        branch of the decode graph; concurrent streams in eager calls). Every use is followed by
        _join_side_branch before anything reads what the branch wrote. model.branches False (DS4CUPY_BRANCHES=0):
        the launches stay on the current stream, in program order."""
        if not self.model.branches:
            yield
            return
        import cupy as cp
        main = cp.cuda.get_current_stream()
        fork = cp.cuda.Event(disable_timing=True)
        fork.record(main)
        self._side.wait_event(fork)
        with self._side:
            yield

    def _join_side_branch(self) -> None:
        """The current stream waits for everything queued on the side stream."""
        if not self.model.branches:
            return
        import cupy as cp
        done = cp.cuda.Event(disable_timing=True)
        done.record(self._side)
        cp.cuda.get_current_stream().wait_event(done)

    def _proj(self, name: str, x, out, done: dict | None = None):
        """out[S, rows] = x[S, cols] @ W^T for a weight in its GGUF block format (matvec for one row). done: products
        already computed by a grouped launch ({name: array}); `name` is taken from there when present."""
        if done and name in done:
            return done[name]
        m = self.model
        if x.shape[0] == 1:
            qo.matvec(m.w[name], m.qtype[name], x[0], out=out[0])
        else:
            qo.matmul(m.w[name], m.qtype[name], x, out=out)
        return out

    def _hc(self, X, name: str, S: int, norm: str, xn, post, head: bool = False):
        """One launch (hc_step): hc_post of the previous sub-block (post = its (y, coef), or None), then mHC pre (mix,
        Sinkhorn split, collapse; head=True: the output head's sigmoid collapse) and the block's RMS norm:
        xn = rms_norm(u, norm). Returns (post, comb) coefficients for the next hc_post (None for the head).
        HC_SIDE_SINKHORN: comb comes from hc_sinkhorn_deferred on the side branch; a step with post joins it first."""
        c, m = self.model.config, self.model
        n, D = c.hc_mult, c.n_embd
        rows = n if head else c.hc_mix
        fn = f"{name}fn.weight"
        y, coef_in = post if post is not None else (None, None)
        coef = None if head else self._b("coef", S, n + n * n)
        scale, base, iters = m.v[f"{name}scale.weight"], m.v[f"{name}base.weight"], 0 if head else c.hc_sinkhorn_iters
        if not m.hc_fused:              # the three launches hc_step fuses (DS4CUPY_HC_FUSED=0)
            if post is not None:
                ops.hc_post(X, y, coef_in)
            ns = ops.hc_nsplit(n * D, S)
            part = self._b("hcpart", S, ns, rows + 1)
            ops.hc_mix(X, m.w[fn], ops.dtype_code(m.qtype[fn]), rows, part, ns)
            ops.hc_split_collapse(X, part, ns, rows, scale, base, iters, c.hc_eps, c.rms_eps, head, self._b("u", S, D),
                                  coef, m.v[norm], xn)
            return coef
        ns = ops.hc_step_nsplit(n, D, S)
        deferred = m.hc_side_sinkhorn and not head      # HC_SIDE_SINKHORN: the Sinkhorn on the side branch
        if m.hc_side_sinkhorn and post is not None:     # coef_in's comb comes from the previous step's side branch
            self._join_side_branch()
        sk = self._hc_sk[: S * (rows + 2)] if deferred else None
        ops.hc_step(X, y, coef_in, m.w[fn], ops.dtype_code(m.qtype[fn]), rows, self._b("hcpart", S, ns, rows + 1), ns,
                    self._hc_counter, scale, base, iters, c.hc_eps, c.rms_eps, head, self._b("u", S, D), coef,
                    m.v[norm], xn, sk)
        if deferred:                    # read by the next hc_step only (after its join)
            with self._side_branch():
                ops.hc_sinkhorn_deferred(sk, rows, n, scale, base, iters, c.hc_eps, coef, S)
        return coef

    def _attention(self, xn, S: int, il: int):
        c, m = self.model.config, self.model
        p = f"blk.{il}."
        H, hd, r, fr = c.n_head, c.head_dim, c.n_rot, m.freqs[il]
        done = self._decode_projections(xn, il, query=True) if S == 1 else None
        qa = self._proj(p + "attn_q_a.weight", xn, self._b("qa", S, c.q_lora_rank), done)
        kvp = self._proj(p + "attn_kv.weight", xn, self._b("kvp", S, hd), done)
        ratio = c.ratio(il)
        comp, idx, mode = None, None, 0
        if ratio:                       # side branch: the compressors (they need only xn)
            mode = 2 if ratio == 4 else 1
            with self._side_branch():
                if S == 1:
                    done.update(self._decode_projections(xn, il, query=False))
                comp = self._compress(xn, S, il, done)
                if mode == 2:
                    self._index_rows(xn, S, il, done)
        qr, kvcur = self._b("qr", S, c.q_lora_rank), self._b("kvcur", S, hd)
        ops.rms_norm_qkv(qa, m.v[p + "attn_q_a_norm.weight"], qr, kvp, m.v[p + "attn_kv_a_norm.weight"], kvcur, fr,
                         self.d_pos, r, m.qat, c.rms_eps)
        if mode == 2:                   # the side branch continues with the indexer once qr is ready
            with self._side_branch():
                idx = self._index_select(xn, qr, S, il, done)
        q = self._proj(p + "attn_q_b.weight", qr, self._b("q", S, c.q_dim)).reshape(S, H, hd)
        ops.heads_prep(q, True, r, fr, self.d_pos, ops.QAT_NONE, c.rms_eps)
        if ratio:
            self._join_side_branch()
        att = self._b("att", S, H, hd)
        rows = self.att_rows[il]
        rps = self.att_rps[il] if S == 1 else rows            # sized from ctx: the decode graph fits any depth
        ns = -(-rows // rps)
        if m.prefill_attn_mma and S >= attention_mma.MIN_TOKENS:      # a prefill chunk on tensor cores
            attention_mma.prefill_attention(q, self._ring[il], kvcur, comp, idx, self.d_pos, c.sliding_window, ratio,
                                            mode, m.v[p + "attn_sinks.weight"], r, fr, att)
        else:                     # attention.cu's splits; long key lists' partials on tensor cores (DECODE_ATTN_MMA)
            mma = m.decode_attn_mma and attention_decode_mma.use_for(rows)
            attend = attention_decode_mma.decode_attention if mma else ops.attention
            attend(q, self._ring[il], kvcur, comp, idx, self.d_pos, c.sliding_window, ratio, mode,
                   m.v[p + "attn_sinks.weight"], r, fr, self._b("part_ml", S, H, ns, 2),
                   self._b("part_o", S, H, ns, hd), att, ns, rps)
        ops.kv_ring_store(kvcur, self._ring[il], self.d_pos)

        # grouped output projection: group g = heads [g*H/G, (g+1)*H/G) through rows [g*R, (g+1)*R) of wo_a
        G, R, gin = c.o_groups, c.o_lora_rank, c.o_group_in
        wa = m.w[p + "attn_output_a.weight"]
        qt = m.qtype[p + "attn_output_a.weight"]
        low = self._b("low", S, G * R)
        if S == 1:        # one launch: row block g of wo_a reads the heads of group g
            qo.matvec_xgroup(wa, qt, att.reshape(G, gin), out=low.reshape(G * R))
        else:             # one launch for S >= MMA_MIN_TOKENS (tensor cores, strided, no copies)
            qo.matmul_xgroup(wa, qt, att.reshape(S, G * gin), G, out=low)
        return self._proj(p + "attn_output_b.weight", low, self._b("y", S, c.n_embd))

    def _compress(self, xn, S: int, il: int, done: dict | None):
        """The attention compressor of layer il: its projections of xn and compressor_step (new rows of comp)."""
        c, m = self.model.config, self.model
        p = f"blk.{il}."
        cw, ratio = c.compressor_width(il), c.ratio(il)
        C = self._proj(p + "attn_compressor_kv.weight", xn, self._b("C", S, cw), done)
        Z = self._proj(p + "attn_compressor_gate.weight", xn, self._b("Z", S, cw), done)
        comp = self.kv[(il, "comp")]
        ops.compressor_step(C, Z, m.v[p + "attn_compressor_ape.weight"], self.kv[(il, "comp_kv_state")],
                            self.kv[(il, "comp_score_state")], self.d_pos, ratio,
                            m.v[p + "attn_compressor_norm.weight"], c.n_rot, m.freqs[il],
                            ops.QAT_FP8 if m.qat else ops.QAT_NONE, comp, c.rms_eps)
        return comp

    def _index_rows(self, xn, S: int, il: int, done: dict | None) -> None:
        """The indexer's compressor of layer il (ratio 4): new rows of `index`."""
        c, m = self.model.config, self.model
        p = f"blk.{il}."
        ci = c.indexer_head_dim
        Ci = self._proj(p + "indexer_compressor_kv.weight", xn, self._b("Ci", S, 2 * ci), done)
        Zi = self._proj(p + "indexer_compressor_gate.weight", xn, self._b("Zi", S, 2 * ci), done)
        qat = ops.QAT_HADAMARD_FP4 if m.qat else ops.QAT_NONE
        if m.indexer_fp4:                       # the rows stored packed (QAT on: Hadamard + fp4_sim, then packed)
            ops.compressor_step_fp4(Ci, Zi, m.v[p + "indexer_compressor_ape.weight"],
                                    self.kv[(il, "index_kv_state")], self.kv[(il, "index_score_state")], self.d_pos,
                                    m.v[p + "indexer_compressor_norm.weight"], c.n_rot, m.freqs[il],
                                    self.kv[(il, "index")], c.rms_eps)
            return
        ops.compressor_step(Ci, Zi, m.v[p + "indexer_compressor_ape.weight"], self.kv[(il, "index_kv_state")],
                            self.kv[(il, "index_score_state")], self.d_pos, 4,
                            m.v[p + "indexer_compressor_norm.weight"], c.n_rot, m.freqs[il], qat,
                            self.kv[(il, "index")], c.rms_eps)

    def _index_select(self, xn, qr, S: int, il: int, done: dict | None):
        """The indexer of layer il: its queries from qr, scores against every index row, the top-k row ids."""
        c, m = self.model.config, self.model
        p = f"blk.{il}."
        HI, ci, r, fr = c.indexer_n_head, c.indexer_head_dim, c.n_rot, m.freqs[il]
        qat = ops.QAT_HADAMARD_FP4 if m.qat else ops.QAT_NONE
        qi = self._proj(p + "indexer.attn_q_b.weight", qr, self._b("qi", S, HI * ci)).reshape(S, HI, ci)
        ops.heads_prep(qi, False, r, fr, self.d_pos, qat, c.rms_eps)
        wts = self._proj(p + "indexer.proj.weight", xn, self._b("wts", S, HI), done)
        stride = self.ctx // 4 + 2
        scores = self._b("scores", S, stride)
        nblk = ops.indexer_blocks(self.ctx // 4, S)          # from ctx, never the position (graph capture)
        score = ops.indexer_scores_fp4 if m.indexer_fp4 else ops.indexer_scores
        score(qi, wts, self.kv[(il, "index")], self.d_pos, 4, scores, nblk)
        K = c.indexer_top_k
        topk = self._topk[: S * K].reshape(S, K)
        if self._topk_hist is not None:                      # TOPK_MULTI (chosen when the session was made)
            ops.indexer_topk_multi(scores, self.d_pos, 4, topk, self._topk_hist, self._topk_meta,
                                   ops.topk_multi_blocks(self.ctx // 4, S))
        else:
            ops.indexer_topk(scores, self.d_pos, 4, topk)
        return topk

    def _moe(self, xn, S: int, il: int):
        """Routed experts + the shared expert: y = sum_j w_j expert_j(xn) + shared(xn). The shared expert runs on the
        side branch (it needs only xn), beside the router and the routed gate/up; the routed down then adds onto its
        output (y = shared + routed: the same float32 sum as routed + shared)."""
        c, m = self.model.config, self.model
        p = f"blk.{il}."
        E, k, ff = c.n_expert, c.n_expert_used, c.n_ff_exp
        lim = c.swiglu_clamp[il]
        y = self._b("y", S, c.n_embd)
        eids = self._eids[: S * k].reshape(S, k)
        ew = self._b("ew", S, k)
        grouped = S > 1 and self._moe_prefill.use(il, S)      # prefill: grouped GEMMs, shared expert included
        if c.n_expert_shared and not grouped:
            with self._side_branch():
                sq = m.qtype[p + "ffn_gate_shexp.weight"]
                mids = qo.moe_gate_up(m.w[p + "ffn_gate_shexp.weight"], m.w[p + "ffn_up_shexp.weight"], sq, xn,
                                      clamp=lim, out=self._b("mids", S, 1, ff))
                qo.moe_down(m.w[p + "ffn_down_shexp.weight"], m.qtype[p + "ffn_down_shexp.weight"], mids, out=y)
        rlog = self._proj(p + "ffn_gate_inp.weight", xn, self._b("rlog", S, E))
        tid = m.w.get(p + "ffn_gate_tid2eid.weight") if c.is_hash_layer(il) else None
        ops.router_select(rlog, None if tid is not None else m.v.get(p + "exp_probs_b.bias"), tid, self.d_ids, k,
                          c.expert_weights_norm, c.expert_weights_scale, eids, ew)
        if grouped:
            return self._moe_prefill.run(m.w, m.qtype, il, xn, eids, ew, self._b("mid", S, k, ff),
                                         self._b("mids", S, 1, ff), y)
        gq = m.qtype[p + "ffn_gate_exps.weight"]
        mid = qo.moe_gate_up(m.w[p + "ffn_gate_exps.weight"], m.w[p + "ffn_up_exps.weight"], gq, xn, eids, ew,
                             clamp=lim, out=self._b("mid", S, k, ff))
        if c.n_expert_shared:
            self._join_side_branch()
        qo.moe_down(m.w[p + "ffn_down_exps.weight"], m.qtype[p + "ffn_down_exps.weight"], mid, eids, out=y,
                    accumulate=bool(c.n_expert_shared))
        return y

    def _forward(self, S: int, want_logits: bool, all_logits: bool):
        """One chunk of S tokens (ids in d_ids[:S], positions d_pos[0] ..). Returns device logits [rows, V] or None."""
        c, m = self.model.config, self.model
        n, D = c.hc_mult, c.n_embd
        X = self._b("X", S, n, D)
        emb = "token_embd.weight"
        ops.embed_hc(self.d_ids[:S], m.w[emb], ops.dtype_code(m.qtype[emb]), X)
        xn = self._b("xn", S, D)
        post = None                     # (y, coef) of the sub-block whose hc_post the next hc step applies
        for il in range(c.n_layer):
            p = f"blk.{il}."
            coef = self._hc(X, p + "hc_attn_", S, p + "attn_norm.weight", xn, post)
            post = (self._attention(xn, S, il), coef)
            coef = self._hc(X, p + "hc_ffn_", S, p + "ffn_norm.weight", xn, post)
            post = (self._moe(xn, S, il), coef)
        if m.hc_side_sinkhorn:          # the last deferred Sinkhorn: before the head, the next chunk, a graph's end
            self._join_side_branch()
        logits = None                   # X is the chunk's own (the next chunk starts from its embeddings)
        if want_logits:
            rows = S if all_logits else 1
            if not all_logits:          # the head reads the last row: only it gets the last hc_post
                X, post = X[S - 1:S], (post[0][S - 1:S], post[1][S - 1:S])
            yh = self._b("u", rows, D)
            self._hc(X, "output_hc_", rows, "output_norm.weight", yh, post, head=True)
            if rows == 1:
                logits = self._b("logits", 1, c.n_vocab)
            else:
                import cupy as cp
                logits = cp.empty((rows, c.n_vocab), cp.float32)     # all_logits only (never in decode)
            self._proj("output.weight", yh, logits)
        ops.pos_advance(self.d_pos, S)
        return logits
