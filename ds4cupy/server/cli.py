"""Serve a model over HTTP: OpenAI chat / completions / Responses, Anthropic Messages, models, health, metrics.

`ds4cupy serve -m model.gguf` listens on 127.0.0.1:8000. Without -m it serves the built-in demo model, whose weights
are random: the server works end to end, the text it writes means nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from . import protocol
from .app import (DEFAULT_KEEPALIVE_S, DEFAULT_MAX_BODY_BYTES, DEFAULT_SHUTDOWN_GRACE_S, ServerSettings, create_app,
                  new_event_loop)
from .guards import DEFAULT_BODY_TIMEOUT_S
from .transport import DEFAULT_HEADER_TIMEOUT_S, GuardedRunner
from .kv_disk import DiskStore
from .prefill_pacing import PrefillPacer
from .prefix_cache import PrefixCache
from .scheduler import stream_batch

DEFAULT_CTX = 32768
DEFAULT_DISK_GB = 20.0
GB = 1000 ** 3
RANDOM_WEIGHTS_NOTE = ("*** NOTE: no -m given: serving the built-in DEMO model. Its weights are RANDOM: the API works, "
                       "the text it generates is meaningless. Pass -m MODEL.gguf for a real model. ***")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", help="ds4-layout GGUF file (default: the built-in demo model, random weights)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    p.add_argument("--ctx", type=int, default=None,
                   help=f"context length of the session (default {DEFAULT_CTX}, capped by the model's training ctx)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1/* requests")
    p.add_argument("--backend", default="auto", choices=("auto", "reference", "cuda"),
                   help="auto: cuda when a GPU is present, else the NumPy reference")
    p.add_argument("--memory", choices=("auto", "device", "managed"), default="auto",
                   help="GPU weight placement: auto (chosen from the GPU and the model size; the reason is printed), "
                        "device (cudaMalloc copy), managed (cudaMallocManaged + hints, one copy on unified memory)")
    p.add_argument("--served-model-name", "--model-name", dest="served_model_name", nargs="+",
                   default=[protocol.DEFAULT_MODEL_NAME], metavar="NAME",
                   help=f"the model id(s) requests may name: the first is reported by /v1/models and /health, the "
                        f"others are aliases (default {protocol.DEFAULT_MODEL_NAME}). {protocol.NON_THINKING_ALIAS} "
                        f"(thinking off) and {protocol.THINKING_ALIAS} (thinking on) are always accepted too; any "
                        f"other name is a 404 model_not_found")
    p.add_argument("--max-body", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help=f"largest request body in bytes (413 beyond it; default {DEFAULT_MAX_BODY_BYTES})")
    p.add_argument("--header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT_S,
                   help=f"seconds a new connection may take to send its request headers (default "
                        f"{DEFAULT_HEADER_TIMEOUT_S:g})")
    p.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT_S,
                   help=f"seconds a request body may take to arrive (408 beyond; default {DEFAULT_BODY_TIMEOUT_S:g})")
    p.add_argument("--cors", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages from ORIGIN (e.g. http://localhost:3000; repeatable; * for any) to call "
                        "the API; without it no CORS headers are sent")
    p.add_argument("--metrics-public", action="store_true",
                   help="serve /metrics without the API key (by default --api-key guards it too)")
    p.add_argument("--shutdown-grace", type=float, default=DEFAULT_SHUTDOWN_GRACE_S,
                   help=f"on SIGTERM/SIGINT, seconds the running request may take to finish before it is ended with "
                        f"an error (default {DEFAULT_SHUTDOWN_GRACE_S:g}); queued requests get 503 at once")
    p.add_argument("--keepalive", type=float, default=DEFAULT_KEEPALIVE_S,
                   help="seconds of silence before an SSE `: keepalive` comment while a request waits or prefills")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                   help="tokens per prefill call. Default: paced, each chunk sized from the measured prefill rate to "
                        "take about 0.4 s (64 to 8192 tokens), since a cancel, a waiting request's progress and, with "
                        "--max-batch, the running streams' next token wait for the chunk in progress")
    p.add_argument("--max-batch", type=int, default=1, metavar="N",
                   help="requests served at once (default 1: one at a time, the others wait in a FIFO queue). N > 1: "
                        "each of up to N requests gets its own session (KV for --ctx tokens: N times the KV memory, "
                        "checked at start), joins the running batch after its prompt is prefilled (prefill chunks "
                        "interleave with the others' decode steps) and leaves when done or cancelled; later requests "
                        "wait FIFO. The reference backend decodes the batch in one step (weights read once); the cuda "
                        "backend, until it has a batched step, advances the streams one token each in turn")
    p.add_argument("--kv-cache-dir", default=None, metavar="DIR",
                   help="also keep stored session states on disk in DIR: written in the background, found again "
                        "after a restart (files named by a hash of the model identity and the token prefix)")
    p.add_argument("--kv-cache-gb", type=float, default=DEFAULT_DISK_GB, metavar="N",
                   help=f"disk budget of --kv-cache-dir in GB, least recently used states deleted first "
                        f"(default {DEFAULT_DISK_GB:g})")
    p.add_argument("--kv-cache-ram-gb", type=float, default=None, metavar="N",
                   help="host memory for stored session states in GB (default: a quarter of the available RAM, at "
                        "most 64); on the GPU backend states first use up to half the GPU memory left free")
    p.add_argument("--checkpoint-tokens", type=int, default=0, metavar="N",
                   help="store the session every N prompt tokens, so an edit at token p re-prefills at most "
                        "prompt - p + N (default 0: N from the measured prefill speed, about 1 s of prefill)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def pick_ctx(requested: int | None, n_ctx_train: int) -> int:
    ctx = requested if requested else min(DEFAULT_CTX, n_ctx_train)
    if ctx <= 1:
        raise SystemExit(f"--ctx must be at least 2, got {ctx}")
    return ctx


def device_cache_bytes(backend: str) -> int:
    """GPU memory for stored states: half of what the device has free once the weights and the session are placed,
    after the memory plan's reserve (0 on the CPU backend)."""
    if backend != "cuda":
        return 0
    from ..memory import detect
    from ..memory.budget import DEFAULT_RESERVE_BYTES
    return max(0, detect().device_free - DEFAULT_RESERVE_BYTES) // 2


def build_prefix_cache(model, args: argparse.Namespace) -> PrefixCache:
    """The prefix cache the flags ask for; says its budgets on stderr."""
    if args.checkpoint_tokens < 0:
        raise SystemExit(f"--checkpoint-tokens must be >= 0, got {args.checkpoint_tokens}")
    if args.kv_cache_gb <= 0:
        raise SystemExit(f"--kv-cache-gb must be > 0, got {args.kv_cache_gb:g}")
    disk = DiskStore(args.kv_cache_dir, model.state_identity) if args.kv_cache_dir else None
    cache = PrefixCache(model.state_identity, device_bytes=device_cache_bytes(model.backend),
                        host_bytes=None if args.kv_cache_ram_gb is None else int(args.kv_cache_ram_gb * GB),
                        disk=disk, disk_bytes=int(args.kv_cache_gb * GB),
                        checkpoint_tokens=args.checkpoint_tokens or None)
    b = cache.budget
    where = f", disk {b['disk'] / GB:.3g} GB in {args.kv_cache_dir}" if disk else ""
    every = f"every {args.checkpoint_tokens} tokens" if args.checkpoint_tokens else "interval from prefill speed"
    print(f"ds4cupy: prefix cache: GPU {b['device'] / GB:.3g} GB, host {b['host'] / GB:.3g} GB{where}; "
          f"checkpoints {every}", file=sys.stderr, flush=True)
    return cache


async def serve_forever(app, host: str, port: int, header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
                        shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S) -> None:
    """Listen, print the URL, and run until SIGINT/SIGTERM; then stop listening and drain (server.shutdown)."""
    from aiohttp import web

    from .shutdown import drain
    runner = GuardedRunner(app, header_timeout_s=header_timeout_s)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_port = runner.addresses[0][1] if runner.addresses else port
    shown_host = f"[{host}]" if ":" in host else host
    print(f"ds4cupy: listening on http://{shown_host}:{bound_port}/v1  (Ctrl-C stops)", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():                    # a second Ctrl-C / SIGTERM while draining: leave now
            print("ds4cupy: stopped without draining", file=sys.stderr, flush=True)
            os._exit(130)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        await stop.wait()
        print(f"ds4cupy: shutting down (grace {shutdown_grace_s:g} s)", flush=True)
        for s in list(runner.sites):
            await s.stop()                   # stop accepting; open connections stay until drained
        await drain(app, shutdown_grace_s)
    finally:
        await runner.cleanup()


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name, value in (("--max-body", args.max_body), ("--header-timeout", args.header_timeout),
                        ("--body-timeout", args.body_timeout), ("--max-batch", args.max_batch)):
        if not value > 0:
            raise SystemExit(f"ds4cupy serve: {name} must be positive, got {value:g}")
    if not args.shutdown_grace >= 0:
        raise SystemExit(f"ds4cupy serve: --shutdown-grace must be >= 0, got {args.shutdown_grace:g}")
    import ds4cupy
    demo = args.model is None
    if demo:
        from ..tools.demo import demo_model_path
        print(RANDOM_WEIGHTS_NOTE, file=sys.stderr, flush=True)
        path = demo_model_path()
    else:
        path = args.model
    model = ds4cupy.load(path, backend=args.backend, memory=args.memory, ctx=args.ctx)
    ctx = pick_ctx(args.ctx, model.config.n_ctx_train)
    session = model.new_session(ctx=ctx)
    batch = stream_batch(model, session, ctx, args.max_batch)     # None for --max-batch 1; exits if N do not fit
    names = list(dict.fromkeys(args.served_model_name))
    print(f"ds4cupy: model {path} ({model.backend} backend), ctx {ctx}, served as {', '.join(names)}"
          + ("  [DEMO MODEL: RANDOM WEIGHTS]" if demo else ""), file=sys.stderr, flush=True)
    if batch is not None:
        how = (f"batched decode of up to {batch.step_size}" if batch.decode_batch is not None
               else "one decode step each in turn")
        print(f"ds4cupy: up to {args.max_batch} requests at once ({how})", file=sys.stderr, flush=True)
    aliases = tuple(dict.fromkeys([*names[1:], protocol.NON_THINKING_ALIAS, protocol.THINKING_ALIAS]))
    settings = ServerSettings(model_name=names[0], ctx=ctx, api_key=args.api_key, aliases=aliases,
                              max_body_bytes=args.max_body, keepalive_s=args.keepalive, demo=demo,
                              metrics_public=args.metrics_public, cors_origins=tuple(args.cors),
                              header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                              shutdown_grace_s=args.shutdown_grace)
    try:
        pacing = PrefillPacer(args.prefill_chunk)           # None: paced to a duration
    except ValueError as exc:
        raise SystemExit(f"ds4cupy serve: --prefill-chunk: {exc}") from None
    print(f"ds4cupy: prefill in {pacing.describe()}", file=sys.stderr, flush=True)
    app = create_app(model.tokenizer, session, settings, prefill_chunk=pacing,
                     prefix_cache=build_prefix_cache(model, args), file_problem=model.file_problem, batch=batch)
    if model.reads_file:
        print(f"ds4cupy: the {model.backend} backend reads weights from {path} while serving: do not change the "
              f"file (requests get 503 if it changes)", file=sys.stderr, flush=True)
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(serve_forever(app, args.host, args.port, args.header_timeout, args.shutdown_grace))
    except OSError as exc:
        print(f"ds4cupy: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    finally:
        loop.close()
    return 0
