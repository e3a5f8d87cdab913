"""The DeepSeek-V4 forward pass in NumPy float32: the oracle for the CUDA kernels, and the CPU backend.

Read top to bottom it is docs/model.md §2 (section numbers in the comments): embedding -> per block (mHC pre,
attention with window + compressed rows + indexer, mHC post, mHC pre, MoE, mHC post) -> hc_head -> norm -> head.

A session processes tokens in chunks; every op takes the S new tokens of a chunk plus the per-layer state left by the
tokens before, so decode is simply a chunk of one and prefill(L+1) == prefill(L) + decode(1) holds by construction.
Per-layer state (LayerState): the last `sliding_window` raw KV rows (the window ring, in logical order), the compressed
rows emitted so far, the compressor's partial window, and for CSA layers the indexer's compressed rows and partial
window. QAT simulation (FP8 on KV nope dims, Hadamard + FP4 on indexer q/k, §2.7) is on unless qat=False.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..format.config import ModelConfig
from ..format.model_file import ModelFile
from ..text.candidates import TopCandidates, top_candidates
from .contract import check_decode_batch, check_token_ids
from .numerics import (fp4_sim, fp8_sim, hadamard, hc_split_sinkhorn, rms_norm, rope_apply, rope_cos_sin, rope_freqs,
                       sigmoid, silu, softplus)
from .state import SessionState, chain_of, chain_rows, chain_tokens

F32 = np.float32
F64 = np.float64
MAX_DECODE_BATCH = 8      # sessions one decode_batch call advances at most (the server steps larger batches in groups)


def lin(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x @ w.T accumulated in float64 and rounded once to float32, so a row's result does not depend on how many rows
    are multiplied together (BLAS blocking would otherwise make prefill and decode differ in the last bits, and the
    FP8 / FP4 QAT rounding can amplify such bits)."""
    return (np.asarray(x, F64) @ w.T).astype(F32)


def esum(spec: str, *ops: np.ndarray) -> np.ndarray:
    """einsum in float64, rounded once to float32."""
    return np.einsum(spec, *ops, dtype=F64).astype(F32)


class ReferenceWeights:
    """Dequantized float32 views of a ModelFile's tensors, decoded on first use (experts one at a time)."""

    def __init__(self, mf: ModelFile):
        self.file = mf
        self._dense: dict[str, np.ndarray] = {}
        self._experts: dict[tuple[str, int], np.ndarray] = {}

    def __call__(self, name: str) -> np.ndarray:
        w = self._dense.get(name)
        if w is None:
            t = self.file.info(name)
            w = np.asarray(self.file.raw(name)) if t.qtype.name == "I32" else self.file.dequantize(name).astype(F64)
            self._dense[name] = w
        return w

    def optional(self, name: str) -> np.ndarray | None:
        return self(name) if self.file.has(name) else None

    def expert(self, name: str, e: int) -> np.ndarray:
        key = (name, e)
        w = self._experts.get(key)
        if w is None:
            w = self._experts[key] = self.file.dequantize(name, index=e).astype(F64)
        return w


# ---- §2.5 compressor state -------------------------------------------------------------------------------------------
@dataclass
class CompressorState:
    """Partial window of a compressor: the projections (kv, gate score with ape) of the tokens of the current window,
    and for the overlapping ratio-4 compressor also those of the previous full window."""
    cur_kv: list = field(default_factory=list)
    cur_score: list = field(default_factory=list)
    prev_kv: np.ndarray | None = None
    prev_score: np.ndarray | None = None


@dataclass
class LayerState:
    window_kv: np.ndarray            # [<= sliding_window, head_dim] raw KV rows of the latest positions, oldest first
    comp_kv: np.ndarray              # [n_comp, head_dim] compressed rows (ratio != 0)
    compressor: CompressorState
    index_kv: np.ndarray             # [n_comp, indexer_head_dim] indexer rows (ratio 4)
    index_compressor: CompressorState


@dataclass
class AttnRows:
    """Every weight projection attention makes of its input rows (ReferenceModel.attn_project), row i the token at
    pos[i], whatever sequence it belongs to: q [S, H, hd] (normed, roped), kv [S, hd] (normed, roped, QAT); for
    ratio != 0 the attention compressor's (kv, score) rows; for ratio 4 the indexer compressor's (kv, score) rows, the
    indexer queries qi [S, Hi, di] (roped, QAT) and head weights hw [S, Hi]. take(rows): one sequence's rows."""
    q: np.ndarray | None = None
    kv: np.ndarray | None = None
    comp: tuple | None = None
    index: tuple | None = None
    qi: np.ndarray | None = None
    hw: np.ndarray | None = None

    def take(self, rows: slice) -> "AttnRows":
        def cut(v):
            return None if v is None else tuple(a[rows] for a in v) if isinstance(v, tuple) else v[rows]
        return AttnRows(*(cut(getattr(self, f)) for f in ("q", "kv", "comp", "index", "qi", "hw")))


class ReferenceModel:
    """Weights + per-layer RoPE tables. `new_session()` gives a ReferenceSession."""

    backend = "reference"

    def __init__(self, mf: ModelFile, qat: bool = True, chunk: int = 256):
        self.file = mf
        self.config: ModelConfig = mf.config
        self.w = ReferenceWeights(mf)
        self.qat = qat
        self.chunk = chunk
        c = self.config
        yarn = (c.rope_scaling_factor, c.rope_orig_ctx, c.yarn_beta_fast, c.yarn_beta_slow)
        self.freqs = [rope_freqs(c.n_rot, c.rope_base(il), yarn if c.uses_yarn(il) else None)
                      for il in range(c.n_layer)]

    def new_session(self, ctx: int | None = None) -> "ReferenceSession":
        return ReferenceSession(self, ctx or self.config.n_ctx_train)

    # ---- §2.2 hyper-connections ----------------------------------------------------------------------------------
    def hc_pre(self, X: np.ndarray, site: str, il: int):
        """X [S, n, D] -> (u [S, D], post [S, n], comb [S, n, n])."""
        c, w, p = self.config, self.w, f"blk.{il}.hc_{site}_"
        flat = X.reshape(X.shape[0], -1)
        mix = (np.asarray(flat, F64) @ w(p + "fn.weight").T) * (1.0 / np.sqrt(np.mean(np.square(flat, dtype=np.float64), axis=-1,
                                                                         keepdims=True) + c.rms_eps))
        pre, post, comb = hc_split_sinkhorn(mix, w(p + "scale.weight"), w(p + "base.weight"), c.hc_mult,
                                            c.hc_sinkhorn_iters, c.hc_eps)
        u = esum("sn,snd->sd", pre, X)
        return u, post, comb

    @staticmethod
    def hc_post(y: np.ndarray, X: np.ndarray, post: np.ndarray, comb: np.ndarray) -> np.ndarray:
        """X'[k] = post[k] * y + sum_j comb[j, k] X[j]."""
        return (post[:, :, None].astype(F64) * y[:, None, :] + np.einsum("sjk,sjd->skd", comb, X, dtype=F64)
                ).astype(F32)

    def hc_head(self, X: np.ndarray) -> np.ndarray:
        c, w = self.config, self.w
        flat = X.reshape(X.shape[0], -1)
        m = (np.asarray(flat, F64) @ w("output_hc_fn.weight").T) / np.sqrt(
            np.mean(np.square(flat, dtype=np.float64), axis=-1, keepdims=True) + c.rms_eps)
        pre = sigmoid(m * w("output_hc_scale.weight")[0] + w("output_hc_base.weight")) + c.hc_eps
        return esum("sn,snd->sd", pre, X)

    # ---- §2.5 compressor -----------------------------------------------------------------------------------------
    def compressor_project(self, x: np.ndarray, prefix: str) -> tuple[np.ndarray, np.ndarray]:
        """A compressor's projections of rows x [S, D]: (kv, gate score), each [S, coff*d] (no position term yet)."""
        return lin(x, self.w(prefix + "kv.weight")), lin(x, self.w(prefix + "gate.weight"))

    def compress(self, kv: np.ndarray, score: np.ndarray, pos0: int, st: CompressorState, prefix: str, ratio: int,
                 d: int, il: int, indexer: bool) -> list[np.ndarray]:
        """Feed S consecutive tokens of one sequence (their compressor_project rows, positions pos0..) to a
        compressor; return the rows emitted, in order."""
        w = self.w
        ape = w(prefix + "ape.weight")                           # [ratio, coff*d]
        overlap = ratio == 4
        rows = []
        for i in range(kv.shape[0]):
            p = pos0 + i
            st.cur_kv.append(kv[i])
            st.cur_score.append(score[i] + ape[p % ratio])
            if (p + 1) % ratio:
                continue
            cur_kv, cur_sc = np.stack(st.cur_kv), np.stack(st.cur_score)
            if overlap:
                if st.prev_kv is None:
                    prev_kv = np.zeros((ratio, d), F32)
                    prev_sc = np.full((ratio, d), -np.inf, F32)
                else:
                    prev_kv, prev_sc = st.prev_kv[:, :d], st.prev_score[:, :d]
                slot_kv = np.concatenate([prev_kv, cur_kv[:, d:]])
                slot_sc = np.concatenate([prev_sc, cur_sc[:, d:]])
                st.prev_kv, st.prev_score = cur_kv, cur_sc
            else:
                slot_kv, slot_sc = cur_kv, cur_sc
            st.cur_kv, st.cur_score = [], []
            e = np.exp(slot_sc - slot_sc.max(axis=0, keepdims=True))
            row = (e / e.sum(axis=0, keepdims=True) * slot_kv).sum(axis=0).astype(F32)
            row = rms_norm(row, w(prefix + "norm.weight"), self.config.rms_eps)
            wpos = p + 1 - ratio
            cos, sin = rope_cos_sin(self.freqs[il], np.array([wpos]))
            row = rope_apply(row[None], cos, sin)[0]
            rows.append(self._qat_index(row) if indexer else self._qat_kv(row))
        return rows

    def _qat_kv(self, kv: np.ndarray) -> np.ndarray:
        """FP8 simulation on the nope dims of KV rows (rope dims untouched), §2.7."""
        if not self.qat:
            return kv
        nope = self.config.nope_dim
        kv = kv.copy()
        kv[..., :nope] = fp8_sim(kv[..., :nope], 64)
        return kv

    def _qat_index(self, v: np.ndarray) -> np.ndarray:
        """Hadamard + FP4 simulation of indexer q / k rows, §2.7 (the Hadamard alone would cancel in q.k)."""
        return fp4_sim(hadamard(v), 32) if self.qat else v

    # ---- §2.4 attention ------------------------------------------------------------------------------------------
    def attention(self, x: np.ndarray, pos: np.ndarray, seqs: list[tuple[slice, LayerState]], il: int) -> np.ndarray:
        """x [S, D] (attn_norm output), row i the token at position pos[i]; seqs: (rows, state) of each sequence the
        rows belong to, its rows consecutive positions (a prefill chunk: one sequence; a batched decode step: B
        sequences of one row each) -> [S, D]; updates each sequence's state. The weight projections run once over
        all rows (attn_project, attn_output); each sequence's window, compressed rows and indexer see only its own
        rows and state (attn_core)."""
        a = self.attn_project(x, pos, il)
        o = np.concatenate([self.attn_core(a.take(rows), pos[rows], st, il) for rows, st in seqs])
        return self.attn_output(o, il)

    def attn_project(self, x: np.ndarray, pos: np.ndarray, il: int) -> "AttnRows":
        """Every weight projection attention makes of its rows x [S, D] at positions pos [S] (AttnRows)."""
        c, w, p = self.config, self.w, f"blk.{il}."
        S, H, hd = x.shape[0], c.n_head, c.head_dim
        cos, sin = rope_cos_sin(self.freqs[il], pos)
        qr = rms_norm(lin(x, w(p + "attn_q_a.weight")), w(p + "attn_q_a_norm.weight"), c.rms_eps)
        q = rms_norm(lin(qr, w(p + "attn_q_b.weight")).reshape(S, H, hd), None, c.rms_eps)
        q = rope_apply(q, cos, sin)
        kv = rms_norm(lin(x, w(p + "attn_kv.weight")), w(p + "attn_kv_a_norm.weight"), c.rms_eps)
        kv = self._qat_kv(rope_apply(kv, cos, sin))
        a = AttnRows(q=q, kv=kv)
        ratio = c.ratio(il)
        if ratio:
            a.comp = self.compressor_project(x, p + "attn_compressor_")
        if ratio == 4:
            a.index = self.compressor_project(x, p + "indexer_compressor_")
            a.qi, a.hw = self.indexer_project(x, qr, pos, il)
        return a

    def attn_core(self, a: "AttnRows", pos: np.ndarray, st: LayerState, il: int) -> np.ndarray:
        """One sequence's rows (consecutive positions pos) -> o [S, H, hd]: window + compressed rows (+ indexer) as
        keys, softmax with the sink, output de-roped; st gains the rows' KV."""
        c, w, p = self.config, self.w, f"blk.{il}."
        S, hd, pos0 = a.q.shape[0], c.head_dim, int(pos[0])
        cos, sin = rope_cos_sin(self.freqs[il], pos)
        q = a.q

        # Window: the previous rows and the new ones; query t sees positions t-window+1 .. t.
        n_prev = st.window_kv.shape[0]
        win_kv = np.concatenate([st.window_kv, a.kv])            # positions pos0-n_prev .. pos0+S-1
        win_pos = np.arange(pos0 - n_prev, pos0 + S)
        win_mask = (win_pos[None, :] <= pos[:, None]) & (win_pos[None, :] > pos[:, None] - c.sliding_window)
        st.window_kv = win_kv[-c.sliding_window:]

        keys, mask = win_kv, win_mask
        ratio = c.ratio(il)
        if ratio:
            new_rows = self.compress(*a.comp, pos0, st.compressor, p + "attn_compressor_", ratio, hd, il,
                                     indexer=False)
            if new_rows:
                st.comp_kv = np.concatenate([st.comp_kv, np.stack(new_rows)])
            n_comp = st.comp_kv.shape[0]
            visible = np.arange(n_comp)[None, :] < ((pos + 1) // ratio)[:, None]      # [S, n_comp]
            if ratio == 4:
                visible &= self.indexer_pick(a, pos, st, il, visible)
            keys = np.concatenate([win_kv, st.comp_kv])
            mask = np.concatenate([win_mask, visible], axis=1)

        scores = np.einsum("shd,kd->shk", q, keys, dtype=F64) * (hd ** -0.5)
        scores = np.where(mask[:, None, :], scores, -np.inf)
        sink = w(p + "attn_sinks.weight")                         # [H]
        m = np.maximum(scores.max(axis=-1), sink[None, :])        # [S, H]
        e = np.exp(scores - m[:, :, None])
        denom = e.sum(axis=-1) + np.exp(sink[None, :] - m)
        o = (np.einsum("shk,kd->shd", e, keys, dtype=F64) / denom[:, :, None]).astype(F32)
        o = rope_apply(o, cos, sin, inverse=True)
        return o

    def attn_output(self, o: np.ndarray, il: int) -> np.ndarray:
        """o [S, H, hd] -> [S, D]: the grouped low-rank output projection (wo_a per group, then wo_b)."""
        c, w, p = self.config, self.w, f"blk.{il}."
        S, G, R = o.shape[0], c.o_groups, c.o_lora_rank
        wo_a = w(p + "attn_output_a.weight").reshape(G, R, c.o_group_in)
        low = esum("sgi,gri->sgr", o.reshape(S, G, c.o_group_in), wo_a).reshape(S, G * R)
        return lin(low, w(p + "attn_output_b.weight"))

    # ---- §2.6 lightning indexer ----------------------------------------------------------------------------------
    def indexer_project(self, x: np.ndarray, qr: np.ndarray, pos: np.ndarray, il: int
                        ) -> tuple[np.ndarray, np.ndarray]:
        """The indexer's queries [S, Hi, di] (roped, QAT) and head weights [S, Hi] of rows x / qr at positions pos."""
        c, w, p = self.config, self.w, f"blk.{il}."
        S, Hi, di = x.shape[0], c.indexer_n_head, c.indexer_head_dim
        cos, sin = rope_cos_sin(self.freqs[il], pos)
        qi = rope_apply(lin(qr, w(p + "indexer.attn_q_b.weight")).reshape(S, Hi, di), cos, sin)
        qi = self._qat_index(qi)
        hw = lin(x, w(p + "indexer.proj.weight")) * F32(di ** -0.5) * F32(Hi ** -0.5)   # [S, Hi]
        return qi, hw

    def indexer_select(self, x, qr, pos, st: LayerState, il: int, visible: np.ndarray) -> np.ndarray:
        """Boolean [S, n_comp]: the indexer's top-k compressed rows for each query (among the visible ones), for rows
        x / qr of one sequence at consecutive positions pos (projections and pick in one call)."""
        a = AttnRows(index=self.compressor_project(x, f"blk.{il}.indexer_compressor_"))
        a.qi, a.hw = self.indexer_project(x, qr, pos, il)
        return self.indexer_pick(a, pos, st, il, visible)

    def indexer_pick(self, a: "AttnRows", pos: np.ndarray, st: LayerState, il: int, visible: np.ndarray
                     ) -> np.ndarray:
        """indexer_select from the rows' projections (AttnRows index, qi, hw); st gains the indexer rows."""
        c, p = self.config, f"blk.{il}."
        S, di = a.qi.shape[0], c.indexer_head_dim
        rows = self.compress(*a.index, int(pos[0]), st.index_compressor, p + "indexer_compressor_", 4, di, il,
                             indexer=True)
        if rows:
            st.index_kv = np.concatenate([st.index_kv, np.stack(rows)])
        n_comp = visible.shape[1]
        assert st.index_kv.shape[0] == n_comp
        qi, hw = a.qi, a.hw
        score = np.einsum("sh,shc->sc", hw, np.maximum(np.einsum("shd,cd->shc", qi, st.index_kv, dtype=F64), 0.0),
                          dtype=F64)
        score = np.where(visible, score, -np.inf)
        sel = np.zeros_like(visible)
        k = c.indexer_top_k
        for t in range(S):
            nv = int(visible[t].sum())
            if nv <= k:
                sel[t] = visible[t]
            else:
                top = np.argsort(-score[t], kind="stable")[:k]
                sel[t, top] = True
        return sel

    # ---- §2.8 MoE ------------------------------------------------------------------------------------------------
    def route(self, x: np.ndarray, ids: np.ndarray, il: int) -> tuple[np.ndarray, np.ndarray]:
        """The router of layer il: (selected expert ids int64 [S, k], their float32 weights [S, k])."""
        c, w, p = self.config, self.w, f"blk.{il}."
        logits = np.asarray(x, F64) @ w(p + "ffn_gate_inp.weight").T
        sc = np.sqrt(softplus(logits)).astype(np.float64)                     # [S, E]
        if c.is_hash_layer(il):
            sel = w(p + "ffn_gate_tid2eid.weight")[ids].astype(np.int64)     # [S, k]
        else:
            bias = w.optional(p + "exp_probs_b.bias")
            biased = sc + (bias if bias is not None else 0.0)
            sel = np.argsort(-biased, axis=-1, kind="stable")[:, : c.n_expert_used]
        wsel = np.take_along_axis(sc, sel, axis=-1)
        if c.expert_weights_norm:
            wsel = wsel / wsel.sum(axis=-1, keepdims=True)
        return sel, (wsel * c.expert_weights_scale).astype(F32)

    def moe(self, x: np.ndarray, ids: np.ndarray, il: int) -> np.ndarray:
        c, w, p = self.config, self.w, f"blk.{il}."
        S = x.shape[0]
        sel, wsel = self.route(x, ids, il)
        lim = c.swiglu_clamp[il]
        y = np.zeros((S, c.n_embd), np.float64)
        for e in np.unique(sel):
            rows, slot = np.nonzero(sel == e)
            xe = x[rows]
            h = self._swiglu(lin(xe, w.expert(p + "ffn_gate_exps.weight", e)),
                             lin(xe, w.expert(p + "ffn_up_exps.weight", e)), lim) * wsel[rows, slot][:, None]
            np.add.at(y, rows, np.asarray(h, F64) @ w.expert(p + "ffn_down_exps.weight", e).T)
        if c.n_expert_shared:
            h = self._swiglu(lin(x, w(p + "ffn_gate_shexp.weight")), lin(x, w(p + "ffn_up_shexp.weight")), lim)
            y += np.asarray(h, F64) @ w(p + "ffn_down_shexp.weight").T
        return y.astype(F32)

    @staticmethod
    def _swiglu(g: np.ndarray, u: np.ndarray, lim: float) -> np.ndarray:
        return silu(np.minimum(g, lim)) * np.clip(u, -lim, lim)

    # ---- §2.1 top level ------------------------------------------------------------------------------------------
    def new_layer_state(self, il: int) -> LayerState:
        c = self.config
        return LayerState(window_kv=np.zeros((0, c.head_dim), F32), comp_kv=np.zeros((0, c.head_dim), F32),
                          compressor=CompressorState(), index_kv=np.zeros((0, c.indexer_head_dim), F32),
                          index_compressor=CompressorState())

    def forward_chunk(self, ids: np.ndarray, pos0: int, states: list[LayerState], all_logits: bool) -> np.ndarray:
        """S consecutive tokens of one sequence at positions pos0.. -> logits [S, vocab] (all_logits) or [1, vocab]."""
        return self.forward_rows(ids, np.arange(pos0, pos0 + ids.size), [(slice(None), states)], all_logits)

    def forward_batch(self, ids: np.ndarray, pos: np.ndarray, states: list[list[LayerState]]) -> np.ndarray:
        """One token of each of B sequences (ids [B] at positions pos [B], states[b] the layer states of sequence b)
        -> logits [B, vocab]: the batched decode step."""
        return self.forward_rows(ids, pos, [(slice(b, b + 1), st) for b, st in enumerate(states)], True)

    def forward_rows(self, ids: np.ndarray, pos: np.ndarray, seqs: list[tuple[slice, list[LayerState]]],
                     all_logits: bool) -> np.ndarray:
        """Rows of tokens (ids [S] at positions pos [S]); seqs: (rows, layer states) of each sequence, its rows
        consecutive positions. Every op but attention's per-sequence core works row by row over all S rows."""
        c, w = self.config, self.w
        h = w("token_embd.weight")[ids].astype(F32)                            # [S, D]
        X = np.repeat(h[:, None, :], c.hc_mult, axis=1)                         # [S, n, D]
        for il in range(c.n_layer):
            p = f"blk.{il}."
            u, post, comb = self.hc_pre(X, "attn", il)
            y = self.attention(rms_norm(u, w(p + "attn_norm.weight"), c.rms_eps), pos,
                               [(rows, states[il]) for rows, states in seqs], il)
            X = self.hc_post(y, X, post, comb)
            u, post, comb = self.hc_pre(X, "ffn", il)
            y = self.moe(rms_norm(u, w(p + "ffn_norm.weight"), c.rms_eps), ids, il)
            X = self.hc_post(y, X, post, comb)
        if not all_logits:
            X = X[-1:]
        y = rms_norm(self.hc_head(X), w("output_norm.weight"), c.rms_eps)
        return lin(y, w("output.weight"))

    # ---- batched decode (engines/contract.py) --------------------------------------------------------------------
    max_decode_batch = MAX_DECODE_BATCH

    def decode_batch(self, sessions: list["ReferenceSession"], token_ids, temperatures=None) -> list:
        """One token each for B sessions of this model, each at its own position with its own state (the contract:
        entry b is what sessions[b].decode(token_ids[b]) gives, or decode_top(token_ids[b], temperatures[b]) where
        that temperature is not None). Everything is checked before any session changes."""
        ids = check_decode_batch(self, sessions, token_ids, temperatures, self.max_decode_batch, self.config.n_vocab)
        logits = self.forward_batch(ids, np.array([s.n_tokens for s in sessions]), [s.states for s in sessions])
        for s, t in zip(sessions, ids):
            s.tokens.append(int(t))
        out = []
        for b, row in enumerate(logits):
            t = None if temperatures is None else temperatures[b]
            out.append(row if t is None else top_candidates(row, t, fetch_logits=lambda row=row: row))
        return out


class ReferenceSession:
    """One sequence on the reference backend (the Session contract in docs/ARCHITECTURE.md)."""

    def __init__(self, model: ReferenceModel, ctx: int):
        self.model = model
        self.ctx = ctx
        self.prefilled_tokens = 0          # tokens consumed by prefill() since the session was made (not decode)
        self.reset()

    def reset(self) -> None:
        self.states = [self.model.new_layer_state(il) for il in range(self.model.config.n_layer)]
        self.tokens: list[int] = []

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def prefill(self, ids, all_logits: bool = False) -> np.ndarray:
        ids = check_token_ids(ids, self.model.config.n_vocab, self.n_tokens, self.ctx)
        self.prefilled_tokens += int(ids.size)
        return self._forward(ids, all_logits)

    def decode(self, token_id: int) -> np.ndarray:
        return self._forward(check_token_ids([token_id], self.model.config.n_vocab, self.n_tokens, self.ctx), False)

    candidates_on_device = False    # contract: decode_top takes the candidates of the row on the host (NumPy)

    def decode_top(self, token_id: int, temperature: float) -> TopCandidates:
        """decode(token_id), handed back as the sampler's candidate set (the contract; computed with NumPy)."""
        logits = self.decode(token_id)
        return top_candidates(logits, temperature, fetch_logits=lambda: logits)

    def _forward(self, ids: np.ndarray, all_logits: bool) -> np.ndarray:
        out = []
        for s in range(0, ids.size, self.model.chunk):
            chunk = ids[s: s + self.model.chunk]
            last = s + chunk.size == ids.size
            if all_logits or last:
                out.append(self.model.forward_chunk(chunk, self.n_tokens, self.states, all_logits))
            else:
                self.model.forward_chunk(chunk, self.n_tokens, self.states, False)
            self.tokens.extend(int(t) for t in chunk)
        return np.concatenate(out) if all_logits else out[-1][-1]

    # ---- state (ds4cupy.engines.state) -------------------------------------------------------------------------
    # per layer: "{il}.comp" / "{il}.index" append-only rows; "{il}.window" and the compressors' partial windows
    # "{il}.comp.cur_kv|cur_score|prev_kv|prev_score" (and "{il}.index.*") fixed. The session never writes into an
    # array in place (every update makes a new one), so restored arrays may be shared with the stored state.
    def snapshot(self, since: int = 0) -> SessionState:
        """The state tokens [since, n_tokens) added (since=0: all of it); see ds4cupy.engines.state."""
        if not 0 <= since <= self.n_tokens:
            raise ValueError(f"snapshot since={since}: the session holds {self.n_tokens} tokens")
        c = self.model.config
        rows, fixed = {}, {}
        for il, st in enumerate(self.states):
            fixed[f"{il}.window"] = st.window_kv.copy()     # a view into the last chunk's rows
            ratio = c.ratio(il)
            if not ratio:
                continue
            rows[f"{il}.comp"] = (since // ratio, st.comp_kv[since // ratio:].copy())
            _compressor_arrays(fixed, f"{il}.comp", st.compressor)
            if ratio == 4:
                rows[f"{il}.index"] = (since // 4, st.index_kv[since // 4:].copy())
                _compressor_arrays(fixed, f"{il}.index", st.index_compressor)
        return SessionState(since, self.tokens[since:], rows, fixed)

    def restore(self, state) -> None:
        """Become the session that consumed the chain's tokens: a SessionState from snapshot(), or a list [complete,
        delta, ...] of them (ds4cupy.engines.state.chain_of)."""
        chain = chain_of(state)
        tokens = chain_tokens(chain)
        if len(tokens) > self.ctx:
            raise ValueError(f"the state holds {len(tokens)} tokens, the session context is {self.ctx}")
        c, last = self.model.config, chain[-1].fixed
        states = []
        for il in range(c.n_layer):
            st = self.model.new_layer_state(il)
            st.window_kv = last[f"{il}.window"]
            ratio = c.ratio(il)
            if ratio:
                st.comp_kv = _joined(chain_rows(chain, f"{il}.comp", len(tokens) // ratio), st.comp_kv)
                st.compressor = _compressor_state(last, f"{il}.comp")
                if ratio == 4:
                    st.index_kv = _joined(chain_rows(chain, f"{il}.index", len(tokens) // 4), st.index_kv)
                    st.index_compressor = _compressor_state(last, f"{il}.index")
            states.append(st)
        self.states, self.tokens = states, tokens


def _compressor_arrays(out: dict, prefix: str, cs: CompressorState) -> None:
    """A compressor's partial window as arrays (an empty window as a [0, 0] array; no previous window: no key)."""
    for name in ("cur_kv", "cur_score"):
        rows = getattr(cs, name)
        out[f"{prefix}.{name}"] = np.stack(rows) if rows else np.zeros((0, 0), F32)
    for name in ("prev_kv", "prev_score"):
        if getattr(cs, name) is not None:
            out[f"{prefix}.{name}"] = getattr(cs, name)


def _compressor_state(fixed: dict, prefix: str) -> CompressorState:
    return CompressorState(cur_kv=list(fixed[f"{prefix}.cur_kv"]), cur_score=list(fixed[f"{prefix}.cur_score"]),
                           prev_kv=fixed.get(f"{prefix}.prev_kv"), prev_score=fixed.get(f"{prefix}.prev_score"))


def _joined(pieces: list, empty: np.ndarray) -> np.ndarray:
    return np.concatenate([a for _, a in pieces]) if pieces else empty
