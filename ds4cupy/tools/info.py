"""Show a model's config, tensor type census, file size, bytes read per decoded token and memory needs at a context.

    ds4cupy info MODEL.gguf [--ctx 32768] [--json]
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

from ..format.model_file import ModelFile


def decode_bytes_per_token(mf: ModelFile) -> dict[str, int]:
    """Weight bytes one decoded token reads, by class: every dense tensor once, the selected experts' rows
    (n_expert_used of n_expert per layer), one embedding row, the head."""
    cfg = mf.config
    out: dict[str, int] = defaultdict(int)
    for name, t in mf.tensors.items():
        if name == "token_embd.weight":
            out["embedding"] += t.nbytes // cfg.n_vocab
        elif name.endswith("_exps.weight"):
            out["routed experts"] += t.nbytes * cfg.n_expert_used // cfg.n_expert
        elif name == "output.weight":
            out["head"] += t.nbytes
        elif name.endswith("tid2eid.weight"):
            out["other"] += cfg.n_expert_used * 4
        elif "shexp" in name:
            out["shared expert"] += t.nbytes
        elif name.startswith("blk.") and ("attn" in name or "indexer" in name):
            out["attention"] += t.nbytes
        else:
            out["other"] += t.nbytes
    return dict(out)


def summarize(mf: ModelFile, ctx: int) -> dict:
    cfg = mf.config
    census: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "bytes": 0})
    for t in mf.tensors.values():
        census[t.qtype.name]["tensors"] += 1
        census[t.qtype.name]["bytes"] += t.nbytes
    per_token = decode_bytes_per_token(mf)
    summary = {
        "file": str(mf.path), "file_bytes": mf.file_size, "name": mf.metadata.get("general.name"),
        "config": cfg.as_dict(), "types": dict(census), "tensor_count": len(mf.tensors),
        "weight_bytes": sum(t.nbytes for t in mf.tensors.values()),
        "decode_bytes_per_token": per_token, "decode_bytes_per_token_total": sum(per_token.values()),
        "ctx": ctx,
    }
    return summary


def file_budget(mf: ModelFile, ctx: int):
    """The memory budget (ds4cupy.memory.budget.Budget) of this file's tensors at context `ctx`, with the KV as the
    CUDA engine stores it by default (QAT on: packed indexer rows while switch INDEXER_FP4 is on)."""
    from ..engines.cuda import switches
    from ..memory.budget import Budget
    return Budget.build(mf.config, [(t.name, t.qtype, t.nbytes) for t in mf.tensors.values()], ctx,
                        index_fp4=switches.enabled("INDEXER_FP4"))


def memory_report(mf: ModelFile, ctx: int, machine: str | None = None) -> str:
    """The budget table plus the placement `auto` would choose on this machine (or a described one)."""
    from ..memory.machine import DESCRIBED, detect
    from ..memory.plan import PlacementError, choose_placement, format_budget
    budget = file_budget(mf, ctx)
    if machine:
        info = DESCRIBED[machine]
    else:
        try:
            info = detect()
        except Exception:          # no GPU / driver here: report the budget alone
            return format_budget(budget) + "\nplacement: no CUDA device found (use --machine to plan for one)"
    try:
        placement = choose_placement(info, budget)
    except PlacementError as e:
        return format_budget(budget, None, info) + f"\nplacement: does not fit: {e}"
    return format_budget(budget, placement, info)


def _gib(n: float) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**28 else f"{n / 2**20:.2f} MiB"


def format_summary(s: dict) -> str:
    c = s["config"]
    ratios = c["compress_ratios"][: c["n_layer"]]
    kinds = {0: "window", 4: "CSA"}
    lines = [
        f"model      {s['name']}  ({s['file']}, {_gib(s['file_bytes'])})",
        f"layers     {c['n_layer']}: " + " ".join(kinds.get(r, f"HCA{r}") for r in ratios),
        f"dims       embd {c['n_embd']}, heads {c['n_head']}x{c['head_dim']} (rope {c['n_rot']}), q_lora "
        f"{c['q_lora_rank']}, out {c['o_groups']}x{c['o_lora_rank']}, vocab {c['n_vocab']}",
        f"moe        {c['n_expert']} experts x {c['n_ff_exp']}, {c['n_expert_used']} used, "
        f"{c['n_hash_layer']} hash layers, shared {c['n_expert_shared']}",
        f"attention  window {c['sliding_window']}, indexer {c['indexer_n_head']}x{c['indexer_head_dim']} "
        f"top-{c['indexer_top_k']}, mHC {c['hc_mult']} streams",
        "types      " + ", ".join(f"{k} {v['tensors']} ({_gib(v['bytes'])})" for k, v in sorted(s["types"].items())),
        f"weights    {_gib(s['weight_bytes'])} in {s['tensor_count']} tensors",
        f"decode     {_gib(s['decode_bytes_per_token_total'])} of weights read per token: "
        + ", ".join(f"{k} {_gib(v)}" for k, v in sorted(s["decode_bytes_per_token"].items())),
    ]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="path to a ds4-layout GGUF file")
    p.add_argument("--ctx", type=int, default=32768, help="context length for the memory estimate (default 32768)")
    p.add_argument("--machine", choices=["gb10", "h100", "h200", "rtx-pro-6000"], default=None,
                   help="plan the memory placement for a described machine instead of the GPU found here")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def main(args: argparse.Namespace) -> int:
    from ..format.model_file import ModelFileError
    try:
        mf = ModelFile(args.model)
    except ModelFileError as e:
        print(f"error: {e}")
        return 1
    if args.ctx <= 0:
        print(f"error: --ctx must be positive, got {args.ctx}")
        return 2
    s = summarize(mf, args.ctx)
    if args.json:
        s["memory"] = file_budget(mf, args.ctx).categories()
        print(json.dumps(s, indent=2, default=str))
    else:
        print(format_summary(s))
        print(memory_report(mf, args.ctx, args.machine))
    return 0
