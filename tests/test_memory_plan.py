"""CPU tests of ds4cupy.memory: KV layout, budgets, the auto decision table, the refusal and its message."""
import dataclasses
import io
import math
import re

import numpy as np
import pytest

from ds4cupy.format.config import ModelConfig
from ds4cupy.memory import (GB10, H100, H200, KV_MANAGED_MIN, RTX_PRO_6000, Budget, MachineInfo, MemoryFitError,
                            PlacementError, Progress, choose_placement, format_budget, kv_bytes_per_token,
                            kv_fixed_bytes, kv_layout, place_model, preset_budget, preset_tensors, raw_cap,
                            weight_category)

GiB = 1 << 30
FLASH = ModelConfig.flash()
TINY = ModelConfig.tiny(512)
MACHINES = {"gb10": GB10, "h100": H100, "h200": H200, "rtx6000": RTX_PRO_6000}


# ---- KV layout ---------------------------------------------------------------------------------------------------
def test_kv_bytes_per_token_matches_ds4():
    # ds4: 21 ratio-4 layers * (2048 + 512) / 4 + 20 ratio-128 layers * 2048 / 128 = 13,760 B a token
    assert kv_bytes_per_token(FLASH) == 13760


def test_budget_with_packed_indexer_rows():
    """Budget.build(index_fp4=True) sizes the indexer rows as the CUDA engine stores them with INDEXER_FP4 (68 bytes a
    row: 17 instead of 128 a token per CSA layer), keeps it through with_ctx, and only the index buffers change."""
    from ds4cupy.memory.budget import Budget, preset_tensors
    tensors = preset_tensors(FLASH, "q2")
    flat, packed = (Budget.build(FLASH, tensors, 65536, index_fp4=f) for f in (False, True))
    assert flat.kv_per_token == 13760 and packed.kv_per_token == 13760 - 21 * (128 - 17)
    assert flat.weights == packed.weights and flat.scratch == packed.scratch
    index_rows = 21 * (65536 // 4 + 2)
    assert flat.kv_total - packed.kv_total == index_rows * (512 - 68)
    assert packed.with_ctx(4096).index_fp4 and packed.with_ctx(4096).kv_per_token == packed.kv_per_token


def test_kv_layout_shapes_flash():
    ctx = 65536
    lay = {(b.layer, b.name): b for b in kv_layout(FLASH, ctx)}
    assert lay[(0, "raw")].shape == (2304, 512)                 # align256(128 + 2048)
    assert (0, "comp") not in lay and (1, "index") not in lay    # window-only layers
    assert lay[(2, "comp")].shape == (ctx // 4 + 2, 512)
    assert lay[(2, "index")].shape == (ctx // 4 + 2, 128)
    assert lay[(2, "comp_kv_state")].shape == (8, 1024)
    assert lay[(2, "index_score_state")].shape == (8, 256)
    assert lay[(3, "comp")].shape == (ctx // 128 + 2, 512)
    assert lay[(3, "comp_score_state")].shape == (128, 512)
    assert (3, "index") not in lay
    assert all(b.dtype == np.float32 for b in lay.values())
    assert sum(1 for k in lay if k[1] == "raw") == 43


def test_raw_cap_small_context():
    assert raw_cap(FLASH, 100) == 256          # align256(128 + 100)
    assert raw_cap(TINY, 64) == 256            # window 32 + 64
    assert raw_cap(FLASH, 10 ** 6) == 2304


@pytest.mark.parametrize("cfg", [FLASH, TINY], ids=["flash", "tiny"])
@pytest.mark.parametrize("ctx", [4096, 65536, 1 << 20])
def test_budget_kv_is_the_layout(cfg, ctx):
    b = preset_budget(cfg, "q2", ctx)
    total = sum(x.nbytes for x in kv_layout(cfg, ctx))
    assert b.kv_total == total
    # fixed part + per-token growth reproduce the layout within the integer rounding of ctx // ratio
    assert abs(kv_fixed_bytes(cfg, ctx) + kv_bytes_per_token(cfg) * ctx - total) <= 1
    assert b.kv["comp"] + b.kv["index"] == pytest.approx(kv_bytes_per_token(cfg) * ctx, rel=0.01)


# ---- weights -----------------------------------------------------------------------------------------------------
def test_preset_weight_sizes():
    q2 = preset_budget(FLASH, "q2", 4096)
    q4 = preset_budget(FLASH, "q4", 4096)
    assert q2.weights_total / GiB == pytest.approx(80.76, abs=0.02)
    assert q4.weights_total / GiB == pytest.approx(153.32, abs=0.02)
    assert q2.weights["experts"] / GiB == pytest.approx(72.5625, abs=1e-6)
    assert q2.weight_types["experts"] == "IQ2_XXS+Q2_K"
    assert q4.weight_types["experts"] == "Q4_K"
    n = sum(nb for _, _, nb in preset_tensors(FLASH, "q2"))
    assert n == q2.weights_total


def test_weight_categories():
    assert weight_category("blk.7.ffn_down_exps.weight") == "experts"
    assert weight_category("token_embd.weight") == "embed_head"
    assert weight_category("output.weight") == "embed_head"
    assert weight_category("blk.0.attn_q_b.weight") == "dense"
    assert weight_category("blk.0.ffn_up_shexp.weight") == "dense"
    assert weight_category("blk.0.attn_norm.weight") == "small"
    assert weight_category("blk.0.ffn_gate_tid2eid.weight") == "small"


# ---- the auto decision table -------------------------------------------------------------------------------------
# (machine, model, experts, ctx) -> (weights_mode, kv_mode) or "refuse"
TABLE = [
    ("gb10", "flash", "q2", 4096, ("managed", "device")),
    ("gb10", "flash", "q2", 65536, ("managed", "device")),
    ("gb10", "flash", "q2", 1 << 20, ("managed", "managed")),   # KV 13.6 GiB >= 8 GiB on unified memory
    ("gb10", "flash", "q4", 4096, "refuse"),
    ("gb10", "flash8", "q2", 65536, ("device", "device")),       # two copies of 16 GiB fit: device is faster
    ("gb10", "tiny", "q2", 4096, ("device", "device")),
    ("h100", "flash", "q2", 4096, "refuse"),                     # q2 barely misses an 80 GB H100
    ("h100", "flash", "q4", 4096, "refuse"),
    ("h100", "flash8", "q2", 65536, ("device", "device")),
    ("h100", "tiny", "q2", 1 << 20, ("device", "device")),
    ("h200", "flash", "q2", 4096, ("device", "device")),
    ("h200", "flash", "q2", 1 << 20, ("device", "device")),      # big KV stays device on a discrete GPU
    ("h200", "flash", "q4", 4096, "refuse"),
    ("rtx6000", "flash", "q2", 65536, ("device", "device")),
    ("rtx6000", "flash", "q2", 1 << 20, "refuse"),
    ("rtx6000", "flash", "q4", 65536, "refuse"),
    ("rtx6000", "tiny", "q4", 4096, ("device", "device")),
]


def _budget(model, experts, ctx):
    cfg = {"flash": FLASH, "flash8": ModelConfig.flash(8), "tiny": TINY}[model]
    return preset_budget(cfg, experts, ctx)


@pytest.mark.parametrize("machine,model,experts,ctx,want", TABLE)
def test_auto_decision_table(machine, model, experts, ctx, want):
    m = MACHINES[machine]
    b = _budget(model, experts, ctx)
    if want == "refuse":
        with pytest.raises(MemoryFitError) as ei:
            choose_placement(m, b)
        assert ei.value.needed == b.total and ei.value.usable == m.usable and ei.value.needed > m.usable
        return
    p = choose_placement(m, b)
    assert (p.weights_mode, p.kv_mode) == want, p.reason
    assert "\n" not in p.reason and p.reason
    assert p.needed == b.total <= m.usable      # never planned above free memory, managed included


@pytest.mark.parametrize("mode", ["auto", "device", "managed"])
@pytest.mark.parametrize("machine", list(MACHINES))
@pytest.mark.parametrize("experts,ctx", [("q2", 4096), ("q2", 1 << 20), ("q4", 4096)])
def test_never_plans_above_usable(machine, mode, experts, ctx):
    m = MACHINES[machine]
    b = _budget("flash", experts, ctx)
    try:
        p = choose_placement(m, b, mode)
    except MemoryFitError as e:
        assert b.total > m.usable and e.needed == b.total
    else:
        assert b.total <= m.usable and p.needed <= m.device_free


def test_kv_managed_threshold_on_unified_memory():
    """ds4 puts a KV cache of 8 GiB or more in managed memory on unified-memory GPUs (ds4-peer.md,
    `ds4_gpu_should_use_managed_kv_cache`). The 8 GiB is written here, not read from the module under test."""
    eight_gib = 8 * 1024 ** 3
    assert KV_MANAGED_MIN == eight_gib
    base = _budget("flash", "q2", 4096)
    for kv, want in ((eight_gib - 1, "device"), (eight_gib, "managed"), (eight_gib + 4096, "managed")):
        b = dataclasses.replace(base, kv={"comp": kv})
        assert choose_placement(GB10, b).kv_mode == want, kv
        assert choose_placement(H200, b).kv_mode == "device"        # a discrete GPU keeps it on the device
    # the flash shapes: 13,760 B a token, so 2^19 tokens (6.7 GiB) stay on the device and 2^20 (13.4 GiB) go managed
    for ctx, want in ((1 << 18, "device"), (1 << 19, "device"), (1 << 20, "managed")):
        assert (13760 * ctx >= eight_gib) == (want == "managed")
        assert choose_placement(GB10, _budget("flash", "q2", ctx)).kv_mode == want, ctx


def test_forced_modes():
    b = _budget("flash8", "q2", 4096)
    assert choose_placement(H200, b, "managed").weights_mode == "managed"
    assert choose_placement(GB10, b, "device").weights_mode == "device"
    wsl = MachineInfo("no-managed", False, False, False, 100 * GiB, 99 * GiB, 64 * GiB, 60 * GiB)
    with pytest.raises(PlacementError, match="concurrentManagedAccess"):
        choose_placement(wsl, b, "managed")
    with pytest.raises(MemoryFitError):        # managed does not lift the limit on a discrete GPU
        choose_placement(H100, _budget("flash", "q2", 4096), "managed")
    with pytest.raises(ValueError, match="'fast'"):
        choose_placement(H200, b, "fast")


def test_unified_memory_counts_host_available():
    b = _budget("flash", "q2", 4096)
    tight = GB10.with_free(host_available=int(b.total - GiB))
    with pytest.raises(MemoryFitError, match="host available"):
        choose_placement(tight, b)


# ---- the failure message -----------------------------------------------------------------------------------------
def _gib(s):
    return float(s.replace(" GiB", ""))


def test_fit_error_message_names_numbers_and_smaller_ctx():
    b = _budget("flash", "q2", 1 << 20)
    with pytest.raises(MemoryFitError) as ei:
        choose_placement(RTX_PRO_6000, b)
    msg = str(ei.value)
    assert f"needs {b.total / GiB:.2f} GiB" in msg
    assert f"{RTX_PRO_6000.device_free / GiB:.2f} GiB free" in msg
    assert f"short by {(b.total - RTX_PRO_6000.usable) / GiB:.2f} GiB" in msg
    assert "routed experts 72.56 GiB" in msg and "compressed rows" in msg
    m = re.search(r"--ctx (\d+) or less fits", msg)
    assert m, msg
    ctx = int(m.group(1))
    assert ctx % 1024 == 0 and 65536 < ctx < (1 << 20)
    assert b.with_ctx(ctx).total <= RTX_PRO_6000.usable < b.with_ctx(ctx + 1024).total
    assert "--kv fp8" in msg


def test_fit_error_suggests_q2_for_q4():
    b = _budget("flash", "q4", 65536)
    with pytest.raises(MemoryFitError) as ei:
        choose_placement(H200, b)
    msg = str(ei.value)
    assert "q2 experts (IQ2_XXS + Q2_K) instead of Q4_K" in msg
    q2_total = _budget("flash", "q2", 65536).total
    assert f"total {q2_total / GiB:.2f} GiB" in msg
    assert "still too big" not in msg                      # q2 fits the H200
    assert "--ctx" not in msg                              # no context length makes q4 fit


def test_fit_error_when_weights_alone_do_not_fit():
    with pytest.raises(MemoryFitError) as ei:
        choose_placement(H100, _budget("flash", "q2", 4096))
    msg = str(ei.value)
    assert "no context length fits" in msg
    assert "never planned" in msg
    assert "--ctx" not in msg
    assert ei.value.suggestions and all(s in msg for s in ei.value.suggestions)


# ---- nothing is allocated before a refusal -----------------------------------------------------------------------
class _Reached(Exception):
    pass


class CountingMemory:
    """DeviceMemory double: counts alloc calls, and stops at the first one (no GPU here)."""

    def __init__(self):
        self.calls = 0

    def alloc(self, category, shape, dtype, managed=False):
        self.calls += 1
        raise _Reached(category)


def test_nothing_allocated_before_refusal(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"\0" * 4096)
    tensors = [("blk.0.ffn_gate_exps.weight", 0, 4096, np.uint8, (16, 256))]
    mem = CountingMemory()
    with pytest.raises(MemoryFitError):
        place_model(str(f), tensors, _budget("flash", "q2", 4096), mem, H100)
    assert mem.calls == 0
    # the double does see allocations when the plan fits (so the count above can fail)
    mem = CountingMemory()
    with pytest.raises(_Reached):
        place_model(str(f), tensors, _budget("tiny", "q2", 4096), mem, H100)
    assert mem.calls == 1


# ---- report and progress -----------------------------------------------------------------------------------------
def test_format_budget():
    b = _budget("flash", "q2", 1 << 20)
    p = choose_placement(GB10, b)
    s = format_budget(b, p, GB10)
    for label in ("routed experts", "embedding + head", "raw window rings", "compressed rows", "indexer rows",
                  "compressor state", "scratch", "graph buffers", "total", "13.76 KB/token"):
        assert label in s, label
    assert f"{b.total / GiB:.3f} GiB" in s
    assert "placement: weights managed, KV managed" in s
    assert s.count("\n") >= 15


def test_budget_build_from_tensor_list():
    b = Budget.build(TINY, [("blk.0.ffn_up_exps.weight", "Q4_K", 1000), ("output.weight", "Q8_0", 24)], 1024)
    assert b.weights == {"experts": 1000, "dense": 0, "embed_head": 24, "small": 0}
    assert b.total == 1024 + b.kv_total + b.scratch + b.graph + b.reserve
    with pytest.raises(ValueError, match="ctx must be > 0, got 0"):
        Budget.build(TINY, [], 0)


def test_progress_quiet_when_not_a_terminal():
    buf = io.StringIO()
    p = Progress(1000, stream=buf)
    p.update(500)
    p.close()
    assert buf.getvalue() == "" and not p.enabled
    buf = io.StringIO()
    p = Progress(2 * 10 ** 9, stream=buf, enabled=True, min_interval=0)
    p.update(10 ** 9)
    p.close()
    out = buf.getvalue()
    assert "1.00/2.00 GB" in out and "GB/s" in out and "ETA" in out and out.endswith("\n")
    assert math.isfinite(p.done)
