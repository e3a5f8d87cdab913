"""Generator: the decode loop shared by `run`, the server, bench and verify.

    gen = Generator(tokenizer, SamplingParams(...), max_tokens=256, stop=["..."], thinking=True, parse_tools=True)
    logits = session.prefill(prompt_ids)
    for d in gen.stream(session, logits):
        d.token_id, d.text, d.reasoning, d.content, d.tool_calls, d.finish_reason

Per step: sample a token from the current logits, turn it into text (IncrementalDecoder: never half a UTF-8
character), hold back text that could be the start of a stop string, feed the rest to the OutputParser (reasoning /
content / DSML tool calls), yield one GenerationDelta, and only then, if generation goes on, call
session.decode(token) for the next logits.

What the session holds afterwards: the prompt plus every generated token except the last one,
i.e. `session.tokens == prompt_ids + gen.completion_tokens[:-1]`. The last sampled token (the EOS, the token that
completed a stop string, or the max_tokens-th token) is never decoded: nothing needs its logits. To extend the
conversation, prefill `completion_tokens[-1:]` plus the next turn's ids on top (see `ds4cupy.tools.run_cli`). If the
session's context fills up, generation ends with "length" before a decode would overflow it (then every generated
token but the last is in the session as well).

finish_reason (on the last delta only): "stop" (EOS or a stop string), "tool_calls" (EOS or stop after at least one
complete tool call), "length" (max_tokens or the context is full).

Before each sample the logits go through, in this order: the LogitAdjustments (logit_bias, penalties, min_tokens;
text.logit_processors), then the grammar Constraint's mask (text.constraints). The Sampler, and the logprobs
(text.logprobs, when `logprobs` is set: the sampled token's and the `logprobs` most likely), see the result.
Decode fast path: when nothing needs the whole row (no adjustments, no constraint, no logprobs) and the session
computes `decode_top`'s candidates where the logits are (`candidates_on_device`), decode steps return a TopCandidates (text.candidates: a few KB instead of the row) and the sampler
draws from it (Sampler.sample_top: the same token ids; it fetches the row itself in the cases the set cannot decide).
`ignore_eos` (vLLM's): EOS does not end generation; it is generated, releases no text, and decoding goes on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from .logit_processors import LogitAdjustments, LogitProcessor
from .logprobs import TokenLogprob, token_logprob
from .output_parser import OutputParser, new_tool_call_id
from .candidates import TopCandidates
from .sampling import Sampler, SamplingParams
from .tokenizer import IncrementalDecoder, Tokenizer


@dataclass
class GenerationDelta:
    """One generated token and the text it released. Text fields may be "" while UTF-8 bytes or a possible stop
    string are held back. tool_calls: complete calls [{index, id, name, arguments(JSON text)}]."""
    token_id: int
    text: str = ""                 # raw text released this step (reasoning, content and DSML alike; stop cut off)
    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    logprob: TokenLogprob | None = None     # with Generator(logprobs=N)


class StopMatcher:
    """Finds stop strings in streamed text; holds back a suffix that could still become one."""

    def __init__(self, stop: Sequence[str] | None):
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        for s in stop:
            if not isinstance(s, str) or s == "":
                raise ValueError(f"stop strings must be non-empty strings; got {s!r}")
        self.stop = stop
        self._held = ""
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        """Text that is safe to release. After a match, .matched is set and the text after it is dropped."""
        if not self.stop:
            return text
        buf = self._held + text
        first = None
        for s in self.stop:
            i = buf.find(s)
            if i >= 0 and (first is None or i < first[0]):
                first = (i, s)
        if first is not None:
            self._held = ""
            self.matched = first[1]
            return buf[:first[0]]
        keep = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:n]):
                    keep = n
                    break
        self._held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


class Generator:
    """Sampling + detokenizing + stop strings + output parsing over a Session (see the module docstring).

    tokenizer: the model's Tokenizer; params: SamplingParams; max_tokens >= 1; stop: stop strings (not included in
    the output); thinking: the prompt ended with `<think>` (text up to `</think>` is reasoning); parse_tools: turn
    DSML blocks into tool calls; stop_token_ids: extra ids that end generation like EOS; adjust: LogitAdjustments;
    constraint: a text.constraints.Constraint (fresh, one per Generator); logprobs: None, or how many top
    alternatives each delta's `logprob` lists (0..20); ignore_eos: see the module docstring.
    """

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams | None = None, max_tokens: int = 256,
                 stop: Sequence[str] | None = None, thinking: bool = False, parse_tools: bool = True,
                 stop_token_ids: Sequence[int] = (), tool_call_id: Callable[[], str] = new_tool_call_id,
                 adjust: LogitAdjustments | None = None, constraint=None, logprobs: int | None = None,
                 ignore_eos: bool = False):
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens!r}: must be an integer >= 1")
        self.adjust = adjust or LogitAdjustments()
        if constraint is not None and (ignore_eos or self.adjust.min_tokens):
            raise ValueError("a grammar constraint ends with EOS: it cannot be combined with ignore_eos or min_tokens")
        self.constraint = constraint
        self.logprobs = logprobs
        self.ignore_eos = bool(ignore_eos)
        self.tokenizer = tokenizer
        self.params = params or SamplingParams()
        self.sampler = Sampler(self.params)
        self.max_tokens = max_tokens
        self.thinking = thinking
        self.parse_tools = parse_tools
        self.end_ids = {tokenizer.eos_id, *(int(t) for t in stop_token_ids)}
        self._stop = StopMatcher(stop)
        self._decoder = IncrementalDecoder(tokenizer)
        self.parser = OutputParser(thinking=thinking, parse_tools=parse_tools, id_factory=tool_call_id)
        self.completion_tokens: list[int] = []
        self.text = ""                 # all released text (stop string and what follows excluded)
        self.finish_reason: str | None = None
        self.fast_path = False         # set by stream(): decode steps use session.decode_top (module docstring)
        self._used = False

    # totals, for non-streaming callers
    @property
    def reasoning(self) -> str:
        return self.parser.reasoning

    @property
    def content(self) -> str:
        return self.parser.content

    @property
    def tool_calls(self) -> list[dict]:
        """OpenAI shape: [{"id", "type": "function", "function": {"name", "arguments"}}]."""
        return self.parser.tool_calls

    @property
    def stop_string(self) -> str | None:
        """The stop string that ended generation, if any."""
        return self._stop.matched

    def stream(self, session, logits: np.ndarray) -> Iterator[GenerationDelta]:
        """Yield one GenerationDelta per generated token; the last carries finish_reason. One use per Generator."""
        if self._used:
            raise RuntimeError("a Generator streams once; make a new one for the next request")
        self._used = True
        ctx = getattr(session, "ctx", None) or getattr(session, "n_ctx", None)
        processor = (LogitProcessor(self.adjust, getattr(session, "tokens", ()), self.end_ids)
                     if self.adjust.active else None)
        # decode steps hand over candidates (a few KB) unless something needs the whole logits row
        self.fast_path = (processor is None and self.constraint is None and self.logprobs is None
                          and callable(getattr(session, "decode_top", None))
                          and bool(getattr(session, "candidates_on_device", False)))
        while True:
            if processor is not None:
                logits = processor.apply(logits)
            if self.constraint is not None:
                logits = self.constraint.apply(logits)
            token = (self.sampler.sample_top(logits) if isinstance(logits, TopCandidates)
                     else self.sampler.sample(logits))
            logprob = None if self.logprobs is None else token_logprob(logits, token, self.logprobs)
            if processor is not None:
                processor.record(token)
            if self.constraint is not None:
                self.constraint.advance(token)
            self.completion_tokens.append(token)
            finish = None
            ended = token in self.end_ids
            if ended and not self.ignore_eos:
                piece = self._decoder.flush()
                released = self._stop.feed(piece)
                finish = "stop"
                if self._stop.matched is None:
                    released += self._stop.flush()
            else:
                released = "" if ended else self._stop.feed(self._decoder.feed(token))
                if self._stop.matched is not None:
                    finish = "stop"
                elif len(self.completion_tokens) >= self.max_tokens or (
                        ctx is not None and session.n_tokens >= ctx):
                    finish = "length"
                    released += self._stop.feed(self._decoder.flush())
                    if self._stop.matched is not None:
                        finish = "stop"
                    else:
                        released += self._stop.flush()
            delta = self._parse(token, released, final=finish is not None)
            delta.logprob = logprob
            if finish is not None:
                if finish == "stop" and self.parser.tool_calls:
                    finish = "tool_calls"
                delta.finish_reason = self.finish_reason = finish
                yield delta
                return
            yield delta
            logits = session.decode_top(token, self.params.temperature) if self.fast_path else session.decode(token)

    def _parse(self, token: int, text: str, final: bool) -> GenerationDelta:
        self.text += text
        parsed = self.parser.feed(text)
        delta = GenerationDelta(token_id=token, text=text, reasoning=parsed.reasoning, content=parsed.content,
                                tool_calls=list(parsed.tool_calls))
        if final:
            rest = self.parser.finish()
            delta.reasoning += rest.reasoning
            delta.content += rest.content
            delta.tool_calls += rest.tool_calls
        return delta

    def generate(self, session, logits: np.ndarray) -> dict:
        """Run stream() to the end; {"reasoning_content", "content", "tool_calls", "finish_reason", "tokens"}."""
        for _ in self.stream(session, logits):
            pass
        return {"reasoning_content": self.reasoning, "content": self.content, "tool_calls": self.tool_calls,
                "finish_reason": self.finish_reason, "tokens": list(self.completion_tokens)}
