"""A replayed coding-agent session against the real tiny model (reference backend), through the official SDKs.

Two agents interleave, as a main agent and its subagent do: the main one speaks Anthropic Messages (thinking off, as
Claude Code), the subagent OpenAI Responses (thinking on, stateless, as Codex); both send the same system prompt +
tools of more than 2K tokens (their roles are in their first user message), and 8 turns of recorded tool calls and
tool results, every request resending the whole history. The subagent's first request continues from the main
agent's checkpoint where its user turn starts; from turn 2 on every request must prefill only the tokens after its
agent's previous prompt (the longest cached prefix; the other agent ran in between), checked on the engine's
prefilled-token counter and on the usage the API reports; after a server restart with the same --kv-cache-dir the
states come from disk. A history edited at token p re-prefills at most prompt - p + N tokens (N: the checkpoint
interval).

Run with `-s` to see the per-turn table.
"""
from __future__ import annotations

import json

import pytest

import anthropic  # test extra: missing is an error, not a skip
import openai

import ds4cupy
from ds4cupy.server import BackgroundServer, ServerSettings, create_app
from ds4cupy.server import anthropic as anthropic_protocol
from ds4cupy.server import responses as responses_protocol
from ds4cupy.server.kv_disk import DiskStore
from ds4cupy.server.prefix_cache import PrefixCache
from ds4cupy.server.serving import render_chat_prompt

pytestmark = pytest.mark.usefixtures("one_blas_thread")

CTX = 4096
N = 256                    # checkpoint interval (fixed here: the positions the bounds below assume)
TURNS = 8
RESTART_AFTER = 4
TIMEOUT = 120.0

PREAMBLE = "You are a coding agent working in a git repository on behalf of the user.\n" + "\n".join(
    f"Rule {i}: {text}" for i, text in enumerate(([
        "read a file before you edit it, and quote the lines you change",
        "run the tests that cover the code you touched, then the whole suite before you finish",
        "never commit secrets, generated files or large binaries",
        "prefer small, reviewable changes with clear commit messages",
        "when a command fails, read its output and fix the cause, do not retry blindly",
        "keep the user informed with one short sentence before each tool call",
        "ask before deleting files or rewriting history",
        "match the style of the surrounding code: names, comments, formatting",
    ] * 2)[:13])) + "\n"
TASKS = {"main": "You plan the work and delegate searches to a subagent. Add a --verbose flag to the CLI and test it.",
         "sub": "You are a subagent: report findings briefly. Find where the CLI parses its flags."}
TOOL_SPECS = [
    ("read_file", "Read a text file of the repository and return its lines with line numbers.",
     {"path": "path relative to the repository root", "offset": "first line to return", "limit": "lines"}),
    ("write_file", "Replace the whole content of a file; creates parent folders when needed.",
     {"path": "path relative to the repository root", "content": "the new content of the file"}),
    ("edit_file", "Replace one exact occurrence of old_text by new_text in a file; fails if absent or ambiguous.",
     {"path": "path of the file", "old_text": "text to replace", "new_text": "replacement text"}),
    ("run_command", "Run a shell command in the repository root and return its exit status, stdout and stderr.",
     {"command": "the command line", "timeout": "seconds before it is killed"}),
    ("search_code", "Search the repository for a regular expression and list matching lines with their files.",
     {"pattern": "a regular expression", "glob": "only files matching this glob"}),
    ("list_dir", "List the entries of a folder with their sizes and types, folders first.",
     {"path": "folder path", "depth": "levels to descend"}),
]
TOOLS = [{"name": name, "description": desc, "input_schema": {
    "type": "object", "properties": {k: {"type": "string", "description": v} for k, v in props.items()},
    "required": list(props)[:1]}} for name, desc, props in TOOL_SPECS]
FUNCTIONS = [{"type": "function", "name": t["name"], "description": t["description"], "parameters": t["input_schema"]}
             for t in TOOLS]


def recorded_turn(agent: str, t: int) -> tuple[str, str, dict, str]:
    """(assistant text, tool, input, tool result) of turn t: a recorded session, replayed."""
    name, _, props = TOOL_SPECS[(t + (agent == "sub")) % len(TOOL_SPECS)]
    key = list(props)[0]
    args = {key: f"src/{agent}_{t}.py" if key == "path" else f"{key} {t}"}
    return f"Turn {t}: {name}.", name, args, f"{name} output, turn {t}, {agent} agent"


def main_body(turns: int, edit: tuple[int, str] | None = None) -> dict:
    """The Anthropic request of the main agent after `turns` recorded turns (edit: (turn, new tool result))."""
    messages = [{"role": "user", "content": TASKS["main"]}]
    for t in range(turns):
        text, tool, args, result = recorded_turn("main", t)
        if edit is not None and edit[0] == t:
            result = edit[1]
        messages.append({"role": "assistant", "content": [{"type": "text", "text": text}, {
            "type": "tool_use", "id": f"toolu_{t:02d}", "name": tool, "input": args}]})
        messages.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"toolu_{t:02d}",
                                                      "content": result}]})
    return {"model": "deepseek-v4-flash", "max_tokens": 1, "system": PREAMBLE, "tools": TOOLS, "messages": messages}


def sub_body(turns: int) -> dict:
    """The Responses request of the subagent after `turns` recorded turns (stateless: the whole history)."""
    items = [{"role": "user", "content": TASKS["sub"]}]
    for t in range(turns):
        text, tool, args, result = recorded_turn("sub", t)
        items += [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]},
                  {"type": "function_call", "call_id": f"call_{t:02d}", "name": tool, "arguments": json.dumps(args)},
                  {"type": "function_call_output", "call_id": f"call_{t:02d}", "output": result}]
    return {"model": "deepseek-v4-flash", "max_output_tokens": 1, "instructions": PREAMBLE, "tools": FUNCTIONS,
            "input": items, "store": False}


def prompt_ids(tokenizer, agent: str, body: dict) -> list[int]:
    """The prompt the server builds for a body: the same protocol mapping and chat encoding, tokenized."""
    if agent == "main":
        req = anthropic_protocol.parse_messages_request(body, ctx=CTX)
    else:
        req = responses_protocol.parse_responses_request(body, ctx=CTX)
    return tokenizer.encode_parts(render_chat_prompt(req.messages, req.offered_tools, req.thinking))


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class Agents:
    """A server (model, fresh session, prefix cache over `cache_dir`) and the two SDK clients."""

    def __init__(self, model, cache_dir):
        self.session = model.new_session(ctx=CTX)
        cache = PrefixCache(model.state_identity, disk=DiskStore(cache_dir, model.state_identity),
                            disk_bytes=1 << 30, checkpoint_tokens=N)
        self.server = BackgroundServer(create_app(model.tokenizer, self.session, ServerSettings(ctx=CTX),
                                                  prefix_cache=cache)).start()
        self.cache = cache
        self.claude = anthropic.Anthropic(base_url=self.server.url, api_key="x", timeout=TIMEOUT, max_retries=0)
        self.oai = openai.OpenAI(base_url=self.server.url + "/v1", api_key="x", timeout=TIMEOUT, max_retries=0)

    def send(self, agent: str, body: dict) -> tuple[int, int, int]:
        """(prompt tokens, cached tokens, prefilled tokens by the engine's counter) of one request."""
        before = self.session.prefilled_tokens
        if agent == "main":
            u = self.claude.messages.create(**body, extra_body={"temperature": 0}).usage
            prompt, cached = u.input_tokens + u.cache_read_input_tokens, u.cache_read_input_tokens
        else:
            u = self.oai.responses.create(**body, temperature=0).usage
            prompt, cached = u.input_tokens, u.input_tokens_details.cached_tokens
        return prompt, cached, self.session.prefilled_tokens - before

    def stop(self):
        self.server.stop()
        self.cache.close()


@pytest.fixture(scope="module")
def model():
    from ds4cupy.tools.demo import demo_model_path
    m = ds4cupy.load(demo_model_path(), backend="reference")
    yield m
    m.close()


def test_replayed_agent_loop_prefills_only_new_tokens(model, tmp_path):
    tok = model.tokenizer
    bodies = {"main": [main_body(t) for t in range(TURNS)], "sub": [sub_body(t) for t in range(TURNS)]}
    ids = {a: [prompt_ids(tok, a, b) for b in bodies[a]] for a in bodies}
    head = ids["main"][0].index(tok.special_id("<｜User｜>"))           # BOS + system prompt + tools
    assert head >= 2000, "system prompt + tools must be at least 2K tokens"
    # both APIs render the same system prompt and tools to the same tokens, up to where the user turn starts
    assert common_prefix(ids["main"][0], ids["sub"][0]) > head

    rows = []
    agents = Agents(model, tmp_path)
    try:
        for t in range(TURNS):
            if t == RESTART_AFTER:             # restart: new server, session and cache; states only on disk
                agents.stop()
                assert len(list(tmp_path.glob("*.kv"))) > 0
                agents = Agents(model, tmp_path)
                assert agents.cache.stats()["entries_disk"] > 0 and agents.cache.stats()["entries_memory"] == 0
            for agent in ("main", "sub"):
                prompt, cached, prefilled = agents.send(agent, bodies[agent][t])
                want = ids[agent][t]
                assert prompt == len(want)                 # the test tokenizes exactly as the server does
                if t == 0:                             # the sub: the main's checkpoint where its user turn starts
                    expect = head + 1 if agent == "sub" else 0
                else:
                    expect = len(ids[agent][t - 1])       # its own previous prompt, whole
                    assert want[:expect] == ids[agent][t - 1]
                rows.append((t + 1, agent, prompt, cached, prefilled))
                assert cached == expect and prefilled == prompt - cached, rows[-1]
        hits = agents.cache.stats()
        assert hits["hit_disk"] == 2 and hits["hit_memory"] >= 2 * (TURNS - RESTART_AFTER - 1)

        # an edit in the middle of the main agent's history: re-prefill from the checkpoint before it
        edited = main_body(TURNS - 1, edit=(TURNS - 3, "this tool result was edited by the user"))
        edited_ids = prompt_ids(tok, "main", edited)
        p = common_prefix(edited_ids, ids["main"][-1])
        assert 0 < p < len(edited_ids) - 50
        prompt, cached, prefilled = agents.send("main", edited)
        rows.append(("edit", "main", prompt, cached, prefilled))
        assert prompt == len(edited_ids) and prefilled == prompt - cached
        assert prompt - p <= prefilled <= prompt - p + N, (p, rows[-1])
    finally:
        agents.stop()
    print(f"\nreplayed agent loop (N={N}, restart after turn {RESTART_AFTER}; edit at token {p}):")
    print(f"{'turn':>5} {'agent':>5} {'prompt':>7} {'cached':>7} {'prefilled':>9}")
    for row in rows:
        print(f"{row[0]:>5} {row[1]:>5} {row[2]:>7} {row[3]:>7} {row[4]:>9}")
