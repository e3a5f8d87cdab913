"""Logit adjustments made before sampling: logit_bias, repetition / frequency / presence penalties, min_tokens.

The definitions are OpenAI's and vLLM's, in vLLM's order (bias, then penalties):

* logit_bias: `bias[j]` is added to token j's logit (OpenAI: -100..100);
* repetition_penalty r (vLLM / HF's CTRL rule, 1 = off): every token that occurs in the prompt or the output so far
  gets `l / r` when its logit l > 0 and `l * r` otherwise;
* frequency_penalty f and presence_penalty p (OpenAI, -2..2): `l[j] -= c[j] * f + (c[j] > 0) * p`, where c[j]
  counts token j in the output so far (the prompt does not count);
* min_tokens n (vLLM): the end ids (EOS and any stop ids) are at -inf while fewer than n tokens were generated.

    adjust = LogitAdjustments(presence_penalty=0.5, logit_bias={42: -100.0})
    proc = LogitProcessor(adjust, prompt_ids, end_ids)
    logits = proc.apply(logits)      # a new float32 array
    proc.record(token_id)            # after each sampled token
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np

PENALTY_RANGE = (-2.0, 2.0)        # OpenAI's range for presence / frequency penalties
LOGIT_BIAS_RANGE = (-100.0, 100.0)


@dataclass(frozen=True)
class LogitAdjustments:
    """Validated adjustment parameters; the defaults change nothing."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    min_tokens: int = 0

    def __post_init__(self):
        def bad(name, value, rule):
            raise ValueError(f"{name}={value!r}: {rule}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _finite(value) or not PENALTY_RANGE[0] <= value <= PENALTY_RANGE[1]:
                bad(name, value, f"must be a number in [{PENALTY_RANGE[0]:g}, {PENALTY_RANGE[1]:g}]")
        if not _finite(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad("repetition_penalty", self.repetition_penalty, "must be a number > 0 (1 = off)")
        for token, bias in self.logit_bias.items():
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                bad("logit_bias key", token, "must be a token id >= 0")
            if not _finite(bias) or not LOGIT_BIAS_RANGE[0] <= bias <= LOGIT_BIAS_RANGE[1]:
                bad(f"logit_bias[{token}]", bias, f"must be a number in [{LOGIT_BIAS_RANGE[0]:g}, "
                                                  f"{LOGIT_BIAS_RANGE[1]:g}]")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            bad("min_tokens", self.min_tokens, "must be an integer >= 0")

    @property
    def active(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_tokens)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class LogitProcessor:
    """Applies LogitAdjustments step by step; keeps the output token counts and the prompt's token set."""

    def __init__(self, adjust: LogitAdjustments, prompt_ids: Iterable[int] = (), end_ids: Iterable[int] = ()):
        self.adjust = adjust
        self.end_ids = np.array(sorted(set(int(t) for t in end_ids)), dtype=np.int64)
        self._prompt = set(int(t) for t in prompt_ids) if adjust.repetition_penalty != 1.0 else set()
        self._counts: dict[int, int] = {}
        self._bias_ids = np.array(list(adjust.logit_bias), dtype=np.int64)
        self._bias = np.array(list(adjust.logit_bias.values()), dtype=np.float32)

    @property
    def generated(self) -> int:
        return sum(self._counts.values())

    def record(self, token_id: int) -> None:
        token_id = int(token_id)
        self._counts[token_id] = self._counts.get(token_id, 0) + 1

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """A float32 copy of `logits` with the adjustments of this step."""
        out = np.array(logits, dtype=np.float32).reshape(-1)
        a = self.adjust
        if self._bias_ids.size:
            if self._bias_ids.max() >= out.size:
                raise ValueError(f"logit_bias token id {int(self._bias_ids.max())} is outside the vocabulary "
                                 f"[0, {out.size})")
            out[self._bias_ids] += self._bias
        if a.repetition_penalty != 1.0:
            seen = np.array(sorted(self._prompt | set(self._counts)), dtype=np.int64)
            seen = seen[seen < out.size]
            values = out[seen]
            out[seen] = np.where(values > 0, values / a.repetition_penalty, values * a.repetition_penalty)
        if (a.frequency_penalty or a.presence_penalty) and self._counts:
            ids = np.fromiter(self._counts, dtype=np.int64, count=len(self._counts))
            counts = np.fromiter(self._counts.values(), dtype=np.float32, count=len(self._counts))
            out[ids] -= counts * np.float32(a.frequency_penalty) + np.float32(a.presence_penalty)
        if a.min_tokens and self.generated < a.min_tokens and self.end_ids.size:
            out[self.end_ids[self.end_ids < out.size]] = -np.inf
        return out
