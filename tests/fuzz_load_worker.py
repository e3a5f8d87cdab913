"""Subprocess side of tests/test_model_file_fuzz.py: loads mutated copies of one model file, one per stdin line.

    python tests/fuzz_load_worker.py BASE.gguf WORKDIR MEMORY_BYTES CPU_SECONDS

Sets RLIMIT_AS (address space) and RLIMIT_CPU before importing anything, reads the pristine file once, then for each
request line {"i", "truncate", "patches": [[offset, hex bytes], ...]} writes the mutated file, loads it with the
reference backend, builds its tokenizer, prefills a few tokens and answers one JSON line: {"i", "outcome", "message",
"seconds"}. outcome: "rejected" (ModelFileError; message is its text), "loaded" (logits all finite), "nonfinite",
"memory" (MemoryError), "other" (any other exception; message: type, text and the innermost frame).
A request {"i", "probe": "sleep" | "allocate"} hangs, or allocates twice the memory cap (the harness's self-test).
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback


def main() -> int:
    base, workdir, mem, cpu = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    import numpy as np

    import ds4cupy
    from ds4cupy.format.model_file import ModelFileError

    with open(base, "rb") as f:
        pristine = f.read()
    path = os.path.join(workdir, "mutated.gguf")
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if "probe" in req:           # harness self-test: a hang, or an allocation past the memory cap
            try:
                if req["probe"] == "sleep":
                    time.sleep(3600)
                blob = bytearray(2 * mem)
                outcome = f"allocated {len(blob)} bytes"
            except MemoryError:
                outcome = "memory"
            print(json.dumps({"i": req["i"], "outcome": outcome, "message": ""}), flush=True)
            continue
        data = bytearray(pristine if req["truncate"] is None else pristine[:req["truncate"]])
        for offset, hexbytes in req["patches"]:
            patch = bytes.fromhex(hexbytes)
            data[offset:offset + len(patch)] = patch
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)        # a fresh inode each time: nothing maps the previous file's pages
        t0 = time.perf_counter()
        model = None
        try:
            model = ds4cupy.load(path, backend="reference")
            tok = model.tokenizer
            ids = [tok.bos_id] + tok.encode("Fuzz me, gently.")[:3]
            logits = model.new_session(ctx=64).prefill(ids)
            outcome, message = ("loaded" if np.isfinite(logits).all() else "nonfinite"), ""
        except ModelFileError as e:
            outcome, message = "rejected", str(e)
        except MemoryError:
            outcome, message = "memory", "MemoryError"
        except Exception as e:       # noqa: BLE001 - reported, and the test fails on it
            frame = traceback.extract_tb(e.__traceback__)[-1]
            outcome = "other"
            message = f"{type(e).__name__}: {e} (at {frame.filename}:{frame.lineno} in {frame.name})"
        finally:
            if model is not None:
                model.close()
        print(json.dumps({"i": req["i"], "outcome": outcome, "message": message[:2000],
                          "seconds": round(time.perf_counter() - t0, 3)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
