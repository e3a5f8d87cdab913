"""Serve a model over an OpenAI-compatible HTTP API (chat, completions, models, health, metrics).

`ds4cupy serve -m model.gguf` listens on 127.0.0.1:8000. Without -m it serves the built-in demo model, whose weights
are random: the server works end to end, the text it writes means nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from . import protocol
from .app import DEFAULT_KEEPALIVE_S, DEFAULT_MAX_BODY_BYTES, ServerSettings, create_app, new_event_loop

DEFAULT_CTX = 32768
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
    p.add_argument("--model-name", default=protocol.DEFAULT_MODEL_NAME,
                   help=f"the model id reported by the API (default {protocol.DEFAULT_MODEL_NAME}; the aliases "
                        f"{protocol.NON_THINKING_ALIAS} / {protocol.THINKING_ALIAS} select thinking off / on)")
    p.add_argument("--max-body", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help="largest request body in bytes (413 beyond it)")
    p.add_argument("--keepalive", type=float, default=DEFAULT_KEEPALIVE_S,
                   help="seconds of silence before an SSE `: keepalive` comment while a request waits or prefills")
    p.add_argument("--prefill-chunk", type=int, default=None, help="tokens per prefill call (default 512)")
    p.add_argument("--max-snapshots", type=int, default=2,
                   help="session copies kept for prompt-prefix reuse (each holds the KV; 0: reuse the live session "
                        "only)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def pick_ctx(requested: int | None, n_ctx_train: int) -> int:
    ctx = requested if requested else min(DEFAULT_CTX, n_ctx_train)
    if ctx <= 1:
        raise SystemExit(f"--ctx must be at least 2, got {ctx}")
    return ctx


async def serve_forever(app, host: str, port: int) -> None:
    """Listen, print the URL, and run until SIGINT/SIGTERM."""
    from aiohttp import web
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_port = runner.addresses[0][1] if runner.addresses else port
    shown_host = f"[{host}]" if ":" in host else host
    print(f"ds4cupy: listening on http://{shown_host}:{bound_port}/v1  (Ctrl-C stops)", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        await stop.wait()
    finally:
        print("ds4cupy: shutting down", flush=True)
        await runner.cleanup()


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
    print(f"ds4cupy: model {path} ({model.backend} backend), ctx {ctx}, served as '{args.model_name}'"
          + ("  [DEMO MODEL: RANDOM WEIGHTS]" if demo else ""), file=sys.stderr, flush=True)
    settings = ServerSettings(model_name=args.model_name, ctx=ctx, api_key=args.api_key,
                              max_body_bytes=args.max_body, keepalive_s=args.keepalive, demo=demo)
    app = create_app(model.tokenizer, session, settings, prefill_chunk=args.prefill_chunk,
                     max_snapshots=args.max_snapshots)
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(serve_forever(app, args.host, args.port))
    except OSError as exc:
        print(f"ds4cupy: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    finally:
        loop.close()
    return 0
