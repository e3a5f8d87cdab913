"""Measure model load, prefill and decode speed: N runs, median and spread, a table, JSON and CSV.

    ds4cupy bench -m MODEL.gguf [--pp 512,2048,8192] [--tg 128] [--depth 0,4096,16384] [--runs 3]
    ds4cupy bench --synthetic flash [--experts q2|q4] [--layers N]      # random weights made on the GPU, no file
    ds4cupy bench --server http://127.0.0.1:8000 [...]                  # the same through the OpenAI endpoint

Method (BENCHMARKS.md has the long form):
- Each run: drop the model file's page cache (/proc/sys/vm/drop_caches when permitted, else posix_fadvise
  DONTNEED on the file; a warning when neither works), load the model (timed), one untimed warm-up (8-token prefill,
  2 decode steps: kernel modules load on first use), then the tests on one session (reset between tests).
- Clock: time.perf_counter on the host, after cudaDeviceSynchronize when on the GPU.
- Prefill ppL: prefill of L fixed token ids (seeded, control tokens excluded), then the greedy first token:
  tokens/s = L / time; TTFT = the same time.
- Decode tgN at depth D: prefill of max(D, 1) tokens (its time is the TTFT at that depth), then N decode steps, each
  feeding the greedy token (argmax of the logits, EOS excluded) of the step before. With t0 the end of the prefill and
  t1..tN the ends of the steps: steady state = (N-1) / (tN - t1) (llama-benchy), average = N / (tN - t0) (ds4-bench:
  every decode step counted, the first too).
- Bytes read per decoded token: weights (info.decode_bytes_per_token: dense tensors, n_expert_used of n_expert
  experts per layer, one embedding row, the head) + KV rows attention reads at that position (window ring, compressed
  rows of HCA layers, the indexer's rows and the top-k selected rows of CSA layers, compressor state), averaged over
  the decoded positions. Achieved GB/s = bytes per token x steady-state tokens/s; the roofline fraction divides it by
  the device's read bandwidth measured in the same run (memory.arena.stream_read over a large buffer).
- Peak GPU memory: the largest rise of (total - free) of cudaMemGetInfo over the run, from before the model loads.
- Server mode: streaming chat completions (model alias deepseek-chat: no thinking, temperature 0); TTFT = arrival of
  the first token's chunk; decode rates from chunk arrival times with the same formulas (the first chunk's token comes
  from the prefill, max_tokens = N + 1); prompt sizes from the endpoint's usage (prompt_tokens - cached_tokens).
Every number printed is measured in the run that prints it.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import http.client
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import urllib.parse
import warnings
from pathlib import Path

import numpy as np

DEFAULT_PP = (512, 2048, 8192)
DEFAULT_TG = (128,)
DEFAULT_DEPTH = (0, 4096, 16384)
WARMUP_PREFILL = 8
WARMUP_DECODE = 2
BANDWIDTH_BYTES = 4 << 30


# ---- small helpers ------------------------------------------------------------------------------------------------
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


def _cupy():
    import cupy
    return cupy


def gpu_sync(on_gpu: bool) -> None:
    if on_gpu:
        _cupy().cuda.runtime.deviceSynchronize()


def gpu_used_bytes() -> int | None:
    try:
        free, total = _cupy().cuda.runtime.memGetInfo()
        return int(total - free)
    except Exception:
        return None


def gpu_description() -> dict | None:
    try:
        cp = _cupy()
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        return {"name": name, "total_bytes": int(props["totalGlobalMem"]),
                "compute_capability": f"{props['major']}.{props['minor']}",
                "driver_version": int(cp.cuda.runtime.driverGetVersion()),
                "runtime_version": int(cp.cuda.runtime.runtimeGetVersion()), "cupy": cp.__version__}
    except Exception:
        return None


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except Exception:
        return None


def peak_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) * (1 if sys.platform == "darwin" else 1024)


def drop_page_cache(path: str | os.PathLike | None, how: str = "drop") -> tuple[str, str | None]:
    """Drop the model file's pages from the page cache. how: drop (/proc/sys/vm/drop_caches, else fadvise) | fadvise
    (posix_fadvise DONTNEED on the file only) | keep. Returns (method, warning): method drop_caches | fadvise | kept |
    none (no file) | failed."""
    if path is None:
        return "none", None
    if how == "keep":
        return "kept", None
    if how == "drop":
        try:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1\n")
            return "drop_caches", None
        except OSError:
            pass
    if hasattr(os, "posix_fadvise"):
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            return "fadvise", None
        except OSError as e:
            return "failed", f"could not drop the page cache of {path}: {e} (load times include cached reads)"
    return "failed", "could not drop the page cache: /proc/sys/vm/drop_caches not writable and no posix_fadvise " \
                     "(load times include cached reads)"


def kv_read_bytes(cfg, pos: int) -> int:
    """Bytes of KV state a decode step at position `pos` (0-based; pos tokens before it) reads (float32 cache):
    window ring rows, compressed rows (all on HCA layers; on CSA layers the indexer's rows plus the top-k selected
    compressed rows), compressor state."""
    n = pos + 1
    hd, idim = cfg.head_dim, cfg.indexer_head_dim
    total = 0
    for il in range(cfg.n_layer):
        total += min(n, cfg.sliding_window) * hd * 4
        r = cfg.ratio(il)
        if not r:
            continue
        n_comp = n // r
        coff = 2 if r == 4 else 1
        total += 2 * (coff * r) * (coff * hd) * 4
        if r == 4:
            total += n_comp * idim * 4 + min(cfg.indexer_top_k, n_comp) * hd * 4
            total += 2 * 8 * 2 * idim * 4
        else:
            total += n_comp * hd * 4
    return total


def measure_bandwidth(nbytes: int = BANDWIDTH_BYTES) -> dict | None:
    """The device's streaming read bandwidth (memory.arena.stream_read) over a buffer of up to `nbytes` (at most a
    quarter of the free memory). None without a GPU."""
    try:
        cp = _cupy()
        free, _ = cp.cuda.runtime.memGetInfo()
    except Exception:
        return None
    from .memory.arena import stream_read
    n = int(min(nbytes, free // 4)) // 4096 * 4096
    if n < (64 << 20):
        return {"gbps": None, "buffer_bytes": n, "note": "not enough free memory for a bandwidth buffer"}
    buf = cp.empty(n, dtype=cp.uint8)
    buf.fill(1)
    gbps, _, first_ms = stream_read(buf, reps=10)
    del buf
    cp.get_default_memory_pool().free_all_blocks()
    return {"gbps": float(gbps), "buffer_bytes": n, "first_pass_ms": float(first_ms), "reps": 10}


class MemTracker:
    """Peak rise of the device's used memory (cudaMemGetInfo) over a baseline taken before the model loads."""

    def __init__(self, on_gpu: bool):
        self.on_gpu = on_gpu
        self.base = gpu_used_bytes() if on_gpu else None
        self.peak = 0

    def sample(self) -> None:
        if self.base is None:
            return
        used = gpu_used_bytes()
        if used is not None:
            self.peak = max(self.peak, used - self.base)

    @property
    def value(self) -> int | None:
        return None if self.base is None else int(self.peak)


# ---- the model under test -------------------------------------------------------------------------------------------
class EngineTarget:
    """Loads the model for one run: a GGUF file (ds4cupy.load) or a synthetic model (ds4cupy.synthetic)."""

    def __init__(self, args):
        self.args = args
        self.synthetic = args.synthetic
        self.path = None if self.synthetic else args.model
        if self.synthetic:
            from .synthetic import synthetic_config, synthetic_nbytes
            self.config = synthetic_config(self.synthetic, args.layers)
            self.tensor_bytes = synthetic_nbytes(self.config, args.experts)
            self.backend = "cuda"
            self.file_bytes = None
            self.name = f"{self.config.name} (synthetic, random weights, {args.experts} experts)"
        else:
            from .model_file import ModelFile
            with ModelFile(args.model) as mf:
                self.config = mf.config
                self.tensor_bytes = {n: t.nbytes for n, t in mf.tensors.items()}
                self.name = str(mf.metadata.get("general.name") or mf.path.stem)
                self.file_bytes = mf.file_size
            if args.backend == "auto":
                from .engine import gpu_available
                self.backend = "cuda" if gpu_available() else "reference"
            else:
                self.backend = args.backend
        from .synthetic import decode_bytes_per_token
        self.weight_bytes_per_token = decode_bytes_per_token(self.config, self.tensor_bytes)
        self.on_gpu = self.backend == "cuda"

    def load(self, ctx: int):
        a = self.args
        if self.synthetic:
            from .synthetic import load_synthetic
            return load_synthetic(self.synthetic, a.layers, a.experts, seed=a.seed, ctx=ctx,
                                  progress=sys.stderr.isatty())
        from .engine import load
        return load(self.path, backend=self.backend, progress=False)


def greedy(logits: np.ndarray, exclude: int | None) -> int:
    if exclude is not None and 0 <= exclude < logits.shape[-1]:
        logits = logits.copy()
        logits[exclude] = -np.inf
    return int(np.argmax(logits))


def bench_ids(cfg, tokenizer, n: int, seed: int) -> np.ndarray:
    """n fixed token ids (seeded), drawn from the non-control tokens when a tokenizer is known."""
    rng = np.random.default_rng(seed)
    if tokenizer is not None:
        pool = np.array([i for i in range(min(cfg.n_vocab, tokenizer.n_vocab)) if not tokenizer.is_control(i)])
        if pool.size:
            return pool[rng.integers(0, pool.size, n)]
    return rng.integers(0, cfg.n_vocab, n)


def engine_run(target: EngineTarget, args, ctx: int, run: int) -> dict:
    on_gpu = target.on_gpu
    out: dict = {"run": run}
    cache, warn = drop_page_cache(target.path, args.page_cache)
    out["page_cache"] = cache
    if warn:
        warnings.warn(warn, RuntimeWarning, stacklevel=2)
    out["bandwidth"] = measure_bandwidth(args.bandwidth_bytes) if on_gpu else None
    mem = MemTracker(on_gpu)
    gpu_sync(on_gpu)
    t0 = time.perf_counter()
    model = target.load(ctx)
    gpu_sync(on_gpu)
    out["load_s"] = time.perf_counter() - t0
    mem.sample()
    try:
        tok = getattr(model, "tokenizer", None) if not target.synthetic else None
        eos = getattr(tok, "eos_id", None) if tok is not None else None
        need = max([*args.pp, *(max(d, 1) + n + 1 for d in args.depth for n in args.tg), WARMUP_PREFILL + 4])
        ids = bench_ids(target.config, tok, need, args.seed)
        session = model.new_session(ctx)
        mem.sample()
        t0 = time.perf_counter()
        if not args.no_warmup:
            lg = session.prefill(ids[:WARMUP_PREFILL])
            for _ in range(WARMUP_DECODE):
                lg = session.decode(greedy(lg, eos))
            gpu_sync(on_gpu)
        out["warmup_s"] = time.perf_counter() - t0 if not args.no_warmup else None
        mem.sample()

        out["prefill"] = []
        for pp in args.pp:
            session.reset()
            gpu_sync(on_gpu)
            t0 = time.perf_counter()
            lg = session.prefill(ids[:pp])
            first = greedy(lg, eos)
            gpu_sync(on_gpu)
            dt = time.perf_counter() - t0
            mem.sample()
            out["prefill"].append({"pp": pp, "tokens": pp, "seconds": dt, "tps": pp / dt, "ttft_s": dt,
                                   "first_token": first})

        out["decode"] = []
        for depth in args.depth:
            for n in args.tg:
                session.reset()
                prompt = ids[:max(depth, 1)]
                gpu_sync(on_gpu)
                t_req = time.perf_counter()
                lg = session.prefill(prompt)
                t = greedy(lg, eos)
                gpu_sync(on_gpu)
                t_first = time.perf_counter()
                stamps = []
                for _ in range(n):
                    lg = session.decode(t)
                    t = greedy(lg, eos)
                    gpu_sync(on_gpu)
                    stamps.append(time.perf_counter())
                mem.sample()
                out["decode"].append(decode_record(target, depth, len(prompt), n, t_req, t_first, stamps,
                                                   out["bandwidth"]))
        del session
    finally:
        model.close()
        del model
        gc.collect()
        if on_gpu:
            try:
                _cupy().get_default_memory_pool().free_all_blocks()
            except Exception:
                pass
    out["peak_gpu_mem_bytes"] = mem.value
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out


def decode_record(target, depth: int, prompt_tokens: int, n: int, t_req: float, t_first: float,
                  stamps: list[float], bandwidth: dict | None) -> dict:
    """One tgN@depth result from the end-of-prefill time and the end time of each decode step."""
    cfg = target.config
    steady = (n - 1) / (stamps[-1] - stamps[0]) if n >= 2 and stamps[-1] > stamps[0] else None
    avg = n / (stamps[-1] - t_first) if n >= 1 else None
    w = int(sum(target.weight_bytes_per_token.values()))
    kv = float(np.mean([kv_read_bytes(cfg, prompt_tokens + i) for i in range(n)])) if n else 0.0
    per = w + kv
    rate = steady if steady is not None else avg
    gbps = per * rate / 1e9 if rate else None
    bw = (bandwidth or {}).get("gbps")
    return {"depth": depth, "prompt_tokens": prompt_tokens, "tokens": n, "ttft_s": t_first - t_req,
            "seconds": stamps[-1] - t_first if stamps else 0.0, "steady_tps": steady, "avg_tps": avg,
            "weight_bytes_per_token": w, "kv_bytes_read_per_token": kv, "bytes_per_token": per,
            "gbps": gbps, "roofline_fraction": (gbps / bw) if (gbps and bw) else None}


# ---- server mode ----------------------------------------------------------------------------------------------------
WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact river stone light water garden music paper window story "
         "market table city mountain winter summer bridge forest letter question answer morning evening").split()


class ServerTarget:
    """Streaming chat completions against an OpenAI-compatible endpoint."""

    def __init__(self, url: str, model: str, api_key: str | None, timeout: float):
        u = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
        self.scheme, self.host, self.port = u.scheme, u.hostname, u.port
        self.base = u.path.rstrip("/")
        if not self.base.endswith("/v1"):
            self.base += "/v1"
        self.url, self.model, self.api_key, self.timeout = url, model, api_key, timeout
        self.tokens_per_word = None
        self.overhead = None

    def _conn(self):
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.timeout)

    def stream(self, text: str, max_tokens: int) -> dict:
        """One streaming request: {t_req, stamps (arrival of chunks that carry a token's text), t_end, usage}."""
        body = {"model": self.model, "messages": [{"role": "user", "content": text}], "stream": True,
                "stream_options": {"include_usage": True}, "max_tokens": max_tokens, "temperature": 0}
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        conn = self._conn()
        try:
            t_req = time.perf_counter()
            conn.request("POST", self.base + "/chat/completions", json.dumps(body), headers)
            resp = conn.getresponse()
            if resp.status != 200:
                raise RuntimeError(f"{self.url}: HTTP {resp.status}: {resp.read()[:500].decode(errors='replace')}")
            stamps, usage, t_end, finish = [], None, None, None
            while True:
                line = resp.readline()
                if not line:
                    break
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                now = time.perf_counter()
                if data == b"[DONE]":
                    break
                ev = json.loads(data)
                if "error" in ev:
                    raise RuntimeError(f"{self.url}: {ev['error']}")
                if ev.get("usage"):
                    usage = ev["usage"]
                for ch in ev.get("choices") or []:
                    d = ch.get("delta") or {}
                    if d.get("content") or d.get("reasoning_content") or d.get("tool_calls"):
                        stamps.append(now)
                    if ch.get("finish_reason"):
                        finish, t_end = ch["finish_reason"], now
            return {"t_req": t_req, "stamps": stamps, "t_end": t_end or time.perf_counter(), "usage": usage or {},
                    "finish_reason": finish}
        finally:
            conn.close()

    def prompt(self, n_tokens: int, nonce: str, seed: int) -> str:
        """A text of about n_tokens prompt tokens (calibrated), starting with a nonce so no prefix is cached."""
        words = max(0, round((n_tokens - self.overhead) / self.tokens_per_word)) if n_tokens > 0 else 0
        rng = np.random.default_rng(seed)
        return nonce + " " + " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), words))

    def calibrate(self, seed: int) -> None:
        """Tokens per word and fixed overhead (template, nonce) of prompt(), from the endpoint's usage."""
        n1, n2 = 8, 256
        rng = np.random.default_rng(seed)
        got = []
        for tag, n in (("a", n1), ("b", n2)):
            nonce = f"[bench c{tag} {time.time_ns()}]"
            r = self.stream(nonce + " " + " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n)), 1)
            got.append(r["usage"])
        pa, pb = got[0].get("prompt_tokens"), got[1].get("prompt_tokens")
        if not pa or not pb or pb <= pa:
            raise RuntimeError(f"{self.url}: the endpoint reports no usable usage.prompt_tokens ({got}); "
                               "stream_options.include_usage is needed")
        self.tokens_per_word = (pb - pa) / (n2 - n1)
        self.overhead = pa - n1 * self.tokens_per_word


def _prefilled(usage: dict) -> int:
    cached = ((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    return int(usage.get("prompt_tokens", 0)) - int(cached)


def server_run(target: ServerTarget, args, run: int) -> dict:
    out: dict = {"run": run, "page_cache": "none", "load_s": None, "warmup_s": None, "bandwidth": None,
                 "peak_gpu_mem_bytes": None, "peak_rss_bytes": None}
    t0 = time.perf_counter()
    if not args.no_warmup:
        target.stream(f"warm-up {run} {time.time_ns()}", 2)
    out["warmup_s"] = time.perf_counter() - t0 if not args.no_warmup else None
    out["prefill"] = []
    for pp in args.pp:
        r = target.stream(target.prompt(pp, f"[bench p{pp} {time.time_ns()}]", args.seed + pp), 1)
        ttft = (r["stamps"][0] if r["stamps"] else r["t_end"]) - r["t_req"]
        n = _prefilled(r["usage"])
        out["prefill"].append({"pp": pp, "tokens": n, "prompt_tokens": r["usage"].get("prompt_tokens"),
                               "seconds": ttft, "tps": n / ttft if ttft > 0 else None, "ttft_s": ttft})
    out["decode"] = []
    for depth in args.depth:
        for n in args.tg:
            r = target.stream(target.prompt(depth, f"[bench d{depth} {time.time_ns()}]", args.seed + depth),
                              n + 1)
            st = r["stamps"]
            got = int(r["usage"].get("completion_tokens", len(st)))
            steps = got - 1                               # the first token came from the prefill
            first = st[0] if st else r["t_end"]
            second = st[1] if len(st) > 1 else None
            avg = steps / (r["t_end"] - first) if steps >= 1 and r["t_end"] > first else None
            steady = (steps - 1) / (r["t_end"] - second) if steps >= 2 and second and r["t_end"] > second else None
            out["decode"].append({"depth": depth, "prompt_tokens": r["usage"].get("prompt_tokens"),
                                  "tokens": steps, "requested": n, "finish_reason": r["finish_reason"],
                                  "chunks": len(st), "ttft_s": first - r["t_req"],
                                  "seconds": r["t_end"] - first, "steady_tps": steady, "avg_tps": avg,
                                  "weight_bytes_per_token": None, "kv_bytes_read_per_token": None,
                                  "bytes_per_token": None, "gbps": None, "roofline_fraction": None})
    return out


# ---- summary and output -------------------------------------------------------------------------------------------
# (key, label, unit, scale) of every summarised metric; key is a path in a run dict
def metric_rows(runs: list[dict]) -> list[tuple[str, str, str, float]]:
    rows = [("load_s", "load", "s", 1.0), ("bandwidth.gbps", "device read bandwidth", "GB/s", 1.0),
            ("peak_gpu_mem_bytes", "peak GPU memory", "GiB", 1 / 2**30)]
    first = runs[0]
    for p in first.get("prefill", []):
        rows.append((f"pp{p['pp']}.tps", f"pp{p['pp']} prefill", "t/s", 1.0))
        rows.append((f"pp{p['pp']}.ttft_s", f"pp{p['pp']} TTFT", "s", 1.0))
    for d in first.get("decode", []):
        k = f"tg{d.get('requested', d['tokens'])}@d{d['depth']}"
        rows += [(f"{k}.steady_tps", f"{k} decode steady", "t/s", 1.0),
                 (f"{k}.avg_tps", f"{k} decode avg (incl. first)", "t/s", 1.0),
                 (f"{k}.ttft_s", f"{k} TTFT", "s", 1.0),
                 (f"{k}.bytes_per_token", f"{k} bytes read/token", "MB", 1e-6),
                 (f"{k}.gbps", f"{k} achieved", "GB/s", 1.0),
                 (f"{k}.roofline_fraction", f"{k} roofline", "%", 100.0)]
    return rows


def metric_value(run: dict, key: str):
    if key.startswith("pp") and "." in key:
        name, field = key.split(".", 1)
        for p in run.get("prefill", []):
            if f"pp{p['pp']}" == name:
                return p.get(field)
        return None
    if key.startswith("tg") and "." in key:
        name, field = key.split(".", 1)
        for d in run.get("decode", []):
            if f"tg{d.get('requested', d['tokens'])}@d{d['depth']}" == name:
                return d.get(field)
        return None
    v = run
    for part in key.split("."):
        v = v.get(part) if isinstance(v, dict) else None
    return v


def summarize(runs: list[dict]) -> dict:
    out = {}
    for key, label, unit, scale in metric_rows(runs):
        vals = [metric_value(r, key) for r in runs]
        vals = [float(v) for v in vals if v is not None]
        if not vals:
            out[key] = {"label": label, "unit": unit, "scale": scale, "n": 0, "median": None, "min": None,
                        "max": None, "spread_pct": None, "values": []}
            continue
        med = statistics.median(vals)
        out[key] = {"label": label, "unit": unit, "scale": scale, "n": len(vals), "median": med, "min": min(vals),
                    "max": max(vals), "spread_pct": (100.0 * (max(vals) - min(vals)) / med) if med else None,
                    "values": vals}
    return out


def _fmt(v, scale: float = 1.0) -> str:
    if v is None:
        return "-"
    x = v * scale
    a = abs(x)
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    return f"{x:.4f}" if a >= 1e-3 else f"{x:.3g}"


def format_table(report: dict) -> str:
    m = report["meta"]
    gpu = (m.get("gpu") or {}).get("name") or "no GPU"
    lines = [f"ds4cupy bench: {m['model']['name']}  |  {m['mode']} / {m['backend']}  |  {gpu}  |  "
             f"{m['settings']['runs']} run(s), page cache: {', '.join(sorted(set(m['page_cache']))) or '-'}",
             f"KV bytes per token (growing part): {_fmt(m['kv_bytes_per_token'])}  |  weight bytes read per decoded "
             f"token: {_fmt(m['weight_bytes_per_token'])}"]
    head = f"{'metric':<40}{'unit':>6}{'median':>12}{'min':>12}{'max':>12}{'spread':>9}"
    lines += [head, "-" * len(head)]
    for key, s in report["summary"].items():
        if s["n"] == 0:
            continue
        spread = "-" if s["spread_pct"] is None else f"{s['spread_pct']:.1f}%"
        lines.append(f"{s['label']:<40}{s['unit']:>6}{_fmt(s['median'], s['scale']):>12}"
                     f"{_fmt(s['min'], s['scale']):>12}{_fmt(s['max'], s['scale']):>12}{spread:>9}")
    return "\n".join(lines)


def format_csv(report: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["metric", "label", "unit", "median", "min", "max", "spread_pct", "n", "values"])
    for key, s in report["summary"].items():
        sc = s["scale"]
        conv = (lambda v: None if v is None else v * sc)
        w.writerow([key, s["label"], s["unit"], conv(s["median"]), conv(s["min"]), conv(s["max"]), s["spread_pct"],
                    s["n"], " ".join(repr(v * sc) for v in s["values"])])
    return buf.getvalue()


# ---- command line ---------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("-m", "--model", metavar="MODEL", help="a ds4-layout GGUF file")
    src.add_argument("--synthetic", choices=("flash",), default=None,
                     help="DeepSeek-V4-Flash shapes with random valid quantized weights generated on the GPU")
    src.add_argument("--server", metavar="URL", default=None,
                     help="measure through an OpenAI-compatible endpoint with streaming (e.g. http://127.0.0.1:8000)")
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
    p.add_argument("--json-out", default=None, metavar="FILE", help="JSON report (default bench-<timestamp>.json)")
    p.add_argument("--csv", nargs="?", const="-", default=None, metavar="FILE",
                   help="also write the summary as CSV (to stdout when no FILE is given)")


def main(args: argparse.Namespace) -> int:
    if not (args.model or args.synthetic or args.server):
        print("error: give -m MODEL, --synthetic flash or --server URL", file=sys.stderr)
        return 2
    if args.runs < 1:
        print(f"error: --runs must be >= 1, got {args.runs}", file=sys.stderr)
        return 2
    if any(v < 1 for v in args.pp) or any(v < 1 for v in args.tg):
        print("error: --pp and --tg values must be >= 1", file=sys.stderr)
        return 2
    if args.synthetic:
        from .engine import gpu_available
        if not gpu_available():
            print("error: --synthetic generates its weights on the GPU; no CUDA device found", file=sys.stderr)
            return 2
        if args.backend == "reference":
            print("error: --synthetic runs on the cuda backend only", file=sys.stderr)
            return 2
    started = _dt.datetime.now(_dt.timezone.utc)
    runs: list[dict] = []
    meta: dict = {"argv": list(sys.argv), "date": started.isoformat(timespec="seconds"), "host": platform.node(),
                  "python": platform.python_version(), "commit": git_commit(), "gpu": None,
                  "settings": {"runs": args.runs, "pp": args.pp, "tg": args.tg, "depth": args.depth,
                               "seed": args.seed, "warmup": not args.no_warmup}}
    from . import __version__
    meta["ds4cupy"] = __version__
    from .memory.budget import kv_bytes_per_token

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
