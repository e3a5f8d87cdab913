"""Generate from a prompt, or chat interactively: `ds4cupy run -m MODEL [-p PROMPT]`.

With -p the answer streams to stdout and the command exits; without -p a chat prompt opens (/help lists its
commands). Reasoning (thinking mode) is shown dimmed on a terminal, between <think> and </think> otherwise;
statistics go to stderr. Without -m the built-in demo model is used: its weights are random, so its text is noise.

In a chat, each turn reuses the KV cache of the conversation so far and prefills only the new tokens: the rendered
conversation keeps earlier reasoning (drop_thinking off, unless --drop-thinking) so that it extends, token for token,
what the session already holds; the session is also snapshotted after each prompt, and a turn that does not extend
the live session but extends that snapshot restarts from it.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TextIO

from ..text.chat import ChatFormatError, encode_messages
from ..text.generate import Generator
from ..text.sampling import SamplingParams

DEFAULT_SYSTEM = "You are a helpful assistant"
DEFAULT_CTX = 32768
DEFAULT_MAX_TOKENS = 4096
DEMO_MAX_TOKENS = 64
DEMO_NOTE = ("note: no -m given: using the built-in DEMO model. Its weights are RANDOM, so the text it writes is "
             "meaningless; pass -m MODEL.gguf for a real model.")
DIM, RESET = "\x1b[2m", "\x1b[0m"

REPL_HELP = """commands:
  /quit, /exit   leave (Ctrl-D too)
  /reset         forget the conversation (keeps the system prompt)
  /think         thinking mode on      /nothink   thinking mode off
  /help          this text
Ctrl-C stops the answer being written."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None, metavar="MODEL",
                   help="ds4-layout GGUF file (default: the built-in demo model, random weights)")
    p.add_argument("-p", "--prompt", default=None,
                   help="the user message; '-' reads it from stdin. Without -p an interactive chat opens")
    p.add_argument("--system", default=DEFAULT_SYSTEM,
                   help=f"system prompt (default: {DEFAULT_SYSTEM!r}; '' for none)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--think", dest="think", action="store_const", const="think",
                      help="thinking mode: the model reasons first, then answers (the default)")
    mode.add_argument("--nothink", dest="think", action="store_const", const="nothink",
                      help="chat mode: answer directly, no reasoning")
    mode.add_argument("--think-max", dest="think", action="store_const", const="max",
                      help="Think Max: thinking with DeepSeek's maximum-effort preamble (wants a large --ctx)")
    p.set_defaults(think="think")
    p.add_argument("--temp", type=float, default=1.0, help="temperature; <= 0 is greedy (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1.0)")
    p.add_argument("--min-p", type=float, default=0.05,
                   help="drop tokens below this fraction of the best token's probability (default 0.05)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = all (default)")
    p.add_argument("--seed", type=int, default=None, help="random seed: the same seed and prompt give the same text")
    p.add_argument("-n", "--max-tokens", type=int, default=None,
                   help=f"most tokens to generate per answer (default {DEFAULT_MAX_TOKENS}; "
                        f"{DEMO_MAX_TOKENS} for the demo model)")
    p.add_argument("--ctx", type=int, default=None,
                   help=f"context length in tokens (default {DEFAULT_CTX}, or the model's training context if smaller)")
    p.add_argument("--backend", choices=("auto", "reference", "cuda"), default="auto",
                   help="auto: cuda when a GPU is present, else the NumPy reference (slow, any machine)")
    p.add_argument("--memory", choices=("auto", "device", "managed"), default="auto",
                   help="GPU weight placement: auto (chosen from the GPU and the model size; the reason is printed), "
                        "device (cudaMalloc copy), managed (cudaMallocManaged + hints, one copy on unified memory)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when the model writes TEXT (not shown); may be repeated")
    p.add_argument("--drop-thinking", action="store_true",
                   help="chat: drop earlier turns' reasoning from the context as DeepSeek's template does by default "
                        "(costs a re-prefill of the last answer each turn)")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="dim the reasoning with ANSI colours (auto: when stdout is a terminal)")


class ChatState:
    """A conversation bound to one session, reusing its KV cache across turns.

    prompt_ids(text) renders the conversation with the new user message; sync(ids) brings the session to `ids`
    (continuing it, restoring the post-prompt snapshot, or starting over) and returns the last logits; record()
    adds the answer. .reused / .prefilled tell how many prompt tokens the last sync took from the cache / computed.
    """

    def __init__(self, model, ctx: int, system: str | None, thinking: str, drop_thinking: bool = False):
        self.model = model
        self.tokenizer = model.tokenizer
        self.session = model.new_session(ctx)
        self.ctx = ctx
        self.system = system
        self.thinking = thinking
        self.drop_thinking = drop_thinking
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self._rendered: str | None = None   # text of the conversation so far (ends with an assistant turn)
        self._ids: list[int] | None = None  # its ids as the session produced them
        self._snap = None
        self._snap_ids: list[int] = []
        self.reused = self.prefilled = 0

    @property
    def thinking_mode(self) -> str:
        return "chat" if self.thinking == "nothink" else "thinking"

    def _render(self, messages) -> str:
        return encode_messages(messages, self.thinking_mode, drop_thinking=self.drop_thinking,
                               reasoning_effort="max" if self.thinking == "max" else None)

    def prompt_ids(self, user_text: str) -> list[int]:
        self.messages.append({"role": "user", "content": user_text})
        text = self._render(self.messages)
        if self._rendered is not None and self._ids is not None and text.startswith(self._rendered):
            return self._ids + self.tokenizer.encode(text[len(self._rendered):])
        return self.tokenizer.encode(text)

    def sync(self, ids: list[int]):
        """Make the session hold `ids`; returns the logits after the last one."""
        if len(ids) >= self.ctx:
            raise ValueError(f"the conversation is {len(ids)} tokens, the context is {self.ctx}: use /reset or a "
                             f"larger --ctx")
        have = list(self.session.tokens)
        if not (len(have) < len(ids) and ids[:len(have)] == have):
            snap_n = len(self._snap_ids)
            if self._snap is not None and snap_n < len(ids) and ids[:snap_n] == self._snap_ids:
                self.session.restore(self._snap)
            else:
                self.session.reset()
            have = list(self.session.tokens)
        self.reused = len(have)
        self.prefilled = len(ids) - len(have)
        logits = self.session.prefill(ids[len(have):])
        self._snap = self.session.snapshot()
        self._snap_ids = list(ids)
        return logits

    def record(self, prompt_ids: list[int], gen: Generator | None) -> None:
        """Add the answer (or, with gen None, drop the unanswered user message)."""
        if gen is None:
            self.messages.pop()
            return
        self.messages.append({"role": "assistant", "content": gen.content, "reasoning_content": gen.reasoning})
        rendered = self._render(self.messages)
        self._rendered, self._ids = rendered, None
        # ids for the rendered conversation: the prompt and the answer exactly as the session saw them, plus
        # whatever the template adds after the generated text (`</think>` of a cut-off reasoning, the EOS)
        tok = self.tokenizer
        generated = [t for t in gen.completion_tokens if t != tok.eos_id]
        head = tok.decode(prompt_ids + generated)
        if rendered.startswith(head):
            ids = prompt_ids + generated + tok.encode(rendered[len(head):])
            if tok.decode(ids) == rendered:
                self._ids = ids
        # else (a stop string cut the answer, or it ended mid-character): the next turn is tokenized afresh and
        # restarts from the snapshot taken after this turn's prompt


class Printer:
    """Streams deltas to a text stream: reasoning dimmed (or between <think> tags), then content."""

    def __init__(self, out: TextIO, color: bool):
        self.out, self.color = out, color
        self.in_reasoning = False
        self.any_output = False

    def reasoning(self, text: str) -> None:
        if not text:
            return
        if not self.in_reasoning:
            self.out.write(DIM if self.color else "<think>\n")
            self.in_reasoning = True
        self.out.write(text)
        self.out.flush()
        self.any_output = True

    def content(self, text: str) -> None:
        if not text:
            return
        self.close_reasoning()
        self.out.write(text)
        self.out.flush()
        self.any_output = True

    def close_reasoning(self) -> None:
        if self.in_reasoning:
            self.out.write(RESET + "\n\n" if self.color else "\n</think>\n\n")
            self.in_reasoning = False

    def end(self) -> None:
        self.close_reasoning()
        self.out.write("\n")
        self.out.flush()


def answer(state: ChatState, user_text: str, params: SamplingParams, max_tokens: int, stop, out: TextIO,
           err: TextIO, color: bool) -> Generator | None:
    """One turn: render, sync the session, stream the answer. Returns the Generator (None if nothing ran)."""
    ids = state.prompt_ids(user_text)
    t0 = time.perf_counter()
    try:
        logits = state.sync(ids)
    except BaseException:
        state.record(ids, None)
        raise
    t1 = time.perf_counter()
    budget = max(1, min(max_tokens, state.ctx - len(ids)))
    gen = Generator(state.tokenizer, params, max_tokens=budget, stop=stop, thinking=state.thinking_mode == "thinking",
                    parse_tools=False)
    printer = Printer(out, color)
    interrupted = False
    try:
        for d in gen.stream(state.session, logits):
            printer.reasoning(d.reasoning)
            printer.content(d.content)
    except KeyboardInterrupt:
        interrupted = True
    printer.end()
    t2 = time.perf_counter()
    n = len(gen.completion_tokens)
    rate = n / (t2 - t1) if t2 > t1 else 0.0
    finish = "interrupted" if interrupted else gen.finish_reason
    err.write(f"[prompt {len(ids)} tokens ({state.prefilled} computed, {state.reused} from cache) in "
              f"{t1 - t0:.2f}s; {n} tokens in {t2 - t1:.2f}s, {rate:.1f} tok/s; finish: {finish}]\n")
    err.flush()
    state.record(ids, gen)
    return gen


def _open_model(args, err: TextIO):
    import ds4cupy
    if args.model is None:
        from .demo import demo_model_path
        err.write(DEMO_NOTE + "\n")
        err.flush()
        path = demo_model_path()
    else:
        path = Path(args.model)
        if not path.is_file():
            raise FileNotFoundError(f"model file {args.model!r} does not exist")
    return ds4cupy.load(path, backend=args.backend, memory=args.memory, ctx=args.ctx)


def main(args: argparse.Namespace) -> int:
    out, err = sys.stdout, sys.stderr
    try:
        params = SamplingParams(temperature=args.temp, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                                seed=args.seed)
    except ValueError as e:
        err.write(f"error: {e}\n")
        return 2
    if args.max_tokens is not None and args.max_tokens < 1:
        err.write(f"error: -n/--max-tokens must be at least 1, got {args.max_tokens}\n")
        return 2
    if args.ctx is not None and args.ctx < 2:
        err.write(f"error: --ctx must be at least 2, got {args.ctx}\n")
        return 2
    prompt = args.prompt
    if prompt == "-":
        prompt = sys.stdin.read()
    t0 = time.perf_counter()
    try:
        model = _open_model(args, err)
    except (OSError, ValueError, RuntimeError) as e:
        err.write(f"error: {e}\n")
        return 1
    n_train = getattr(model.config, "n_ctx_train", None) or DEFAULT_CTX
    ctx = args.ctx if args.ctx else min(DEFAULT_CTX, n_train)
    max_tokens = args.max_tokens or (DEMO_MAX_TOKENS if args.model is None else DEFAULT_MAX_TOKENS)
    color = args.color == "always" or (args.color == "auto" and out.isatty())
    err.write(f"[{model.name}: {model.backend} backend, ctx {ctx}, loaded in {time.perf_counter() - t0:.1f}s]\n")
    state = ChatState(model, ctx, args.system or None, args.think, drop_thinking=args.drop_thinking)
    try:
        if prompt is not None:
            answer(state, prompt, params, max_tokens, args.stop, out, err, color)
            return 0
        return repl(state, params, max_tokens, args.stop, out, err, color)
    except (ValueError, ChatFormatError) as e:
        err.write(f"error: {e}\n")
        return 1
    finally:
        close = getattr(model, "close", None)
        if close:
            close()


def repl(state: ChatState, params: SamplingParams, max_tokens: int, stop, out: TextIO, err: TextIO,
         color: bool, input_fn=input) -> int:
    """The interactive chat loop; returns the exit status."""
    err.write("chat: type a message, /help for commands, /quit to leave\n")
    while True:
        try:
            line = input_fn("> ")
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:
            out.write("\n")
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd = text.split()[0].lower()
            if cmd in ("/quit", "/exit"):
                return 0
            if cmd == "/reset":
                state.reset()
                err.write("[conversation cleared]\n")
            elif cmd == "/think":
                state.thinking = "think"
                err.write("[thinking mode on]\n")
            elif cmd == "/nothink":
                state.thinking = "nothink"
                err.write("[thinking mode off]\n")
            elif cmd == "/help":
                err.write(REPL_HELP + "\n")
            else:
                err.write(f"unknown command {cmd!r}; /help lists the commands\n")
            continue
        try:
            answer(state, line, params, max_tokens, stop, out, err, color)
        except ValueError as e:
            err.write(f"error: {e}\n")
