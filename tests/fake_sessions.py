"""Test helper: the state half of a fake engine session for the server tests, whose "state" is the list of token ids
it consumed (the Session contract's n_tokens, snapshot, restore, reset; engines.state for the chains)."""
from __future__ import annotations

from ds4cupy.engines.state import SessionState, chain_of, chain_tokens


class TokenListSession:
    """Subclasses add prefill / decode (appending to self.tokens) and whatever they script."""

    def __init__(self):
        self.tokens: list[int] = []

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def snapshot(self, since=0):
        return SessionState(since, self.tokens[since:])

    def restore(self, state):
        self.tokens = chain_tokens(chain_of(state))

    def reset(self):
        self.tokens = []
