"""The measuring core of `ds4cupy bench`: the engine and server targets, one run of each, the bytes a decoded token
reads, and the device read bandwidth. The method is in the package docstring (ds4cupy/tools/bench/__init__.py)."""
from __future__ import annotations

import gc
import http.client
import json
import os
import resource
import subprocess
import sys
import time
import urllib.parse
import warnings
from pathlib import Path

import numpy as np

WARMUP_PREFILL = 8
WARMUP_DECODE = 2
BANDWIDTH_BYTES = 4 << 30


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
    here = Path(__file__).resolve().parents[3]
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


def kv_read_bytes(cfg, pos: int, index_fp4: bool = False) -> int:
    """Bytes of KV state a decode step at position `pos` (0-based; pos tokens before it) reads (float32 cache):
    window ring rows, compressed rows (all on HCA layers; on CSA layers the indexer's rows plus the top-k selected
    compressed rows), compressor state. index_fp4: the indexer rows packed (switch INDEXER_FP4 with QAT on,
    memory.budget.kv_layout)."""
    from ...engines.numerics import fp4_row_bytes
    n = pos + 1
    hd, idim = cfg.head_dim, cfg.indexer_head_dim
    index_row = fp4_row_bytes(idim) if index_fp4 else idim * 4
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
            total += n_comp * index_row + min(cfg.indexer_top_k, n_comp) * hd * 4
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
    from ...memory.arena import stream_read
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
    """Loads the model for one run: a GGUF file (ds4cupy.load) or a synthetic model (ds4cupy.tools.synthetic)."""

    def __init__(self, args):
        self.args = args
        self.synthetic = args.synthetic
        self.path = None if self.synthetic else args.model
        if self.synthetic:
            from ..synthetic import synthetic_config, synthetic_nbytes
            self.config = synthetic_config(self.synthetic, args.layers)
            self.tensor_bytes = synthetic_nbytes(self.config, args.experts)
            self.backend = "cuda"
            self.file_bytes = None
            self.name = f"{self.config.name} (synthetic, random weights, {args.experts} experts)"
        else:
            from ...format.model_file import ModelFile
            with ModelFile(args.model) as mf:
                self.config = mf.config
                self.tensor_bytes = {n: t.nbytes for n, t in mf.tensors.items()}
                self.name = str(mf.metadata.get("general.name") or mf.path.stem)
                self.file_bytes = mf.file_size
            if args.backend == "auto":
                from ...engines import gpu_available
                self.backend = "cuda" if gpu_available() else "reference"
            else:
                self.backend = args.backend
        from ..synthetic import decode_bytes_per_token
        self.weight_bytes_per_token = decode_bytes_per_token(self.config, self.tensor_bytes)
        self.on_gpu = self.backend == "cuda"
        self.index_fp4 = False              # set by engine_run from the loaded model

    def load(self, ctx: int):
        a = self.args
        if self.synthetic:
            from ..synthetic import load_synthetic
            return load_synthetic(self.synthetic, a.layers, a.experts, seed=a.seed, ctx=ctx,
                                  progress=sys.stderr.isatty())
        from ...engines import load
        return load(self.path, backend=self.backend, progress=False)


def greedy(logits: np.ndarray, exclude: int | None) -> int:
    if exclude is not None and 0 <= exclude < logits.shape[-1]:
        logits = logits.copy()
        logits[exclude] = -np.inf
    return int(np.argmax(logits))


def greedy_top(top, exclude: int | None) -> int:
    """greedy() from a decode_top candidate set: the first candidate (value descending, then id) that is not
    `exclude` (the set holds 1,024 ids, so one besides EOS is always there)."""
    for i in top.ids:
        if int(i) != exclude:
            return int(i)
    raise ValueError("no candidate besides the excluded id")


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
    # the CUDA engine's packed indexer rows (INDEXER_FP4 with QAT on): what the KV byte counts below assume
    target.index_fp4 = bool(getattr(getattr(model, "_impl", None), "indexer_fp4", False))
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
        # decode steps: the candidate fast path (decode_top, greedy from its sorted ids) unless --decode-path logits;
        # host time per token = wall time of the call + token choice - GPU time between the session's CUDA events
        fast = (getattr(args, "decode_path", "top") == "top" and callable(getattr(session, "decode_top", None))
                and bool(getattr(session, "candidates_on_device", False)))
        timing = hasattr(session, "decode_timing")
        if timing:
            session.decode_timing = True
        for depth in args.depth:
            for n in args.tg:
                session.reset()
                prompt = ids[:max(depth, 1)]
                if args.depth_fill == "random":     # the state of depth - 1 tokens, then one real prefill token
                    session.fill_random_state(len(prompt) - 1, args.seed)
                    prompt = prompt[-1:]
                gpu_sync(on_gpu)
                t_req = time.perf_counter()
                lg = session.prefill(prompt)
                t = greedy(lg, eos)
                gpu_sync(on_gpu)
                t_first = time.perf_counter()
                stamps, host_ms = [], []
                for _ in range(n):
                    c0 = time.perf_counter()
                    if fast:
                        t = greedy_top(session.decode_top(t, 0.0), eos)
                    else:
                        t = greedy(session.decode(t), eos)
                    wall_ms = (time.perf_counter() - c0) * 1e3
                    gpu_ms = session.last_decode_gpu_ms if timing else None
                    if gpu_ms is not None:
                        host_ms.append(wall_ms - gpu_ms)
                    gpu_sync(on_gpu)
                    stamps.append(time.perf_counter())
                mem.sample()
                rec = decode_record(target, depth, max(depth, 1), n, t_req, t_first, stamps, out["bandwidth"])
                rec["decode_path"] = "top" if fast else "logits"
                rec["host_ms_per_token"] = float(np.median(host_ms)) if host_ms else None
                rec["host_ms_mean"] = float(np.mean(host_ms)) if host_ms else None
                out["decode"].append(rec)
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
    index_fp4 = getattr(target, "index_fp4", False)
    kv = float(np.mean([kv_read_bytes(cfg, prompt_tokens + i, index_fp4) for i in range(n)])) if n else 0.0
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
