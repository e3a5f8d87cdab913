"""GPU tests of ds4cupy.memory: weights placed both ways hold the file's bytes; KV buffers follow kv_layout;
read bandwidth of device vs managed placement next to a raw cudaMalloc buffer (printed, not asserted)."""
import os

import numpy as np
import pytest

try:
    from gpu_util import gpu  # the team's marker, when tests/gpu_util.py exists
except ImportError:
    def _have_gpu() -> bool:
        try:
            import cupy
            return cupy.cuda.runtime.getDeviceCount() > 0
        except Exception:  # noqa: BLE001 - no driver, no device, no cupy
            return False

    gpu = pytest.mark.skipif(not _have_gpu(), reason="needs an NVIDIA GPU with a working CUDA driver")

from ds4cupy.format.config import ModelConfig
from ds4cupy.memory import (DeviceMemory, H200, alloc_kv, choose_placement, detect, kv_layout, place_weights,
                            preset_budget)

pytestmark = [pytest.mark.gpu, gpu]
MiB = 1 << 20


def _write_file(path, specs, seed=0, align=32):
    """specs: (name, np dtype, shape). Writes a header gap then tensors at `align`-byte offsets with padding bytes of
    0xAB between them; returns the table (name, offset, nbytes, dtype, shape)."""
    rng = np.random.default_rng(seed)
    table = []
    with open(path, "wb") as f:
        f.write(b"\xab" * 1000)  # a "header"
        for name, dtype, shape in specs:
            pad = (-f.tell()) % align
            f.write(b"\xab" * pad)
            dt = np.dtype(dtype)
            n = int(np.prod(shape)) * dt.itemsize
            table.append((name, f.tell(), n, dt, tuple(shape)))
            f.write(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
        f.write(b"\xab" * 77)
    return table


SPECS = [
    ("token_embd.weight", np.float16, (300, 256)),
    ("blk.0.attn_norm.weight", np.float32, (256,)),
    ("blk.0.attn_q_a.weight", np.uint8, (64, 8 * 34)),              # Q8_0 rows
    ("blk.0.ffn_gate_exps.weight", np.uint8, (8, 256, 66)),          # IQ2_XXS
    ("blk.0.ffn_down_exps.weight", np.uint8, (8, 3000, 84 * 2)),     # Q2_K, > 2 MiB: several chunks
    ("blk.0.ffn_gate_tid2eid.weight", np.int32, (300, 3)),
    ("blk.0.exp_probs_b.bias", np.float32, (8,)),
    ("output.weight", np.uint8, (300, 8 * 34)),
]


def _expected(path, table):
    raw = np.fromfile(path, np.uint8)
    return {n: raw[o:o + nb].view(dt).reshape(sh) for n, o, nb, dt, sh in table}


@pytest.mark.parametrize("mode", ["device", "managed"])
def test_place_weights_bytes_identical(tmp_path, mode):
    import cupy as cp
    path = str(tmp_path / "t.bin")
    table = _write_file(path, SPECS)
    want = _expected(path, table)
    mem = DeviceMemory()
    got = place_weights(path, table, mode, mem, progress=False, chunk=1 * MiB)  # small chunks: many batches
    assert got.mode == mode and got.nbytes == sum(t[2] for t in table)
    assert set(got) == set(want)
    for n, w in want.items():
        g = got[n]
        assert isinstance(g, cp.ndarray) and g.dtype == w.dtype and g.shape == w.shape, n
        assert int(g.data.ptr) % 256 == 0, n
        assert cp.asnumpy(g).tobytes() == w.tobytes(), n
    cats = mem.by_category()
    assert set(cats) == {"weights.experts", "weights.dense", "weights.embed_head", "weights.small"}
    assert mem.total(managed=(mode == "managed")) == mem.total()
    print(f"\n{mode}: hints {got.hints_api}\n{mem.report()}")


def test_both_modes_identical_and_stream_read(tmp_path):
    from ds4cupy.memory.arena import stream_read
    path = str(tmp_path / "big.bin")
    specs = [("blk.0.ffn_up_exps.weight", np.uint8, (64, 1 << 20))]      # 64 MiB, one tensor
    table = _write_file(path, specs, seed=1)
    want = _expected(path, table)["blk.0.ffn_up_exps.weight"]
    ref_sum = int(want.view(np.uint32).sum(dtype=np.uint64))
    mem = DeviceMemory()
    dev = place_weights(path, table, "device", mem, progress=False)
    man = place_weights(path, table, "managed", mem, progress=False)
    a, b = dev["blk.0.ffn_up_exps.weight"], man["blk.0.ffn_up_exps.weight"]
    assert bool((a == b).all())
    raw = mem.alloc("bench.raw", want.shape, np.uint8)
    raw.set(want)
    lines = [f"GPU: {detect()}"]
    for label, arr in (("raw cudaMalloc", raw), ("device placement", a), ("managed placement", b)):
        gbps, s, first_ms = stream_read(arr, reps=20)
        assert s == ref_sum % (1 << 64), label      # the kernel read every byte
        lines.append(f"{label:<20} {gbps:8.1f} GB/s (first pass {first_ms:.2f} ms)")
    lines.append(f"load: device {dev.seconds * 1e3:.1f} ms ({dev.gbps:.2f} GB/s), managed {man.seconds * 1e3:.1f} ms "
                 f"({man.gbps:.2f} GB/s), hints {man.hints_api}")
    print("\n" + "\n".join(lines))


@pytest.mark.parametrize("kv_mode", ["device", "managed"])
def test_alloc_kv_follows_layout(kv_mode):
    cfg = ModelConfig.tiny(512)
    ctx = 4096
    mem = DeviceMemory()
    kv = alloc_kv(mem, cfg, ctx, kv_mode)
    lay = kv_layout(cfg, ctx)
    assert len(kv) == len(lay)
    for b in lay:
        a = kv[(b.layer, b.name)]
        assert a.shape == b.shape and a.dtype == b.dtype
        assert float(abs(a).max()) == 0.0
    budget = preset_budget(cfg, "q2", ctx)
    for cat, n in budget.kv.items():
        # the arena rounds each buffer up to 256 B
        assert n <= mem.by_category()[f"kv.{cat}"] <= n + 256 * len(lay), cat
    assert mem.total(managed=True) == (mem.total() if kv_mode == "managed" else 0)


def test_detect_and_plan_this_machine():
    m = detect()
    assert m.device_total > 0 and 0 < m.device_free <= m.device_total
    p = choose_placement(m, preset_budget(ModelConfig.flash(2), "q2", 4096))
    assert p.needed <= m.usable
    print(f"\n{m}\n{p.weights_mode}/{p.kv_mode}: {p.reason}")
    assert H200.device_total > 0
    assert os.path.exists("/proc/meminfo") == (m.host_total > 0)


@pytest.mark.parametrize("experts", ["q2", "q4"])
def test_device_and_managed_placement_give_identical_logits(tmp_path, experts, rng):
    """Issue 5: both weight placements feed the same engine bytes, so prefill and decode logits are bit-identical."""
    from ds4cupy.engines.cuda.session import CudaModel
    from ds4cupy.tools.make_model import tokenizer_fields, write_random_model
    from ds4cupy.format.model_file import ModelFile

    n_vocab, _ = tokenizer_fields(None)
    path = write_random_model(tmp_path / f"tiny-{experts}.gguf", ModelConfig.tiny(n_vocab), experts=experts, seed=21)
    ids = rng.integers(0, n_vocab, 300)
    logits = {}
    for mode in ("device", "managed"):
        model = CudaModel.from_file(ModelFile(path), memory=mode)
        assert model.weights_mode == mode
        s = model.new_session(1024)
        first = s.prefill(ids)
        steps = [s.decode(int(t)) for t in ids[:20]]
        logits[mode] = np.stack([first] + steps)
        model.close()
    assert np.isfinite(logits["device"]).all()
    np.testing.assert_array_equal(logits["device"], logits["managed"])


@pytest.mark.skipif(not os.environ.get("DS4CUPY_SLOW_TESTS"), reason="writes a ~17 GB flash-shape file; set "
                    "DS4CUPY_SLOW_TESTS=1")
def test_flash_shape_file_both_placements(tmp_path, rng):
    """Issue 5: a flash-shape file (`make-model --preset flash --layers 8`, q2 experts) placed in device memory and in
    managed memory gives bit-identical logits; prints the load time of each mode."""
    import time

    from ds4cupy.engines.cuda.session import CudaModel
    from ds4cupy.tools.make_model import preset_config, tokenizer_fields, write_random_model
    from ds4cupy.format.model_file import ModelFile

    n_vocab, _ = tokenizer_fields(None)
    t0 = time.perf_counter()
    path = write_random_model(tmp_path / "flash8.gguf", preset_config("flash", n_vocab, 8), experts="q2", seed=5)
    print(f"\nwrote {path.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s")
    ids = rng.integers(0, 129280, 200)
    logits = {}
    for mode in ("device", "managed"):
        os.posix_fadvise(os.open(path, os.O_RDONLY), 0, 0, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        model = CudaModel.from_file(ModelFile(path), memory=mode)
        load_s = time.perf_counter() - t0
        s = model.new_session(1024)
        logits[mode] = np.stack([s.prefill(ids)] + [s.decode(int(t)) for t in ids[:8]])
        print(f"{mode}: load {load_s:.2f} s ({path.stat().st_size / 1e9 / load_s:.2f} GB/s)")
        model.close()
        del model, s
    assert np.isfinite(logits["device"]).all()
    np.testing.assert_array_equal(logits["device"], logits["managed"])
