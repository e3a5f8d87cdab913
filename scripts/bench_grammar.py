"""Grammar-engine cost on DeepSeek-V4's vocabulary: the measurement behind the choice of llguidance (text/constraints.py).

    python scripts/bench_grammar.py [--tokenizer /work/shared/data/tokenizer/tokenizer.json] [--repeats 20]
                                    [--json-out grammar.json]

For each workload (a JSON answer under a nested schema, any JSON object, a DSML tool call) a valid answer is
tokenized with the real tokenizer (129,280 ids); the engine is walked along it token by token, and each step's mask
computation is timed (time.perf_counter around the library call that fills the bitmask), `--repeats` times. Also
timed: building the engine's vocabulary object once, compiling each grammar, and, for llguidance, the whole
per-token cost ds4cupy pays (Constraint.apply: mask + unpacking + applying it to float32 logits on the host).
xgrammar is measured when it is installed (it is not a ds4cupy dependency; the DSML workload has no xgrammar
equivalent here). The machine's load average is printed with the numbers: on a shared machine, read medians.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ds4cupy.text.chat import render_tool_calls  # noqa: E402
from ds4cupy.text.constraints import Constraint, grammar_vocabulary  # noqa: E402
from ds4cupy.text.grammars import json_grammar, tool_calls_grammar  # noqa: E402
from ds4cupy.text.tokenizer import Tokenizer  # noqa: E402

DEFAULT_TOKENIZER = ROOT.parent / "shared" / "data" / "tokenizer" / "tokenizer.json"
SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 1000000},
        "name": {"type": "string", "maxLength": 64},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue", "violet"]}},
        "address": {"type": "object", "properties": {
            "street": {"type": "string"}, "city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            "geo": {"type": "object", "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                    "required": ["lat", "lon"], "additionalProperties": False}},
            "required": ["street", "city", "zip", "geo"], "additionalProperties": False},
        "orders": {"type": "array", "items": {"type": "object", "properties": {
            "sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}, "price": {"type": "number"}},
            "required": ["sku", "qty", "price"], "additionalProperties": False}},
        "active": {"type": "boolean"},
    },
    "required": ["id", "name", "email", "tags", "address", "orders", "active"],
    "additionalProperties": False,
}
DOC = {"id": 48213, "name": "Ada Lovelace", "email": "ada@analytical.engine", "tags": ["red", "violet"],
       "address": {"street": "12 St James's Square", "city": "London", "zip": "10001",
                   "geo": {"lat": 51.5074, "lon": -0.1342}},
       "orders": [{"sku": "BAB-001", "qty": 2, "price": 19.99}, {"sku": "NOTE-G", "qty": 1, "price": 4.5},
                  {"sku": "PUNCH-CARD-XL", "qty": 250, "price": 0.12}],
       "active": True}
TOOL = {"type": "function", "function": {"name": "create_order", "parameters": {
    "type": "object", "properties": {"customer": {"type": "string"}, "items": SCHEMA["properties"]["orders"],
                                     "express": {"type": "boolean"}},
    "required": ["customer", "items"], "additionalProperties": False}}}


def stats(seconds: list[float]) -> dict:
    us = np.array(seconds) * 1e6
    return {"n": int(us.size), "median_us": float(np.median(us)), "mean_us": float(us.mean()),
            "p99_us": float(np.percentile(us, 99)), "max_us": float(us.max())}


def bench_llguidance(tok: Tokenizer, grammar: str, ids: list[int], repeats: int) -> dict:
    import llguidance as llg
    vocab = grammar_vocabulary(tok)
    compile_s, mask_s, apply_s = [], [], []
    bits = np.zeros((tok.n_vocab + 31) // 32, dtype=np.int32)
    logits = np.random.default_rng(0).standard_normal(tok.n_vocab).astype(np.float32)
    for _ in range(repeats):
        t = time.perf_counter()
        m = llg.LLMatcher(vocab, grammar, log_level=0)
        compile_s.append(time.perf_counter() - t)
        for token in ids:
            t = time.perf_counter()
            m.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
            mask_s.append(time.perf_counter() - t)
            assert (bits[token // 32] >> (token % 32)) & 1, f"llguidance refuses token {token}"
            assert m.consume_token(token), m.get_error()
        c = Constraint(tok, grammar)
        for token in ids:
            t = time.perf_counter()
            c.apply(logits)
            apply_s.append(time.perf_counter() - t)
            c.advance(token)
    return {"compile_ms": float(np.median(compile_s) * 1e3), "mask": stats(mask_s), "constraint_apply": stats(apply_s)}


def bench_xgrammar(info, schema: dict | None, ids: list[int], repeats: int) -> dict:
    import xgrammar as xgr
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    compile_s, mask_s = [], []
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    for _ in range(repeats):
        t = time.perf_counter()
        compiled = (compiler.compile_builtin_json_grammar() if schema is None
                    else compiler.compile_json_schema(json.dumps(schema), any_whitespace=True))
        compile_s.append(time.perf_counter() - t)
        m = xgr.GrammarMatcher(compiled)
        for token in ids:
            t = time.perf_counter()
            m.fill_next_token_bitmask(bitmask)
            mask_s.append(time.perf_counter() - t)
            assert m.accept_token(token), f"xgrammar refuses token {token}"
    return {"compile_ms": float(np.median(compile_s) * 1e3), "mask": stats(mask_s)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="a DeepSeek-V4 tokenizer.json")
    p.add_argument("--repeats", type=int, default=20, help="walks of each answer (default 20)")
    p.add_argument("--json-out", default=None, help="write the results as JSON here too")
    args = p.parse_args()

    t = time.perf_counter()
    tok = Tokenizer.from_tokenizer_json(args.tokenizer)
    report: dict = {"tokenizer": args.tokenizer, "n_vocab": tok.n_vocab, "repeats": args.repeats,
                    "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "loadavg_before": os.getloadavg(), "workloads": {}}
    print(f"tokenizer: {tok.n_vocab} ids ({time.perf_counter() - t:.2f} s to build)")
    t = time.perf_counter()
    grammar_vocabulary(tok)
    report["llguidance_vocab_s"] = time.perf_counter() - t
    xgr_info = None
    try:
        import xgrammar as xgr
        t = time.perf_counter()
        xgr_info = xgr.TokenizerInfo(tok.tokens, vocab_type=xgr.VocabType.BYTE_LEVEL, vocab_size=tok.n_vocab,
                                     stop_token_ids=[tok.eos_id])
        report["xgrammar_vocab_s"] = time.perf_counter() - t
        report["xgrammar_version"] = importlib.metadata.version("xgrammar")
    except ImportError:
        print("xgrammar is not installed: llguidance only")
    report["llguidance_version"] = importlib.metadata.version("llguidance")

    doc = json.dumps(DOC)                                  # ", " and ": ": the layout DeepSeek's encoder writes
    workloads = {
        "json_schema": (json_grammar(SCHEMA, strict=True), SCHEMA, doc),
        "json_object": (json_grammar(None), None, doc),
        "dsml_tool_call": (tool_calls_grammar([TOOL], choice="create_order"), False, render_tool_calls(
            [{"name": "create_order", "arguments": json.dumps({"customer": "Ada", "items": DOC["orders"],
                                                               "express": True})}])),
    }
    for name, (grammar, schema, text) in workloads.items():
        ids = tok.encode(text) + [tok.eos_id]
        result = {"tokens": len(ids), "llguidance": bench_llguidance(tok, grammar, ids, args.repeats)}
        if xgr_info is not None and schema is not False:
            result["xgrammar"] = bench_xgrammar(xgr_info, schema, ids, args.repeats)
        report["workloads"][name] = result
    report["loadavg_after"] = os.getloadavg()

    print(f"llguidance {report['llguidance_version']}: vocabulary {report['llguidance_vocab_s']:.2f} s"
          + (f"; xgrammar {report['xgrammar_version']}: vocabulary {report['xgrammar_vocab_s']:.2f} s"
             if xgr_info is not None else ""))
    print(f"{'workload':16} {'engine':22} {'tokens':>6} {'compile ms':>10} {'median us':>10} {'mean us':>9} "
          f"{'p99 us':>9}")
    for name, result in report["workloads"].items():
        rows = [("llguidance mask", result["llguidance"]["compile_ms"], result["llguidance"]["mask"]),
                ("llguidance +apply", None, result["llguidance"]["constraint_apply"])]
        if "xgrammar" in result:
            rows.append(("xgrammar mask", result["xgrammar"]["compile_ms"], result["xgrammar"]["mask"]))
        for engine, compile_ms, s in rows:
            c = "" if compile_ms is None else f"{compile_ms:.2f}"
            print(f"{name:16} {engine:22} {result['tokens']:>6} {c:>10} {s['median_us']:>10.1f} "
                  f"{s['mean_us']:>9.1f} {s['p99_us']:>9.1f}")
    print(f"load average before/after: {report['loadavg_before']} / {report['loadavg_after']} on "
          f"{report['cpus']} CPUs")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
