"""Mutation smoke run: does the CPU suite notice plausible one-line bugs?

A fixed list of one-line mutations over five modules (the NumPy reference, the numerics, the chat encoder, the
server protocol and the GGUF reader). For each mutation the tree is copied once to a temporary directory (next to a
link to ../shared, so data-dependent tests run as usual), the one line is changed there, the tests that guard that
module run with `pytest -x`, and the line is restored. A mutation is KILLED when pytest fails (or the run hangs past
--timeout), SURVIVED when every test still passes. Before the mutations, the same tests run on the unchanged copy and
must pass (otherwise the score would mean nothing).

    python scripts/mutation_smoke.py                    # all mutations, the tests of this checkout
    python scripts/mutation_smoke.py --root OTHER_TREE  # the same mutations against another tree's tests
    python scripts/mutation_smoke.py --only R04,N03     # a few
    python scripts/mutation_smoke.py --list             # what the mutations are
    python scripts/mutation_smoke.py --check            # every mutation still applies (its line occurs once)

Prints one line per mutation and the score (killed / total); --json-out writes the details. The whole run takes
about an hour on two CPU cores shared with other work (the reference mutations run the transformers parity
tests).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

REFERENCE = "ds4cupy/engines/reference.py"
NUMERICS = "ds4cupy/engines/numerics.py"
CHAT = "ds4cupy/text/chat.py"
PROTOCOL = "ds4cupy/server/protocol.py"
VALIDATION = "ds4cupy/server/validation.py"     # protocol.py's shared field readers, moved out of it
MODEL_FILE = "ds4cupy/format/model_file.py"

# The tests that guard each module, fastest first (pytest -x stops at the first failure). Files missing from the
# tree under test are left out, so the same list serves older trees. The real-vocabulary parity run is left out: it
# takes longer than all the rest and covers the same code paths as the small-vocabulary one.
ENGINE_TESTS = ["tests/test_numerics.py", "tests/test_reference_paths.py", "tests/test_reference.py",
                "tests/test_transformers_parity.py"]
DESELECT = ["tests/test_transformers_parity.py::test_reference_matches_transformers[real-vocab]"]
TESTS = {
    REFERENCE: ENGINE_TESTS,
    NUMERICS: ENGINE_TESTS,
    CHAT: ["tests/test_chat.py"],
    PROTOCOL: ["tests/test_server_protocol.py", "tests/test_server_fake_engine.py", "tests/test_server_api.py"],
    VALIDATION: ["tests/test_server_protocol.py", "tests/test_server_fake_engine.py", "tests/test_server_api.py"],
    MODEL_FILE: ["tests/test_model_file.py", "tests/test_make_model.py"],
}


@dataclass(frozen=True)
class Mutant:
    id: str
    path: str
    old: str        # must occur exactly once in the file
    new: str
    what: str
    # the same bug where the code has been rewritten or moved since: (old, new) in the same file, or (path, old, new)
    alt: tuple | None = None

    def edit(self, root: Path) -> tuple[str, str, str] | None:
        """(path, old, new) of the edit that applies under `root` (its old text occurs exactly once), or None."""
        alt = self.alt if self.alt is None or len(self.alt) == 3 else (self.path, *self.alt)
        for path, old, new in ((self.path, self.old, self.new), alt or (None, None, None)):
            if path is not None and (root / path).is_file() \
                    and (root / path).read_text(encoding="utf-8").count(old) == 1:
                return path, old, new
        return None


M = Mutant
MUTANTS = [
    # ---- reference.py: the forward ------------------------------------------------------------------------------
    M("R01", REFERENCE, "return silu(np.minimum(g, lim)) * np.clip(u, -lim, lim)", "return silu(g) * u",
      "SwiGLU clamp deleted"),
    M("R02", REFERENCE, "return silu(np.minimum(g, lim)) * np.clip(u, -lim, lim)",
      "return silu(np.minimum(g, lim)) * u", "SwiGLU clamp on the gate only"),
    M("R03", REFERENCE, 'top = np.argsort(-score[t], kind="stable")[:k]',
      'top = np.argsort(score[t], kind="stable")[::-1][:k]', "indexer ties: highest index wins"),
    M("R04", REFERENCE, "kv[..., :nope] = fp8_sim(kv[..., :nope], 64)", "kv[..., -nope:] = fp8_sim(kv[..., -nope:], 64)",
      "FP8 QAT on the trailing dims (rope dims rounded, leading nope dims not)"),
    M("R05", REFERENCE, "return fp4_sim(hadamard(v), 32) if self.qat else v", "return fp4_sim(v, 32) if self.qat else v",
      "indexer FP4 without the Hadamard rotation"),
    M("R06", REFERENCE, "qi = self._qat_index(qi)", "qi = qi", "indexer queries not QAT-rounded"),
    M("R07", REFERENCE, "(win_pos[None, :] > pos[:, None] - c.sliding_window)",
      "(win_pos[None, :] >= pos[:, None] - c.sliding_window)", "window one row too wide"),
    M("R08", REFERENCE, "visible = np.arange(n_comp)[None, :] < ((pos + 1) // ratio)[:, None]",
      "visible = np.arange(n_comp)[None, :] <= ((pos + 1) // ratio)[:, None]", "a compressed row seen one window early"),
    M("R09", REFERENCE, "st.cur_score.append(score[i] + ape[p % ratio])",
      "st.cur_score.append(score[i] + ape[(p + 1) % ratio])", "compressor position bias off by one"),
    M("R10", REFERENCE, "wpos = p + 1 - ratio", "wpos = p", "compressed row roped at its last position"),
    M("R11", REFERENCE, "prev_kv, prev_sc = st.prev_kv[:, :d], st.prev_score[:, :d]",
      "prev_kv, prev_sc = st.prev_kv[:, d:], st.prev_score[:, d:]", "overlap half taken from the wrong side"),
    M("R12", REFERENCE, "denom = e.sum(axis=-1) + np.exp(sink[None, :] - m)", "denom = e.sum(axis=-1)",
      "attention sink dropped"),
    M("R13", REFERENCE, "o = rope_apply(o, cos, sin, inverse=True)", "o = rope_apply(o, cos, sin, inverse=False)",
      "output de-rotation in the wrong direction"),
    M("R14", REFERENCE, "wsel = wsel / wsel.sum(axis=-1, keepdims=True)", "wsel = wsel",
      "routing weights not normalised"),
    M("R15", REFERENCE, 'np.einsum("sjk,sjd->skd", comb, X, dtype=F64)', 'np.einsum("skj,sjd->skd", comb, X, dtype=F64)',
      "hc_post mixing transposed"),
    M("R16", REFERENCE, "pre = sigmoid(m * w(\"output_hc_scale.weight\")[0] + w(\"output_hc_base.weight\")) + c.hc_eps",
      "pre = sigmoid(m * w(\"output_hc_scale.weight\")[0] + w(\"output_hc_base.weight\"))", "hc_head eps dropped"),
    M("R17", REFERENCE, "np.maximum(np.einsum(\"shd,cd->shc\", qi, st.index_kv, dtype=F64), 0.0)",
      "np.einsum(\"shd,cd->shc\", qi, st.index_kv, dtype=F64)", "indexer ReLU dropped"),
    M("R18", REFERENCE, "return sel, (wsel * c.expert_weights_scale).astype(F32)", "return sel, wsel.astype(F32)",
      "routed scaling factor dropped"),
    M("R19", REFERENCE, "sel = np.argsort(-biased, axis=-1, kind=\"stable\")[:, : c.n_expert_used]",
      "sel = np.argsort(-sc, axis=-1, kind=\"stable\")[:, : c.n_expert_used]", "router bias ignored in selection"),
    M("R20", REFERENCE, "if (p + 1) % ratio:", "if p % ratio:", "compressor emits one token early"),
    # ---- numerics.py ----------------------------------------------------------------------------------------------
    M("N01", NUMERICS, "for _ in range(iters - 1):", "for _ in range(iters - 2):", "one Sinkhorn iteration too few"),
    M("N02", NUMERICS, "e = np.maximum(e, -6.0)", "e = np.maximum(e, -7.0)", "e4m3 subnormal binade off by one"),
    M("N03", NUMERICS, "return np.round(x / step) * step", "return np.floor(x / step + 0.5) * step",
      "e4m3 ties rounded up instead of to even"),
    M("N04", NUMERICS, "s = np.exp2(np.ceil(np.log2(amax / 448.0)))", "s = np.exp2(np.round(np.log2(amax / 448.0)))",
      "FP8 block scale rounded to nearest instead of up"),
    M("N05", NUMERICS, "pick_hi = (dh < dl) | ((dh == dl) & (hi % 2 == 0))", "pick_hi = dh <= dl",
      "e2m1 ties rounded up"),
    M("N06", NUMERICS, "s = np.exp2(np.ceil(np.log2(amax / 6.0)))", "s = np.exp2(np.ceil(np.log2(amax / 4.0)))",
      "FP4 scale for the wrong grid maximum"),
    M("N07", NUMERICS, "y[:, :, 0, :], y[:, :, 1, :] = a + b, a - b", "y[:, :, 0, :], y[:, :, 1, :] = a + b, b - a",
      "Hadamard butterfly sign"),
    M("N08", NUMERICS, "return f / factor * ramp + f * (1.0 - ramp)", "return f * ramp + f / factor * (1.0 - ramp)",
      "YaRN blend reversed"),
    M("N09", NUMERICS, "y[..., -n_rot + 1::2] = a * s + b * c", "y[..., -n_rot + 1::2] = a * s - b * c",
      "RoPE second component sign"),
    M("N10", NUMERICS, "pre = 1.0 / (1.0 + np.exp(-(mix[..., :n] * scale[0] + base[:n]))) + eps",
      "pre = 1.0 / (1.0 + np.exp(-(mix[..., :n] * scale[1] + base[:n]))) + eps", "mHC pre uses the post scale"),
    M("N11", NUMERICS, "post = 2.0 / (1.0 + np.exp(-(mix[..., n:2 * n] * scale[1] + base[n:2 * n])))",
      "post = 1.0 / (1.0 + np.exp(-(mix[..., n:2 * n] * scale[1] + base[n:2 * n])))", "mHC post not doubled"),
    M("N12", NUMERICS, "c = c / (c.sum(axis=-2, keepdims=True) + eps)\n    for",
      "c = c / (c.sum(axis=-1, keepdims=True) + eps)\n    for", "first Sinkhorn column step normalises rows"),
    # ---- chat.py ---------------------------------------------------------------------------------------------------
    M("C01", CHAT, "if role in _ALWAYS_KEPT_ROLES or i >= last_user:", "if role in _ALWAYS_KEPT_ROLES or i > last_user:",
      "thinking mode drops a developer message that is the last turn"),
    M("C02", CHAT, "if messages[i].get(\"role\") in (\"user\", \"developer\"):", "if messages[i].get(\"role\") == \"user\":",
      "a developer turn does not count as the last user turn"),
    M("C03", CHAT, "ordered = iter(sorted(results, key=lambda b: order.get(b.get(\"tool_use_id\", \"\"), 0)))",
      "ordered = iter(results)", "tool results kept in arrival order"),
    M("C04", CHAT, "msg.pop(\"reasoning_content\", None)", "msg.get(\"reasoning_content\", None)",
      "old reasoning not dropped"),
    M("C05", CHAT, "effective_drop = drop_thinking and not any(m.get(\"tools\") for m in full)",
      "effective_drop = drop_thinking", "reasoning dropped even with tools"),
    M("C06", CHAT, "if index == 0 and thinking_mode == \"thinking\" and reasoning_effort == \"max\":",
      "if index == 0 and reasoning_effort == \"max\":", "Think-Max preamble in chat mode too"),
    M("C07", CHAT, "return json.dumps(value, ensure_ascii=False)", "return json.dumps(value)",
      "tool JSON escapes non-ASCII"),
    M("C08", CHAT, "(THINK_START if thinking_mode == \"thinking\" else THINK_END)",
      "(THINK_END if thinking_mode == \"thinking\" else THINK_START)", "action task marker swapped"),
    M("C09", CHAT, "{\"true\" if is_str else \"false\"}", "{\"false\" if is_str else \"true\"}",
      "DSML string flag swapped"),
    M("C10", CHAT, "if not msg.get(\"wo_eos\", False):", "if msg.get(\"wo_eos\", False):", "assistant turn without EOS"),
    M("C11", CHAT, "if add_default_bos_token and not context_msgs else", "if add_default_bos_token else",
      "BOS written after a context"),
    M("C12", CHAT, "    return \"\\n\\n\".join(parts)\n\n\ndef _render_message",
      "    return \"\\n\".join(parts)\n\n\ndef _render_message", "user-turn parts joined by one newline",
      alt=("        if k:\n            parts.append(_t(\"\\n\\n\"))", "        if k:\n            parts.append(_t(\"\\n\"))")),
    # ---- protocol.py -----------------------------------------------------------------------------------------------
    M("P01", PROTOCOL, "for name in (\"max_tokens\", \"max_completion_tokens\"):",
      "for name in (\"max_completion_tokens\", \"max_tokens\"):", "max_tokens wins over max_completion_tokens"),
    M("P02", PROTOCOL, "        if value <= 0:\n            raise invalid(f\"'{name}' must be >= 1",
      "        if value < 0:\n            raise invalid(f\"'{name}' must be >= 1", "max_tokens 0 accepted"),
    M("P03", PROTOCOL, "top_p=_optional_number(body, \"top_p\", DEFAULT_TOP_P, 0.0, 1.0, low_open=True)",
      "top_p=_optional_number(body, \"top_p\", DEFAULT_TOP_P, 0.0, 1.0)", "top_p 0 accepted"),
    M("P04", PROTOCOL, "seed=None if seed is None else seed % 2**64", "seed=None if seed is None else abs(seed)",
      "negative seeds folded by abs"),
    M("P05", PROTOCOL, "think_max = effort == \"max\" and ctx >= THINK_MAX_MIN_CTX",
      "think_max = effort == \"max\" and ctx > THINK_MAX_MIN_CTX", "Think Max needs one token more context",
      alt=(VALIDATION, "think_max = effort == \"max\" and ctx >= THINK_MAX_MIN_CTX",
           "think_max = effort == \"max\" and ctx > THINK_MAX_MIN_CTX")),
    M("P06", PROTOCOL, "thinking=select_thinking(body, model, ctx, default=model == THINKING_ALIAS)",
      "thinking=select_thinking(body, model, ctx)", "completions think by default"),
    M("P07", PROTOCOL, "if len(value) > MAX_STOP_STRINGS:", "if len(value) >= MAX_STOP_STRINGS:",
      "the 16th stop string refused"),
    M("P08", PROTOCOL, "{\"index\": 0, \"text\": text, \"logprobs\": None, \"finish_reason\": finish_reason}, include_usage)",
      "{\"index\": 0, \"text\": text, \"logprobs\": None, \"finish_reason\": None}, include_usage)",
      "streamed completions never carry finish_reason",
      alt=("{\"index\": 0, \"text\": text, \"logprobs\": None, \"finish_reason\": finish_reason, **(extras or {})},\n"
           "                  include_usage)",
           "{\"index\": 0, \"text\": text, \"logprobs\": None, \"finish_reason\": None, **(extras or {})},\n"
           "                  include_usage)")),
    M("P09", PROTOCOL, "\"total_tokens\": prompt_tokens + completion_tokens,", "\"total_tokens\": completion_tokens,",
      "usage total wrong"),
    M("P10", PROTOCOL, "message: dict[str, Any] = {\"role\": \"assistant\", \"content\": content if (content or not tool_calls) else None}",
      "message: dict[str, Any] = {\"role\": \"assistant\", \"content\": content}", "empty content with tool calls not null"),
    M("P11", PROTOCOL, "        return \"\".join(texts)\n    raise invalid", "        return \" \".join(texts)\n    raise invalid",
      "content parts joined by spaces"),
    M("P12", PROTOCOL, "return isinstance(value, int) and not isinstance(value, bool)", "return isinstance(value, int)",
      "booleans accepted as integers", alt=(VALIDATION, "return isinstance(value, int) and not isinstance(value, bool)",
                                             "return isinstance(value, int)")),
    M("P13", PROTOCOL, "        enabled = effort != \"none\"", "        enabled = effort not in (\"none\", \"minimal\")",
      "reasoning_effort minimal turns thinking off",
      alt=(VALIDATION, "        enabled = effort != \"none\"", "        enabled = effort not in (\"none\", \"minimal\")")),
    # ---- model_file.py ---------------------------------------------------------------------------------------------
    M("F01", MODEL_FILE, "int(ids.max()) >= cfg.n_expert", "int(ids.max()) > cfg.n_expert", "tid2eid id == n_expert accepted"),
    M("F02", MODEL_FILE, "if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= cfg.n_expert):",
      "if ids.size and int(ids.max()) >= cfg.n_expert:", "negative tid2eid ids accepted"),
    M("F03", MODEL_FILE, "if t.offset + t.nbytes > self.file_size:", "if t.offset + t.nbytes > self.file_size + 32:",
      "truncation check with slack"),
    M("F04", MODEL_FILE, "if t.shape[-1] % block:", "if t.shape[-1] < block:", "partial blocks accepted"),
    M("F05", MODEL_FILE, "if gate.qtype != up.qtype:", "if gate.qtype != up.qtype and up.qtype != T.Q4_K:",
      "a Q4_K up tensor accepted next to any gate type"),
    M("F06", MODEL_FILE, "        for il in range(cfg.n_layer):\n            gate, up",
      "        for il in range(cfg.n_layer - 1):\n            gate, up", "the last layer's experts not checked"),
]


def copy_tree(root: Path, dest: Path) -> Path:
    """Copy the package, the tests and pyproject to dest/<root name>, and link dest/shared to root's ../shared."""
    work = dest / root.name
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in ("ds4cupy", "tests", "scripts"):
        if (root / name).is_dir():
            shutil.copytree(root / name, work / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        if (root / name).is_file():
            shutil.copy2(root / name, work / name)
    shared = root.parent / "shared"
    if shared.is_dir():
        (dest / "shared").symlink_to(shared)
    return work


def run_tests(work: Path, tests: list[str], timeout: float) -> tuple[str, float, str]:
    """('pass' | 'fail' | 'timeout' | 'error', seconds, the first failing test and pytest's summary line)."""
    env = dict(os.environ, PYTHONPATH=str(work), PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    deselect = [arg for d in DESELECT for arg in ("--deselect", d)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *deselect, *tests],
                           cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - t0, f"no result after {timeout:.0f} s"
    lines = [ln for ln in p.stdout.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else p.stderr.strip()[-200:]
    failed = [ln.split()[1] for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
    if failed:
        last = f"{failed[0]}; {last}"          # the test that caught it
    status = {0: "pass", 1: "fail", 2: "fail"}.get(p.returncode, "error")   # 2: collection error
    return status, time.perf_counter() - t0, last


def apply(work: Path, m: Mutant) -> tuple[str, str]:
    """(the mutated file's path, its original text); the mutated text is written in its place."""
    path, old, new = m.edit(work)
    text = (work / path).read_text(encoding="utf-8")
    (work / path).write_text(text.replace(old, new), encoding="utf-8")
    return path, text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=REPO, help="the tree whose tests are scored (default: this checkout)")
    ap.add_argument("--only", default="", help="comma-separated mutation ids")
    ap.add_argument("--list", action="store_true", help="print the mutations and exit")
    ap.add_argument("--check", action="store_true", help="check that every mutation applies, run nothing")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per test run (a hang counts as killed)")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args(argv)
    root = args.root.resolve()
    chosen = [m for m in MUTANTS if not args.only or m.id in args.only.split(",")]
    if args.list:
        for m in chosen:
            print(f"{m.id}  {m.path:32s} {m.what}")
        return 0
    for m in chosen:
        if m.edit(root) is None:
            print(f"{m.id}: the line to mutate does not occur exactly once in {m.path}: {m.old!r}", file=sys.stderr)
            return 2
    if args.check:
        print(f"all {len(chosen)} mutations apply to {root}")
        return 0

    results = []
    with tempfile.TemporaryDirectory(prefix="ds4cupy-mutants-") as tmp:
        work = copy_tree(root, Path(tmp))
        tests_of = {p: [t for t in ts if (work / t).is_file()] for p, ts in TESTS.items()}
        for path in sorted({m.edit(work)[0] for m in chosen}):
            status, secs, last = run_tests(work, tests_of[path], args.timeout)
            print(f"baseline {path}: {status} in {secs:.0f} s ({last})", flush=True)
            if status != "pass":
                print("the unmutated tests must pass first", file=sys.stderr)
                return 2
        for m in chosen:
            path, original = apply(work, m)
            try:
                status, secs, last = run_tests(work, tests_of[path], args.timeout)
            finally:
                (work / path).write_text(original, encoding="utf-8")
            verdict = {"pass": "SURVIVED", "fail": "KILLED", "timeout": "KILLED"}.get(status, "ERROR")
            results.append({"id": m.id, "path": path, "what": m.what, "verdict": verdict, "seconds": round(secs, 1),
                            "tests": tests_of[path], "last_line": last})
            print(f"{m.id} {verdict:8s} {secs:6.1f} s  {m.what}  [{last}]", flush=True)
    killed = sum(r["verdict"] == "KILLED" for r in results)
    errors = sum(r["verdict"] == "ERROR" for r in results)
    print(f"\nscore: {killed}/{len(results)} killed ({100 * killed / max(len(results), 1):.0f} %)"
          + (f", {errors} errors (pytest could not run: counted as not killed)" if errors else "")
          + "; survived: " + (", ".join(r["id"] for r in results if r["verdict"] == "SURVIVED") or "none"))
    if args.json_out:
        args.json_out.write_text(json.dumps({"root": str(root), "killed": killed, "total": len(results),
                                             "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
