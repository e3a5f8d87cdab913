"""Whole tiny models on the CPU: the reference vs the reference whose prefill MoE (chunks of >= MIN_TOKENS tokens, as
CudaSession's grouped path) does the grouped kernels' arithmetic (tests/moe_grouped_emul.py): integer codes, hi + lo
fp16 activations with a power-of-two scale, sub-block scales and mins applied in float32, float32 accumulation; the
routed k slots summed in order, then the shared expert added (engines/cuda/moe_grouped.py PrefillMoE.run).

    PYTHONPATH=$PWD python scripts/emulate_moe_grouped.py [--variant exact|hi|fp16] [--prompts 2] [--steps 40]

Prints per model and prompt: max|diff| / max|logit| of the prefill logits and over the decode steps, and whether the
greedy tokens agree (the bound of tests/test_gpu_model.py, QAT off: <= 1e-3 at every step, same greedy token).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import moe_grouped_emul as emul  # noqa: E402
from ds4cupy.engines.cuda.moe_grouped import MIN_TOKENS  # noqa: E402
from ds4cupy.engines.reference import F32, ReferenceModel  # noqa: E402

# chunk of the GPU sessions in tests/test_gpu_model.py
CHUNK = 256


class EmulatedModel(ReferenceModel):
    variant = "exact"

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self._splits = {}

    def _split(self, name, e=None):
        key = (name, e)
        sp = self._splits.get(key)
        if sp is None:
            info = self.w.file.info(name)
            raw = np.asarray(self.w.file.raw(name))
            if e is not None:
                raw = raw[e]
            rows, cols = info.shape[-2], info.shape[-1]
            sp = self._splits[key] = emul.split(raw, info.qtype, rows, cols)
        return sp

    def moe(self, x, ids, il):
        S = x.shape[0]
        if S < MIN_TOKENS:
            return super().moe(x, ids, il)
        c, p = self.config, f"blk.{il}."
        sel, wsel = self.route(x, ids, il)
        lim = np.float32(c.swiglu_clamp[il])
        v = self.variant
        yp = np.zeros((S, c.n_expert_used, c.n_embd), F32)
        for e in np.unique(sel):
            rows, slot = np.nonzero(sel == e)
            xe = np.asarray(x[rows], F32)
            g = emul.product(xe, self._split(p + "ffn_gate_exps.weight", e), v)
            u = emul.product(xe, self._split(p + "ffn_up_exps.weight", e), v)
            h = (self._swiglu(g, u, lim) * wsel[rows, slot][:, None]).astype(F32)
            yp[rows, slot] = emul.product(h, self._split(p + "ffn_down_exps.weight", e), v)
        y = yp[:, 0]
        for j in range(1, c.n_expert_used):
            y = (y + yp[:, j]).astype(F32)
        if c.n_expert_shared:
            xs = np.asarray(x, F32)
            g = emul.product(xs, self._split(p + "ffn_gate_shexp.weight"), v)
            u = emul.product(xs, self._split(p + "ffn_up_shexp.weight"), v)
            h = self._swiglu(g, u, lim).astype(F32)
            y = (y + emul.product(h, self._split(p + "ffn_down_shexp.weight"), v)).astype(F32)
        return y


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", default="exact", choices=["exact", "hi", "fp16"])
    ap.add_argument("--models", default="q2,q4")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=600)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    from ds4cupy.format.config import ModelConfig
    from ds4cupy.format.model_file import ModelFile
    from ds4cupy.tools.make_model import tokenizer_fields, write_random_model
    n_vocab, _ = tokenizer_fields(None)
    cfg = ModelConfig.tiny(n_vocab)
    rng = np.random.default_rng(args.seed)
    worst = 0.0
    all_same = True
    with tempfile.TemporaryDirectory() as d:
        for experts in args.models.split(","):
            mf = ModelFile(write_random_model(Path(d) / f"tiny-{experts}.gguf", cfg, experts=experts, seed=11))
            EmulatedModel.variant = args.variant
            ref_m, emu_m = ReferenceModel(mf, qat=False, chunk=CHUNK), EmulatedModel(mf, qat=False, chunk=CHUNK)
            for pi in range(args.prompts):
                ids = rng.integers(0, n_vocab, args.prompt_len)
                ref, emu = ref_m.new_session(4096), emu_m.new_session(4096)
                lr, le = ref.prefill(ids), emu.prefill(ids)
                rels, same = [], True
                for step in range(args.steps + 1):
                    if step:
                        lr, le = ref.decode(tok), emu.decode(tok)
                    rels.append(float(np.max(np.abs(le - lr)) / np.max(np.abs(lr))))
                    same &= int(np.argmax(le)) == int(np.argmax(lr))
                    tok = int(np.argmax(lr))
                r = np.array(rels)
                worst = max(worst, r.max())
                all_same &= same
                print(f"{experts} prompt {pi} ({args.variant}): prefill {r[0]:.2e}, decode median "
                      f"{np.median(r[1:]):.2e} max {r[1:].max():.2e} ({args.steps} steps), greedy tokens "
                      f"{'same' if same else 'DIFFER'}", flush=True)
    print(f"worst max|diff|/max|logit| {worst:.2e}; greedy tokens {'all same' if all_same else 'DIFFER'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
