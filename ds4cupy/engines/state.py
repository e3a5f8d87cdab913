"""Session states that can be stored, chained, moved to the host, written to disk and restored.

A session's state after n tokens is two kinds of arrays (docs/model.md §2.4-2.6):

- append-only rows (`rows`): the compressed KV rows and the indexer rows. Row j of a ratio-r layer covers positions
  [j*r, (j+1)*r) and never changes once written, so the rows emitted for positions [a, n) are rows [a // r, n // r);
- the rest (`fixed`): the window of raw KV rows and the compressors' partial windows, small and bounded by the
  window, replaced whole.

`session.snapshot(since=a)` returns a `SessionState` holding only what tokens [a, n) added: the tokens themselves,
the append-only rows emitted for them, and the fixed arrays as they are at n. `since=0` gives a complete state; a
later one is a delta on top of the state after `a` tokens, so a chain of checkpoints inside a long prompt costs the
rows of the prompt once, not once per checkpoint. `session.restore(chain)` takes a complete state or a list
[complete, delta, delta, ...] where each piece starts where the previous one ends (`chain_of` checks that).

Arrays are NumPy on the reference backend and CuPy on the GPU; `to_host()` makes a NumPy copy. `model_identity`
names what a stored state is valid for: the model file's content, the backend and the QAT setting.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

# Bumped whenever the arrays a backend puts in a SessionState change meaning: states on disk from another format
# version are foreign and ignored.
STATE_FORMAT = 1
IDENTITY_SAMPLES = 16            # file regions hashed for the model identity ...
IDENTITY_SAMPLE_BYTES = 64 << 10  # ... of this many bytes each, evenly spread over the tensor data


@dataclass
class SessionState:
    """What tokens [since, since + len(tokens)) changed in a session (since = 0: the whole state).

    rows:  name -> (first row, array [k, width]): append-only rows, the array's row i is the buffer's row first + i;
    fixed: name -> array: replaced whole (buffer rows [0, len(array)) for the GPU backend)."""
    since: int
    tokens: list[int]
    rows: dict[str, tuple[int, Any]] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        """Tokens in the session once this state (and the ones before it) is restored."""
        return self.since + len(self.tokens)

    @property
    def nbytes(self) -> int:
        return (sum(int(a.nbytes) for _, a in self.rows.values()) + sum(int(a.nbytes) for a in self.fixed.values())
                + 4 * len(self.tokens))

    @property
    def on_device(self) -> bool:
        """True when an array lives on the GPU (anything that is not a NumPy array)."""
        arrays = [a for _, a in self.rows.values()] + list(self.fixed.values())
        return any(not isinstance(a, np.ndarray) for a in arrays)

    def to_host(self) -> "SessionState":
        """The same state with NumPy arrays (a GPU array is copied to the host; NumPy arrays are kept as they are)."""
        return SessionState(self.since, list(self.tokens),
                            {k: (start, _host(a)) for k, (start, a) in self.rows.items()},
                            {k: _host(a) for k, a in self.fixed.items()})


def _host(a: Any) -> np.ndarray:
    if isinstance(a, np.ndarray):
        return a
    get = getattr(a, "get", None)
    if get is None:
        raise TypeError(f"cannot copy a {type(a).__name__} to the host")
    return get()


def chain_of(state: SessionState | Sequence[SessionState]) -> list[SessionState]:
    """`state` as a checked chain: the first piece starts at token 0, each next one where the previous ends."""
    chain = [state] if isinstance(state, SessionState) else list(state)
    if not chain or not all(isinstance(s, SessionState) for s in chain):
        raise ValueError("restore needs a SessionState or a non-empty list of them (from snapshot())")
    if chain[0].since != 0:
        raise ValueError(f"the first state of a chain must start at token 0, not {chain[0].since}")
    for prev, nxt in zip(chain, chain[1:]):
        if nxt.since != prev.n_tokens:
            raise ValueError(f"broken state chain: a piece starts at token {nxt.since} but the one before it ends at "
                             f"{prev.n_tokens}")
    return chain


def chain_tokens(chain: Sequence[SessionState]) -> list[int]:
    """Every token of a checked chain, in order."""
    out: list[int] = []
    for s in chain:
        out.extend(s.tokens)
    return out


def chain_rows(chain: Sequence[SessionState], name: str, expected: int) -> list[tuple[int, Any]]:
    """The (first row, array) pieces of append-only buffer `name` along a chain, checked to be contiguous from row 0
    and to end at row `expected` (what the session's token count implies)."""
    pieces = [s.rows[name] for s in chain if name in s.rows]
    at = 0
    for start, a in pieces:
        if start != at:
            raise ValueError(f"state rows of {name!r}: a piece starts at row {start}, expected {at}")
        at += int(a.shape[0])
    if at != expected:
        raise ValueError(f"state rows of {name!r}: the chain holds {at} rows, {expected} expected for its tokens")
    return pieces


# ---------------------------------------------------------------------------------------------------- identity

def file_identity(path: str | os.PathLike, data_start: int) -> str:
    """A digest of a model file's content that is cheap to compute on a 150 GB file: its size, the whole header
    (metadata and tensor table: bytes [0, data_start)) and IDENTITY_SAMPLES regions of IDENTITY_SAMPLE_BYTES spread
    evenly over the tensor data. Two files with the same shapes but other weights differ in every sampled region."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    h.update(f"size={size};header={data_start}".encode())
    with open(path, "rb") as f:
        h.update(f.read(max(0, data_start)))
        span = max(0, size - data_start - IDENTITY_SAMPLE_BYTES)
        for i in range(IDENTITY_SAMPLES):
            f.seek(data_start + span * i // max(1, IDENTITY_SAMPLES - 1))
            h.update(f.read(IDENTITY_SAMPLE_BYTES))
    return h.hexdigest()


def model_identity(file_digest: str, backend: str, qat: bool) -> str:
    """What a stored state is valid for: the model file's content, the backend that wrote it (each backend lays its
    arrays out its own way) and the QAT setting (it changes the KV values), plus STATE_FORMAT."""
    return hashlib.sha256(f"ds4cupy-state/{STATE_FORMAT}/{backend}/qat={int(bool(qat))}/{file_digest}".encode()
                          ).hexdigest()


def key_hasher(identity: str):
    """The running hash behind prefix_key: feed it tokens_bytes() of the tokens in order (a child state's key is its
    parent's hasher, copied, fed the child's own tokens)."""
    return hashlib.sha256(identity.encode())


def tokens_bytes(tokens) -> bytes:
    return np.asarray(tokens, dtype="<i4").tobytes()


def prefix_key(identity: str, tokens: Sequence[int]) -> str:
    """The name of a stored state: a hash of (model identity, every token of the prefix it holds)."""
    h = key_hasher(identity)
    h.update(tokens_bytes(tokens))
    return h.hexdigest()
