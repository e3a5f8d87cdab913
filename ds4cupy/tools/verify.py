"""Run the correctness checks and print one verdict per check (PASS / FAIL / SKIP, the measured number, the threshold).

    ds4cupy verify [-m DeepSeek-V4-Flash.gguf] [--checks tiny,gpu,transformers,prompts] [--json-out FILE]

Exit status 0 only when no check FAILs (a SKIP, e.g. the GPU checks on a machine without a GPU, is not a failure).

Always (generated models, any machine):
- tiny-q2 / tiny-q4 (make_model's `tiny` preset, q2 and q4 experts), on the reference backend and, when a GPU is
  present, the cuda backend, QAT simulation on:
  * prefill(L+1) == prefill(L) + decode(1): last logits, max|diff| / max|logit|
  * chunked prefill == whole prefill: logits at every position, pieces of 5, 17, 1, 33 and the rest
  * snapshot/restore round trip: after restore, the same tokens give the same logits and the token count comes back
  Thresholds: 1e-4 x max|logit| on the reference (the same float32 math in other matrix shapes), 1e-2 on cuda
  (S=1 and S>1 kernels differ; with QAT on, an FP4/FP8 rounding flip of an indexer or KV value moves the logits by
  up to ~1e-3 of their range, see tests/test_gpu_model.py); snapshot/restore 1e-6 on both.
- reference vs cuda (GPU present): prefill logits within 1e-2 x max|logit| (QAT on), and 16 greedy tokens equal
  (a divergence counts as a failure unless the reference's top-2 margin there is under that tolerance, a near tie).
- transformers parity (torch + transformers installed): a small random DeepseekV4ForCausalLM (every parameter
  randomised), save_pretrained, `ds4cupy convert --type f32`, reference backend with qat=False: logits at every
  position within 1e-4 x max|logit| (and the cuda backend within 1e-3 when a GPU is present).
With -m a real DeepSeek-V4-Flash GGUF (greedy, no thinking, prompts rendered with chat.encode_messages):
- "What is 2+2? Answer in one word." (8 tokens): the answer contains 4 (the digit or the word "four").
- "What is the capital of France?" (8 tokens): the answer contains Paris.
- a 120-token story: coherent by the rule of `coherence()` (at least 40 words; repeated word-4-gram rate <= 0.10;
  in-vocabulary word rate >= 0.85, a word being in the vocabulary when " word" is one token of the model's tokenizer).
- the self-consistency checks above on the real model.
Testing hook: `--corrupt-weight NAME` overwrites tensor NAME in every model verify generates (0xFF bytes: NaN for
float and block types, -1 for I32; `--corrupt-mode scale` multiplies an F32/F16 tensor by 1.25 instead) so that a
failing check can be shown to make verify exit non-zero.
"""
from __future__ import annotations

import argparse
import json
import math

import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

CHECK_GROUPS = ("tiny", "gpu", "transformers", "prompts")
TOL = {"reference": 1e-4, "cuda": 1e-2}
RESTORE_TOL = 1e-6
PARITY_TOL = {"reference": 1e-4, "cuda": 1e-3}
CONSISTENCY_L = 70            # crosses the tiny window (32) and several CSA (4) / HCA (16) windows
GREEDY_STEPS = 16
STORY_PROMPT = "Write a short story about a robot who learns to paint."
STORY_TOKENS = 120
MIN_WORDS = 40
MAX_REPEAT_4GRAM = 0.10
MIN_VOCAB_RATE = 0.85


@dataclass
class Verdict:
    name: str
    status: str             # PASS | FAIL | SKIP
    measured: str
    threshold: str
    seconds: float = 0.0
    detail: str = ""

    def line(self) -> str:
        s = f"{self.status:<5} {self.name}: {self.measured}"
        if self.threshold:
            s += f" (threshold {self.threshold})"
        if self.detail:
            s += f" - {self.detail}"
        return s


class Failed(Exception):
    pass


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max|a - b| / max|a|; NaN (never passes a <= test) when either is non-finite or a is all zero."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    scale = np.abs(a).max()
    if scale == 0:
        return float("nan")
    return float(np.abs(a - b).max() / scale)


def fmt_rel(r: float) -> str:
    return "non-finite or all-zero logits" if not math.isfinite(r) else f"max|diff| = {r:.3g} x max|logit|"


def within(value: float, limit: float) -> bool:
    return bool(value <= limit)         # False for NaN


class Runner:
    def __init__(self, out=None):
        self.verdicts: list[Verdict] = []
        self.out = out

    def add(self, v: Verdict) -> None:
        self.verdicts.append(v)
        print(v.line(), file=self.out or sys.stdout, flush=True)

    def skip(self, name: str, why: str) -> None:
        self.add(Verdict(name, "SKIP", why, ""))

    def run(self, name: str, fn: Callable[[], tuple[bool, str, str]]) -> None:
        """fn() -> (ok, measured, threshold); an exception is a FAIL naming it."""
        t0 = time.perf_counter()
        try:
            ok, measured, threshold = fn()
            v = Verdict(name, "PASS" if ok else "FAIL", measured, threshold)
        except Exception as e:  # noqa: BLE001 - a crash of a check is its failure
            v = Verdict(name, "FAIL", f"error: {type(e).__name__}: {e}", "")
        v.seconds = time.perf_counter() - t0
        self.add(v)

    @property
    def failed(self) -> int:
        return sum(v.status == "FAIL" for v in self.verdicts)


# ---- the corruption hook --------------------------------------------------------------------------------------------
def corrupt_weight(path: Path, name: str, mode: str = "nan") -> bool:
    """Overwrite tensor `name` of the GGUF at `path` in place. Returns False when the file has no such tensor."""
    from gguf import GGMLQuantizationType as T

    from ..format.model_file import ModelFile
    with ModelFile(path, validate=False) as mf:
        if not mf.has(name):
            return False
        t = mf.info(name)
        values = None
        if mode == "scale":
            if t.qtype not in (T.F32, T.F16):
                raise ValueError(f"--corrupt-mode scale needs an F32 or F16 tensor; {name} is {t.qtype.name}")
            values = (np.asarray(mf.raw(name), np.float32) * np.float32(1.25)).astype(t.raw_dtype)
        offset, nbytes = t.offset, t.nbytes
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(values.tobytes() if values is not None else b"\xff" * nbytes)
    return True


# ---- engine checks ------------------------------------------------------------------------------------------------
def _ids(n_vocab: int, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_vocab, n)


def check_decode_matches_prefill(model, ctx: int, tol: float):
    ids = _ids(model.config.n_vocab, CONSISTENCY_L + 1, 11)
    s = model.new_session(ctx)
    whole = s.prefill(ids)
    s.reset()
    s.prefill(ids[:-1])
    step = s.decode(int(ids[-1]))
    r = rel_diff(whole, step)
    return within(r, tol), f"{fmt_rel(r)} at L = {CONSISTENCY_L}", f"{tol:g}"


def check_chunked_prefill(model, ctx: int, tol: float):
    ids = _ids(model.config.n_vocab, CONSISTENCY_L, 12)
    s = model.new_session(ctx)
    whole = s.prefill(ids, all_logits=True)
    s.reset()
    parts, start = [], 0
    for size in (5, 17, 1, 33, len(ids)):
        end = min(len(ids), start + size)
        if end > start:
            parts.append(s.prefill(ids[start:end], all_logits=True))
        start = end
    got = np.concatenate(parts)
    r = rel_diff(whole, got)
    return within(r, tol), f"{fmt_rel(r)} over {len(ids)} positions", f"{tol:g}"


def check_snapshot_restore(model, ctx: int, tol: float = RESTORE_TOL):
    ids = _ids(model.config.n_vocab, 48, 13)
    follow = _ids(model.config.n_vocab, 6, 14)
    s = model.new_session(ctx)
    s.prefill(ids)
    snap = s.snapshot()
    n0 = s.n_tokens
    first = [s.decode(int(t)) for t in follow]
    for t in _ids(model.config.n_vocab, 5, 15):          # move the state elsewhere before restoring
        s.decode(int(t))
    s.restore(snap)
    if s.n_tokens != n0 or list(s.tokens) != [int(t) for t in ids]:
        return False, f"n_tokens {s.n_tokens} after restore, expected {n0}", "exact"
    again = [s.decode(int(t)) for t in follow]
    r = max(rel_diff(a, b) for a, b in zip(first, again))
    return within(r, tol), f"{fmt_rel(r)} over {len(follow)} steps, token count restored", \
        f"{tol:g}"


def greedy_tokens(model, ids, steps: int, ctx: int) -> tuple[list[int], list[np.ndarray]]:
    s = model.new_session(ctx)
    lg = s.prefill(ids)
    toks, logits = [], []
    for _ in range(steps):
        t = int(np.argmax(lg))
        toks.append(t)
        logits.append(lg)
        lg = s.decode(t)
    return toks, logits


def check_backends_agree(ref, gpu, ctx: int, tol: float = TOL["cuda"]):
    ids = _ids(ref.config.n_vocab, CONSISTENCY_L, 16)
    a = ref.new_session(ctx).prefill(ids, all_logits=True)
    b = gpu.new_session(ctx).prefill(ids, all_logits=True)
    r = rel_diff(a, b)
    ta, la = greedy_tokens(ref, ids, GREEDY_STEPS, ctx)
    tb, _ = greedy_tokens(gpu, ids, GREEDY_STEPS, ctx)
    same = next((k for k in range(GREEDY_STEPS) if ta[k] != tb[k]), None)
    note = f"{GREEDY_STEPS} greedy tokens equal"
    ok_tokens = same is None
    if same is not None:
        top = np.sort(la[same])[-2:]
        margin = float((top[1] - top[0]) / np.abs(la[same]).max())
        ok_tokens = margin < tol
        note = (f"greedy tokens diverge at step {same} (reference top-2 margin {margin:.3g} x max|logit|"
                f"{', a near tie' if ok_tokens else ''})")
    return within(r, tol) and ok_tokens, f"prefill logits {fmt_rel(r)}; {note}", f"{tol:g}"


def engine_checks(runner: Runner, label: str, model, ctx: int) -> None:
    b = model.backend
    tol = TOL[b]
    runner.run(f"{label} [{b}] prefill(L+1) == prefill(L) + decode(1)",
               lambda: check_decode_matches_prefill(model, ctx, tol))
    runner.run(f"{label} [{b}] chunked prefill == whole prefill", lambda: check_chunked_prefill(model, ctx, tol))
    runner.run(f"{label} [{b}] snapshot/restore round trip", lambda: check_snapshot_restore(model, ctx))


def tiny_models(workdir: Path, corrupt: tuple[str, str] | None) -> list[tuple[str, Path]]:
    from ..format.config import ModelConfig
    from .make_model import tokenizer_fields, write_random_model
    n_vocab, _ = tokenizer_fields(None)
    out = []
    for experts, seed in (("q2", 1234), ("q4", 4321)):
        path = workdir / f"tiny-{experts}.gguf"
        write_random_model(path, ModelConfig.tiny(n_vocab), experts=experts, seed=seed)
        if corrupt:
            corrupt_weight(path, *corrupt)
        out.append((f"tiny-{experts}", path))
    return out


def run_tiny(runner: Runner, workdir: Path, groups: set[str], gpu: bool, corrupt) -> None:
    import ds4cupy
    try:
        models = tiny_models(workdir, corrupt)
    except Exception as e:  # noqa: BLE001
        runner.add(Verdict("tiny models", "FAIL", f"error generating them: {type(e).__name__}: {e}", ""))
        return
    ctx = 256
    for label, path in models:
        loaded = {}
        for backend in ("reference", "cuda"):
            if backend == "cuda" and not gpu:
                continue
            try:
                loaded[backend] = ds4cupy.load(path, backend=backend, progress=False)
            except Exception as e:  # noqa: BLE001
                runner.add(Verdict(f"{label} [{backend}] load", "FAIL", f"error: {type(e).__name__}: {e}", ""))
        try:
            if "tiny" in groups:
                for m in loaded.values():
                    engine_checks(runner, label, m, ctx)
            if "gpu" in groups:
                if not gpu:
                    runner.skip(f"{label} reference vs cuda", "no GPU")
                elif len(loaded) == 2:
                    runner.run(f"{label} reference vs cuda logits and greedy tokens",
                               lambda: check_backends_agree(loaded["reference"], loaded["cuda"], ctx))
        finally:
            for m in loaded.values():
                m.close()


# ---- transformers parity ------------------------------------------------------------------------------------------
def run_transformers(runner: Runner, workdir: Path, gpu: bool, corrupt, n_tokens: int = 120) -> None:
    try:
        import torch
        import transformers
        transformers.DeepseekV4ForCausalLM  # noqa: B018 - present from transformers 5.8.1
    except Exception as e:  # noqa: BLE001
        runner.skip("transformers parity", f"torch + transformers with DeepseekV4 not available "
                                            f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]})")
        return
    import ds4cupy
    from .convert import convert
    from .hf_oracle import random_tiny_model
    holder: dict = {}

    def prepare():
        hf = random_tiny_model()
        hf.save_pretrained(workdir / "hf")
        path = convert(workdir / "hf", workdir / "parity-f32.gguf", dtype="f32")
        if corrupt:
            corrupt_weight(path, *corrupt)
        ids = np.random.default_rng(10).integers(0, hf.config.vocab_size, n_tokens)
        with torch.no_grad():
            holder["expected"] = hf(torch.tensor(ids)[None]).logits[0].float().numpy()
        holder["ids"], holder["path"] = ids, path

    def parity(backend: str):
        m = ds4cupy.load(holder["path"], backend=backend, qat=False, progress=False)
        try:
            got = m.new_session(512).prefill(holder["ids"], all_logits=True)
        finally:
            m.close()
        r = rel_diff(holder["expected"], got)
        tol = PARITY_TOL[backend]
        return within(r, tol), f"{fmt_rel(r)} over {n_tokens} positions", f"{tol:g}"

    try:
        prepare()
    except Exception as e:  # noqa: BLE001
        runner.add(Verdict("transformers parity", "FAIL", f"error preparing: {type(e).__name__}: {e}", ""))
        return
    runner.run("transformers parity [reference, qat off]", lambda: parity("reference"))
    if gpu:
        runner.run("transformers parity [cuda, qat off]", lambda: parity("cuda"))


# ---- the real model's prompts ---------------------------------------------------------------------------------------
WORD_RE = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")


def coherence(text: str, tokenizer) -> dict:
    """The story rule's numbers: words, repeated word-4-gram rate, in-vocabulary word rate, and the verdict.

    repeat rate: the share of the text's word 4-grams (lower case) that already occurred earlier in it (a loop repeats
    them; normal prose almost never does). in-vocabulary: the share of words w for which " w" (as written, or lower
    case) is one token of the model's tokenizer, i.e. a word the tokenizer learned whole (gibberish splits).
    """
    words = WORD_RE.findall(text)
    grams = [tuple(w.lower() for w in words[i:i + 4]) for i in range(len(words) - 3)]
    seen, repeats = set(), 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    repeat_rate = repeats / len(grams) if grams else 1.0
    inv = 0
    for w in words:
        if any(len(tokenizer.encode(" " + v)) == 1 or len(tokenizer.encode(v)) == 1 for v in {w, w.lower()}):
            inv += 1
    vocab_rate = inv / len(words) if words else 0.0
    ok = len(words) >= MIN_WORDS and repeat_rate <= MAX_REPEAT_4GRAM and vocab_rate >= MIN_VOCAB_RATE
    return {"words": len(words), "repeat_4gram_rate": repeat_rate, "vocab_rate": vocab_rate, "ok": ok}


def answer(model, prompt: str, max_tokens: int, ctx: int) -> str:
    """Greedy, no thinking: the chat-encoded prompt, then the content of up to max_tokens tokens."""
    from ..text.chat import encode_messages
    from ..text.generate import Generator
    from ..text.sampling import SamplingParams
    tok = model.tokenizer
    ids = tok.encode(encode_messages([{"role": "user", "content": prompt}], "chat"))
    s = model.new_session(ctx)
    logits = s.prefill(ids)
    gen = Generator(tok, SamplingParams(temperature=0.0), max_tokens=max_tokens, thinking=False, parse_tools=False)
    out = gen.generate(s, logits)
    return (out["content"] or "") + (out["reasoning_content"] or "")


def run_prompts(runner: Runner, model, ctx: int, story_tokens: int = STORY_TOKENS) -> None:
    def contains(prompt: str, pattern: str, shown: str):
        text = answer(model, prompt, 8, ctx)
        ok = re.search(pattern, text, re.IGNORECASE) is not None
        return ok, f"answer {text.strip()[:80]!r}", f"contains {shown}"

    runner.run('prompt "What is 2+2? Answer in one word."',
               lambda: contains("What is 2+2? Answer in one word.", r"(?<!\d)4(?!\d)|\bfour\b", "4 or 'four'"))
    runner.run('prompt "What is the capital of France?"',
               lambda: contains("What is the capital of France?", r"\bparis\b", "Paris"))

    def story():
        text = answer(model, STORY_PROMPT, story_tokens, ctx)
        c = coherence(text, model.tokenizer)
        return c["ok"], (f"{c['words']} words, repeated 4-gram rate {c['repeat_4gram_rate']:.3f}, in-vocabulary "
                         f"word rate {c['vocab_rate']:.3f}; starts {text.strip()[:60]!r}"), \
            f">= {MIN_WORDS} words, <= {MAX_REPEAT_4GRAM}, >= {MIN_VOCAB_RATE}"
    runner.run(f"story ({story_tokens} tokens) coherence", story)


# ---- command line ---------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", metavar="MODEL", default=None,
                   help="a real DeepSeek-V4-Flash GGUF: adds ds4's verify prompts and the consistency checks on it")
    p.add_argument("--backend", choices=("auto", "reference", "cuda"), default="auto", help="-m: backend")
    p.add_argument("--ctx", type=int, default=4096, help="-m: session context (default 4096)")
    p.add_argument("--checks", default=",".join(CHECK_GROUPS), metavar="LIST",
                   help=f"check groups to run, comma separated (default: all of {','.join(CHECK_GROUPS)})")
    p.add_argument("--story-tokens", type=int, default=STORY_TOKENS, help="tokens of the story prompt (120)")
    p.add_argument("--corrupt-weight", metavar="NAME", default=None,
                   help="testing hook: corrupt tensor NAME in every model verify generates (see --corrupt-mode)")
    p.add_argument("--corrupt-mode", choices=("nan", "scale"), default="nan",
                   help="nan: fill with 0xFF bytes; scale: multiply an F32/F16 tensor by 1.25 (default nan)")
    p.add_argument("--workdir", default=None, help="keep the generated models in this directory")
    p.add_argument("--json-out", default=None, metavar="FILE", help="also write the verdicts as JSON")


def main(args: argparse.Namespace) -> int:
    groups = {g.strip() for g in args.checks.split(",") if g.strip()}
    bad = groups - set(CHECK_GROUPS)
    if bad:
        print(f"error: unknown check group(s) {', '.join(sorted(bad))}; expected {', '.join(CHECK_GROUPS)}",
              file=sys.stderr)
        return 2
    from ..engines import gpu_available
    gpu = gpu_available()
    corrupt = (args.corrupt_weight, args.corrupt_mode) if args.corrupt_weight else None
    runner = Runner()
    t0 = time.perf_counter()
    tmp = None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="ds4cupy-verify-")
        workdir = Path(tmp)
    print(f"ds4cupy verify: {'GPU present' if gpu else 'no GPU (cuda checks are skipped)'}; checks "
          f"{','.join(g for g in CHECK_GROUPS if g in groups)}"
          + (f"; corrupting {args.corrupt_weight} ({args.corrupt_mode})" if corrupt else ""), flush=True)
    try:
        if groups & {"tiny", "gpu"}:
            run_tiny(runner, workdir, groups, gpu, corrupt)
        if "transformers" in groups:
            run_transformers(runner, workdir, gpu, corrupt)
        if args.model:
            import ds4cupy
            try:
                model = ds4cupy.load(args.model, backend=args.backend)
            except Exception as e:  # noqa: BLE001
                runner.add(Verdict(f"load {args.model}", "FAIL", f"error: {type(e).__name__}: {e}", ""))
                model = None
            if model is not None:
                try:
                    if "prompts" in groups:
                        run_prompts(runner, model, args.ctx, args.story_tokens)
                    if "tiny" in groups:
                        engine_checks(runner, Path(args.model).name, model, args.ctx)
                finally:
                    model.close()
        elif "prompts" in groups:
            runner.skip("real-model prompts", "no -m MODEL given")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    n = len(runner.verdicts)
    counts = {s: sum(v.status == s for v in runner.verdicts) for s in ("PASS", "FAIL", "SKIP")}
    verdict = "FAIL" if counts["FAIL"] else "PASS"
    print(f"{verdict}: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped of {n} checks "
          f"in {time.perf_counter() - t0:.1f} s")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({
            "verdict": verdict, "counts": counts, "gpu": gpu, "model": args.model,
            "corrupt": {"name": args.corrupt_weight, "mode": args.corrupt_mode} if corrupt else None,
            "checks": [asdict(v) for v in runner.verdicts]}, indent=2) + "\n")
    return 1 if counts["FAIL"] else 0


__all__ = ["Verdict", "coherence", "corrupt_weight", "rel_diff", "main", "add_arguments"]

