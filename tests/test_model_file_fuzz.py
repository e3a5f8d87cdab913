"""Seeded fuzzing of the model loader: hundreds of mutated copies of the tiny model, each loaded in a subprocess with an
address-space and CPU cap (resource.setrlimit) and a wall-clock limit.

Mutations, at positions found by walking the pristine file's header (an independent walker, below): truncations,
byte flips in the header / metadata / tensor table, huge counts and lengths, tensor offsets that wrap modulo 2^64,
are misaligned or overlap another tensor, bad dimensions, and metadata values set to NaN, inf, zero, negative or absurd
numbers. Every file must end as either a ModelFileError whose message names the file and what is wrong (a key, a
tensor or a header field), or a load whose logits (reference backend, a few prompt tokens) are all finite: zero hangs,
zero crashes, zero other exceptions. The counts by outcome are printed (`pytest -s`).

Files are fed to one long-lived worker (tests/fuzz_load_worker.py) one at a time, so the Python start-up is paid once;
a worker that goes silent past the limit is killed, the file it held is counted as a hang, and a fresh worker takes
the rest. DS4CUPY_FUZZ_SEED=<n> explores another seed; a failure names the seed, the index and the mutation.
"""
from __future__ import annotations

import collections
import json
import os
import queue
import re
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

SEED = int(os.environ.get("DS4CUPY_FUZZ_SEED", "20240515"))
PER_FILE_LIMIT_S = 30.0          # a normal load + prefill takes well under a second; 30 s is a hang on any machine
MEMORY_CAP = 1 << 30             # worker address space; a load + prefill of the pristine file peaks at ~0.25 GiB
CPU_CAP_S = 900                  # per worker, a backstop behind the wall-clock limit
WORKER = Path(__file__).with_name("fuzz_load_worker.py")
REPO = Path(__file__).resolve().parents[1]

# what a rejection must name: a tensor, a metadata key, or the header field that is wrong
NAMES_SOMETHING = re.compile(r"tensor '[^']+'|key '[^']+'|\b(?:deepseek4|tokenizer|general)\.[a-z_.]+|GGUF header|"
                             r"GGUF version|magic|metadata entry \d+|tensor-table entry \d+|too short for a GGUF")

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


# --------------------------------------------------------------------------------------- walking the pristine file

@dataclass
class KV:
    key: str
    key_len_at: int
    type_at: int
    vtype: int
    value_at: int
    end: int
    etype: int | None = None
    count: int = 0
    element_at: list[int] = field(default_factory=list)    # array elements (string elements: their length field)


@dataclass
class TensorRow:
    name: str
    name_len_at: int
    ndims_at: int
    dims_at: list[int]
    type_at: int
    offset_at: int
    offset: int


@dataclass
class Layout:
    size: int
    kvs: list[KV]
    tensors: list[TensorRow]
    meta_end: int
    table_end: int
    data_start: int


def walk(data: bytes) -> Layout:
    """Field positions of a well-formed GGUF v3 file (the pristine model only)."""
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24

    def string(p: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", data, p)
        return data[p + 8:p + 8 + n].decode(), p + 8 + n

    kvs = []
    for _ in range(n_kv):
        key, p = string(pos)
        (vtype,) = struct.unpack_from("<I", data, p)
        kv = KV(key, pos, p, vtype, p + 4, 0)
        p += 4
        if vtype == 8:
            p = string(p)[1]
        elif vtype == 9:
            kv.etype, kv.count = struct.unpack_from("<IQ", data, p)
            p += 12
            for _ in range(kv.count):
                kv.element_at.append(p)
                p = string(p)[1] if kv.etype == 8 else p + _SCALAR_SIZES[kv.etype]
        else:
            p += _SCALAR_SIZES[vtype]
        kv.end = pos = p
        kvs.append(kv)
    meta_end = pos
    tensors = []
    for _ in range(n_tensors):
        name, p = string(pos)
        (nd,) = struct.unpack_from("<I", data, p)
        dims_at = [p + 4 + 8 * d for d in range(nd)]
        type_at = p + 4 + 8 * nd
        (offset,) = struct.unpack_from("<Q", data, type_at + 4)
        tensors.append(TensorRow(name, pos, p, dims_at, type_at, type_at + 4, offset))
        pos = type_at + 12
    align = 32
    return Layout(len(data), kvs, tensors, meta_end, pos, (pos + align - 1) // align * align)


# ------------------------------------------------------------------------------------------------------ mutations

@dataclass
class Mutation:
    kind: str
    what: str
    truncate: int | None = None
    patches: list[tuple[int, bytes]] = field(default_factory=list)

    def request(self, i: int) -> str:
        return json.dumps({"i": i, "truncate": self.truncate, "patches": [[o, b.hex()] for o, b in self.patches]})


HUGE = [2**64 - 1, 2**63, 2**62 + 7, 2**60, 2**40, 2**32 + 5]
F32_SPECIAL = [float("nan"), float("inf"), float("-inf"), -1.0, 0.0, 1e30, 1e-30, 1.3e8, -1e-6, 3.0e38]
U32_SPECIAL = [0, 1, 2, 3, 2**32 - 1, 2**31, 130_000_000, 65537]


def mutations(data: bytes, lay: Layout, rng: np.random.Generator) -> list[Mutation]:
    out: list[Mutation] = []
    u64 = lambda v: struct.pack("<Q", v % 2**64)       # noqa: E731
    u32 = lambda v: struct.pack("<I", v % 2**32)       # noqa: E731

    def pick(seq):
        return seq[int(rng.integers(len(seq)))]

    def flips(lo: int, hi: int, n: int) -> list[tuple[int, bytes]]:
        at = rng.integers(lo, hi, n)
        return [(int(a), bytes([data[a] ^ int(rng.integers(1, 256))])) for a in at]

    for _ in range(30):
        cut = int(rng.integers(0, lay.data_start))
        out.append(Mutation("truncate", f"cut to {cut} bytes (inside the header)", truncate=cut))
    for _ in range(25):
        cut = int(rng.integers(lay.data_start, lay.size))
        out.append(Mutation("truncate", f"cut to {cut} bytes (inside the tensor data)", truncate=cut))
    for _ in range(30):
        p = flips(0, 24, int(rng.integers(1, 3)))
        out.append(Mutation("flip_header", f"bytes {[a for a, _ in p]} of the 24-byte header", patches=p))
    for _ in range(70):
        p = flips(24, lay.meta_end, int(rng.integers(1, 5)))
        out.append(Mutation("flip_metadata", f"metadata bytes {[a for a, _ in p]}", patches=p))
    for _ in range(60):
        p = flips(lay.meta_end, lay.table_end, int(rng.integers(1, 4)))
        out.append(Mutation("flip_table", f"tensor-table bytes {[a for a, _ in p]}", patches=p))

    strings = [kv for kv in lay.kvs if kv.vtype == 8]
    arrays = [kv for kv in lay.kvs if kv.vtype == 9]
    string_arrays = [kv for kv in arrays if kv.etype == 8 and kv.count]
    for _ in range(45):
        v = pick(HUGE)
        target = int(rng.integers(8))
        if target == 0:
            out.append(Mutation("huge_count", f"tensor count = {v}", patches=[(8, u64(v))]))
        elif target == 1:
            out.append(Mutation("huge_count", f"metadata count = {v}", patches=[(16, u64(v))]))
        elif target == 2:
            kv = pick(lay.kvs)
            out.append(Mutation("huge_count", f"key length of {kv.key!r} = {v}", patches=[(kv.key_len_at, u64(v))]))
        elif target == 3:
            kv = pick(strings)
            out.append(Mutation("huge_count", f"string length of {kv.key!r} = {v}", patches=[(kv.value_at, u64(v))]))
        elif target == 4:
            kv = pick(arrays)
            out.append(Mutation("huge_count", f"array count of {kv.key!r} = {v}", patches=[(kv.value_at + 4, u64(v))]))
        elif target == 5:
            kv = pick(string_arrays)
            k = int(rng.integers(kv.count))
            out.append(Mutation("huge_count", f"length of {kv.key!r}[{k}] = {v}",
                                patches=[(kv.element_at[k], u64(v))]))
        elif target == 6:
            t = pick(lay.tensors)
            out.append(Mutation("huge_count", f"name length of tensor {t.name!r} = {v}",
                                patches=[(t.name_len_at, u64(v))]))
        else:
            t = pick(lay.tensors)
            out.append(Mutation("huge_count", f"dimension count of tensor {t.name!r} = {v % 2**32}",
                                patches=[(t.ndims_at, u32(v))]))

    for _ in range(45):
        t = pick(lay.tensors)
        other = pick(lay.tensors)
        choice = int(rng.integers(6))
        new = [2**64 - lay.data_start + t.offset,                      # data_start + offset wraps to the right place
               2**64 - 32 * int(rng.integers(1, 1000)),                # wraps to just before the data
               t.offset + int(rng.integers(1, 32)),                    # misaligned
               other.offset if other.name != t.name else t.offset + 32,  # overlaps another tensor
               lay.size - lay.data_start + 32 * int(rng.integers(0, 4)),  # past the end
               int(rng.integers(0, 2**63)) & ~31][choice]
        out.append(Mutation("offset", f"offset of tensor {t.name!r} = {new}", patches=[(t.offset_at, u64(new))]))

    for _ in range(20):
        t = pick(lay.tensors)
        d = int(rng.integers(len(t.dims_at)))
        v = pick([0, 1, 2**63, 2**40 + 256, 512, 3])
        out.append(Mutation("dims", f"dimension {d} of tensor {t.name!r} = {v}", patches=[(t.dims_at[d], u64(v))]))
    for _ in range(10):
        t = pick(lay.tensors)
        v = pick([77, 4, 2**31, 31, 8, 0])
        out.append(Mutation("dims", f"block type of tensor {t.name!r} = {v}", patches=[(t.type_at, u32(v))]))

    numeric = [kv for kv in lay.kvs if kv.key.startswith("deepseek4.") and kv.vtype in (4, 6, 10)]
    numeric_arrays = [kv for kv in lay.kvs if kv.key.startswith("deepseek4.") and kv.vtype == 9 and kv.count]
    numeric_arrays += [kv for kv in arrays if kv.key == "tokenizer.ggml.token_type"]
    for _ in range(60):
        if rng.random() < 0.7:
            kv = pick(numeric)
            at, vtype = kv.value_at, kv.vtype
            where = kv.key
        else:
            kv = pick(numeric_arrays)
            k = int(rng.integers(kv.count))
            at, vtype = kv.element_at[k], kv.etype
            where = f"{kv.key}[{k}]"
        if vtype == 6:
            v = pick(F32_SPECIAL)
            out.append(Mutation("metadata_value", f"{where} = {v}", patches=[(at, struct.pack("<f", v))]))
        elif vtype in (4, 5):
            v = pick(U32_SPECIAL)
            out.append(Mutation("metadata_value", f"{where} = {v}", patches=[(at, u32(v))]))
        else:
            v = pick(HUGE + U32_SPECIAL)
            out.append(Mutation("metadata_value", f"{where} = {v}", patches=[(at, u64(v))]))
    return out


# --------------------------------------------------------------------------------------------------------- runner

class Worker:
    """One fuzz_load_worker.py subprocess and a thread that queues its output lines."""

    def __init__(self, base: Path, workdir: Path):
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen([sys.executable, str(WORKER), str(base), str(workdir), str(MEMORY_CAP),
                                      str(CPU_CAP_S)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        ready = self.lines.get(timeout=120)
        assert ready is not None and json.loads(ready) == {"ready": True}, self.stderr()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return ""
        return self.proc.stderr.read()[-2000:]

    def ask(self, request: str, limit: float) -> dict:
        """The worker's answer; {"outcome": "hang"} after `limit` seconds of silence, {"outcome": "crash"} if it
        died (the worker is then unusable)."""
        try:
            self.proc.stdin.write(request + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return {"outcome": "crash", "message": f"worker gone (exit {self.proc.poll()}): {self.stderr()}"}
        try:
            line = self.lines.get(timeout=limit)
        except queue.Empty:
            return {"outcome": "hang", "message": f"no answer within {limit:.0f} s"}
        if line is None:
            self.proc.wait(10)
            return {"outcome": "crash", "message": f"worker died (exit {self.proc.returncode}): {self.stderr()}"}
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def test_mutated_model_files_are_rejected_cleanly_or_load_finite(tiny_model_path, tmp_path):
    data = Path(tiny_model_path).read_bytes()
    lay = walk(data)
    muts = mutations(data, lay, np.random.default_rng(SEED))
    assert len(muts) >= 300

    worker = Worker(tiny_model_path, tmp_path)
    results = []
    t0 = time.perf_counter()
    try:
        for i, m in enumerate(muts):
            answer = worker.ask(m.request(i), PER_FILE_LIMIT_S)
            if answer["outcome"] in ("hang", "crash"):
                worker.close()
                worker = Worker(tiny_model_path, tmp_path)
            elif answer["outcome"] == "rejected" and not (answer["message"].startswith(str(tmp_path))
                                                          and NAMES_SOMETHING.search(answer["message"])):
                answer["outcome"] = "vague_rejection"
            results.append((i, m, answer))
    finally:
        worker.close()
    elapsed = time.perf_counter() - t0

    counts = collections.Counter(a["outcome"] for _, _, a in results)
    by_kind = collections.defaultdict(collections.Counter)
    for _, m, a in results:
        by_kind[m.kind][a["outcome"]] += 1
    print(f"\nfuzz seed {SEED}: {len(results)} mutated files in {elapsed:.1f} s: {dict(counts)}")
    for kind, c in by_kind.items():
        print(f"  {kind:15s} {dict(c)}")
    slowest = max(results, key=lambda r: r[2].get("seconds", 0.0))
    print(f"  slowest answer: {slowest[2].get('seconds')} s ({slowest[1].kind}: {slowest[1].what})")

    bad = [(i, m, a) for i, m, a in results if a["outcome"] not in ("rejected", "loaded")]
    report = "\n".join(f"seed {SEED} #{i} {m.kind} ({m.what}): {a['outcome']}: {a.get('message', '')[:300]}"
                       for i, m, a in bad[:20])
    assert not bad, f"{len(bad)} of {len(results)} files failed:\n{report}"
    assert counts["rejected"] > 0 and counts["loaded"] > 0       # both paths were exercised


def test_harness_catches_a_hang_and_caps_memory(tiny_model_path, tmp_path):
    """The limits the fuzz test relies on work: a silent worker is reported as a hang within the limit, and an
    allocation past the address-space cap fails inside the worker instead of growing it."""
    worker = Worker(tiny_model_path, tmp_path)
    try:
        assert worker.ask(json.dumps({"i": 0, "probe": "allocate"}), PER_FILE_LIMIT_S)["outcome"] == "memory"
        t0 = time.perf_counter()
        assert worker.ask(json.dumps({"i": 1, "probe": "sleep"}), 1.0)["outcome"] == "hang"
        assert time.perf_counter() - t0 < 5.0
    finally:
        worker.close()
    assert worker.proc.returncode is not None
