"""`ds4cupy bench` command line: arguments, the runs, the report written as JSON (and CSV)."""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
from pathlib import Path

from .measure import (BANDWIDTH_BYTES, WARMUP_PREFILL, EngineTarget, ServerTarget, engine_run, git_commit,
                      gpu_description, server_run)
from .report import format_csv, format_table, summarize

DEFAULT_PP = (512, 2048, 8192)
DEFAULT_TG = (128,)
DEFAULT_DEPTH = (0, 4096, 16384)


def int_list(text: str) -> list[int]:
    """'512,2048,8k' -> [512, 2048, 8192]; a 'pp'/'tg' prefix is accepted on each item."""
    out = []
    for item in str(text).split(","):
        s = item.strip().lower()
        for prefix in ("pp", "tg", "d"):
            if s.startswith(prefix):
                s = s[len(prefix):]
        mult = 1
        if s.endswith("k"):
            s, mult = s[:-1], 1024
        if not s:
            continue
        try:
            v = int(s) * mult
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not an integer") from None
        if v < 0:
            raise argparse.ArgumentTypeError(f"{item!r} is negative")
        out.append(v)
    if not out:
        raise argparse.ArgumentTypeError(f"{text!r}: no values")
    return out



# ---- command line ---------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("-m", "--model", metavar="MODEL", help="a ds4-layout GGUF file")
    src.add_argument("--synthetic", choices=("flash",), default=None,
                     help="DeepSeek-V4-Flash shapes with random valid quantized weights generated on the GPU")
    src.add_argument("--server", metavar="URL", default=None,
                     help="measure through an OpenAI-compatible endpoint with streaming (e.g. http://127.0.0.1:8000)")
    src.add_argument("--show", metavar="REPORT", default=None,
                     help="measure nothing: print a saved report (--json-out) as the console table, or with "
                          "--markdown as BENCHMARKS.md's table")
    p.add_argument("--markdown", action="store_true", help="--show: BENCHMARKS.md's Markdown table")
    p.add_argument("--match", default="", metavar="TEXT", help="--show: only metrics whose key contains TEXT")
    p.add_argument("--experts", choices=("q2", "q4"), default="q2", help="--synthetic: routed expert types (q2)")
    p.add_argument("--layers", type=int, default=None, metavar="N", help="--synthetic: first N of 43 layers")
    p.add_argument("--backend", choices=("auto", "reference", "cuda"), default="auto",
                   help="-m: backend (auto = cuda when a GPU is present)")
    p.add_argument("--ctx", type=int, default=None,
                   help="session context (default: the smallest that holds every test, rounded up to 256)")
    p.add_argument("--runs", type=int, default=3, help="runs; the median and spread are reported (default 3)")
    p.add_argument("--pp", type=int_list, default=list(DEFAULT_PP), metavar="L,..",
                   help="prefill prompt lengths (default 512,2048,8192)")
    p.add_argument("--tg", type=int_list, default=list(DEFAULT_TG), metavar="N,..",
                   help="decode lengths (default 128)")
    p.add_argument("--depth", type=int_list, default=list(DEFAULT_DEPTH), metavar="D,..",
                   help="context depths for decode (default 0,4096,16384)")
    p.add_argument("--depth-fill", choices=("prefill", "random"), default="prefill",
                   help="how decode tests reach their depth: prefill the prompt (default), or random = fill the KV "
                        "state of depth-1 tokens with random rows and prefill one token (cuda backend only; decode "
                        "speed at depths whose prefill would take minutes; TTFT is then not the prompt's)")
    p.add_argument("--decode-path", choices=("top", "logits"), default="top",
                   help="decode steps: top = session.decode_top (the sampler's candidate set, computed on the GPU inside "
                        "the decode graph, ~8 KB copied back; default) or logits = session.decode (the whole logits "
                        "row copied back, argmax on the host). Host time per token (cuda) = wall time of the call and "
                        "the token choice minus the GPU time between CUDA events around the step's kernels")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt token ids and synthetic weights")
    p.add_argument("--page-cache", choices=("drop", "fadvise", "keep"), default="drop",
                   help="before each run: drop = /proc/sys/vm/drop_caches when permitted, else posix_fadvise "
                        "DONTNEED on the model file; fadvise = the file only; keep = leave the cache (default drop)")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up of each run")
    p.add_argument("--bandwidth-bytes", type=int, default=BANDWIDTH_BYTES,
                   help="buffer size of the bandwidth measurement (default 4 GiB, at most a quarter of free memory)")
    p.add_argument("--server-model", default="deepseek-chat", help="--server: model name (default deepseek-chat)")
    p.add_argument("--api-key", default=os.environ.get("DS4CUPY_API_KEY"), help="--server: bearer token")
    p.add_argument("--timeout", type=float, default=600.0, help="--server: seconds per request (default 600)")
    p.add_argument("--commit", default=None, metavar="HASH",
                   help="the commit measured, recorded in the JSON (default: `git rev-parse HEAD` of the checkout; "
                        "give it where .git is absent, e.g. on a machine that received a copy of the tree)")
    p.add_argument("--json-out", default=None, metavar="FILE", help="JSON report (default bench-<timestamp>.json)")
    p.add_argument("--csv", nargs="?", const="-", default=None, metavar="FILE",
                   help="also write the summary as CSV (to stdout when no FILE is given)")


def show(path: str, markdown: bool, match: str) -> int:
    """Print a saved report: its commit, date, runs and engine switches, then the table (report.format_*)."""
    from .report import format_markdown, format_table
    try:
        with open(path) as f:
            report = json.load(f)
        m = report["meta"]
        head = (f"commit {m.get('commit') or '?'}, {m['date']}, {m['settings']['runs']} run(s), "
                f"engine switches {m.get('env') or '{}'}")
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {path!r} is not a readable bench report: {e!r}", file=sys.stderr)
        return 2
    print(head)
    print(format_markdown(report, match) if markdown else format_table(report))
    return 0


def _gpu() -> bool:
    from ...engines import gpu_available
    return gpu_available()


def main(args: argparse.Namespace) -> int:
    if args.show:
        return show(args.show, args.markdown, args.match)
    if not (args.model or args.synthetic or args.server):
        print("error: give -m MODEL, --synthetic flash, --server URL or --show REPORT", file=sys.stderr)
        return 2
    if args.runs < 1:
        print(f"error: --runs must be >= 1, got {args.runs}", file=sys.stderr)
        return 2
    if any(v < 1 for v in args.pp) or any(v < 1 for v in args.tg):
        print("error: --pp and --tg values must be >= 1", file=sys.stderr)
        return 2
    if args.synthetic:
        if not _gpu():
            print("error: --synthetic generates its weights on the GPU; no CUDA device found", file=sys.stderr)
            return 2
        if args.backend == "reference":
            print("error: --synthetic runs on the cuda backend only", file=sys.stderr)
            return 2
    if args.depth_fill == "random" and (args.server or args.backend == "reference" or not _gpu()):
        print("error: --depth-fill random needs the cuda backend (not --server, not --backend reference)",
              file=sys.stderr)
        return 2
    started = _dt.datetime.now(_dt.timezone.utc)
    runs: list[dict] = []
    meta: dict = {"argv": list(sys.argv), "date": started.isoformat(timespec="seconds"), "host": platform.node(),
                  "python": platform.python_version(), "commit": args.commit or git_commit(), "gpu": None,
                  "settings": {"runs": args.runs, "pp": args.pp, "tg": args.tg, "depth": args.depth,
                               "seed": args.seed, "warmup": not args.no_warmup,
                               "depth_fill": args.depth_fill, "decode_path": args.decode_path}}
    from ... import __version__
    meta["ds4cupy"] = __version__
    # the engine switches in effect (DS4CUPY_* environment variables: kernel paths, repacking), so a report says
    # which code paths it measured
    meta["env"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("DS4CUPY_")}
    from ...memory.budget import kv_bytes_per_token

    if args.server:
        meta.update(mode="server", backend="server", server=args.server,
                    model={"name": args.server_model, "path": None, "file_bytes": None, "config": None},
                    kv_bytes_per_token=None, weight_bytes_per_token=None, weight_bytes_per_token_by_class=None)
        target = ServerTarget(args.server, args.server_model, args.api_key, args.timeout)
        try:
            target.calibrate(args.seed)
        except (OSError, RuntimeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        meta["server_calibration"] = {"tokens_per_word": target.tokens_per_word, "overhead_tokens": target.overhead}
        for r in range(args.runs):
            runs.append(server_run(target, args, r))
            print(f"run {r + 1}/{args.runs} done", file=sys.stderr)
    else:
        try:
            target = EngineTarget(args)
        except Exception as e:   # a bad file: say which and stop
            print(f"error: {e}", file=sys.stderr)
            return 1
        need = max([*args.pp, *(max(d, 1) + n + 1 for d in args.depth for n in args.tg), WARMUP_PREFILL + 4])
        ctx = args.ctx or (need + 255) // 256 * 256
        if ctx < need:
            print(f"error: --ctx {ctx} is smaller than the longest test ({need} tokens)", file=sys.stderr)
            return 2
        cfg = target.config
        meta.update(mode="synthetic" if args.synthetic else "engine", backend=target.backend,
                    model={"name": target.name, "path": None if args.synthetic else str(args.model),
                           "file_bytes": target.file_bytes, "experts": args.experts if args.synthetic else None,
                           "config": cfg.as_dict()},
                    ctx=ctx, kv_bytes_per_token=kv_bytes_per_token(cfg),
                    weight_bytes_per_token=int(sum(target.weight_bytes_per_token.values())),
                    weight_bytes_per_token_by_class=target.weight_bytes_per_token)
        meta["gpu"] = gpu_description() if target.on_gpu else None
        for r in range(args.runs):
            runs.append(engine_run(target, args, ctx, r))
            print(f"run {r + 1}/{args.runs} done", file=sys.stderr)
        meta["kv_bytes_per_token"] = kv_bytes_per_token(cfg, target.index_fp4)     # as the loaded engine stores it
    meta["page_cache"] = [r["page_cache"] for r in runs]
    meta["seconds"] = (_dt.datetime.now(_dt.timezone.utc) - started).total_seconds()
    report = {"meta": meta, "runs": runs, "summary": summarize(runs)}
    print(format_table(report))
    out = args.json_out or f"bench-{started.strftime('%Y%m%d-%H%M%S')}.json"
    Path(out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    if args.csv:
        text = format_csv(report)
        if args.csv == "-":
            print(text, end="")
        else:
            Path(args.csv).write_text(text)
            print(f"wrote {args.csv}")
    return 0
