"""Every kernel family compiles cleanly (no error, no warning) for the GPUs we target, through NVRTC alone: no GPU
or driver needed, so CI runs it."""
import re

import numpy as np
import pytest

from ds4cupy.engines.cuda import compile as kc

ARCHS = ["sm_121a", "sm_120", "sm_90a", "sm_100a"]   # GB10, RTX PRO 6000, H100/H200, B200 (issue 18)


def test_nvrtc_loads():
    """NVRTC comes with the test extra (nvidia-cuda-nvrtc, cuda-bindings): without it the compile tests fail, they do
    not skip."""
    major, minor = kc.nvrtc_version()
    assert major >= 12, (major, minor)


def test_there_are_kernel_families():
    assert {"matvec", "matmul", "moe", "random_blocks"} <= set(kc.families())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("family", kc.families())
def test_family_compiles_without_warnings(family, arch):
    ok, log = kc.compile_for_arch(family, arch)
    assert ok, f"{family}.cu failed for {arch}:\n{log}"
    assert "warning" not in log.lower(), f"{family}.cu has warnings for {arch}:\n{log}"


def test_errors_name_file_and_line(tmp_path, monkeypatch):
    (tmp_path / "helper.cuh").write_text("#pragma once\n__device__ int ok() { return 1; }\n"
                                         "__device__ int broken() { return undefined_name; }\n")
    (tmp_path / "broken.cu").write_text('#include "helper.cuh"\nextern "C" __global__ void k(int* p) { *p = ok(); }\n')
    monkeypatch.setattr(kc, "KERNEL_DIR", tmp_path)
    ok, log = kc.compile_for_arch("broken", "sm_90a")
    assert not ok
    assert re.search(r"helper\.cuh\(3\).*undefined_name", log), log
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(kc.KernelCompileError, match=r"broken.*sm_90a[\s\S]*helper\.cuh\(3\)"):
        kc.compiled_binary_path("broken", "sm_90a")


def test_cache_reuses_binary(tmp_path, monkeypatch):
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path))
    p1 = kc.compiled_binary_path("random_blocks", "sm_90a")
    mtime = p1.stat().st_mtime_ns
    p2 = kc.compiled_binary_path("random_blocks", "sm_90a")
    assert p1 == p2 and p2.stat().st_mtime_ns == mtime and p1.stat().st_size > 1000


def test_precompile_fills_the_cache_in_parallel(tmp_path, monkeypatch, capsys):
    """precompile (and `python -m ds4cupy.engines.cuda.compile`) writes each family's binary where
    compiled_binary_path then finds it, from worker processes; an unknown family is an error naming it."""
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path))
    assert kc.precompile("sm_90a", jobs=2, fams=["embed", "router"]) == {}
    cached = sorted(p.name.split("-")[0] for p in (tmp_path / "ds4cupy").glob("*.cubin"))
    assert cached == ["embed", "router"]
    mtime = kc.compiled_binary_path("embed", "sm_90a").stat().st_mtime_ns     # found, not rebuilt
    assert kc.compiled_binary_path("embed", "sm_90a").stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="'nope'"):
        kc.precompile("sm_90a", jobs=1, fams=["nope"])


def test_unknown_family_names_it():
    with pytest.raises(ValueError, match="'nope'"):
        kc.expanded_source("nope")


def test_arch_choice():
    assert kc.arch_for_capability(12, 1) == "sm_121a"
    assert kc.arch_for_capability(12, 0) == "sm_120"
    assert kc.arch_for_capability(9, 0) == "sm_90a"
    assert kc.arch_for_capability(10, 0) == "sm_100a"
    assert kc.arch_for_capability(8, 9) == "compute_89"


def test_no_fast_math_in_options():
    opts = kc.compile_options("sm_90a")
    assert "--use_fast_math" not in opts and not any(o.startswith("-ftz=true") for o in opts)
    assert "--gpu-architecture=sm_90a" in opts


def test_iq2xxs_grid_table_matches_gguf():
    from ds4cupy.format.quants import iq2xxs_grid
    text = (kc.KERNEL_DIR / "quant_blocks.cuh").read_text()
    body = text[text.index("IQ2XXS_GRID[256] = {"):]
    body = body[:body.index("};")]
    values = [int(v, 16) for v in re.findall(r"0x([0-9a-fA-F]{16})ull", body)]
    assert len(values) == 256
    assert np.array_equal(np.array(values, dtype="<u8").view(np.uint8).reshape(256, 8), iq2xxs_grid())


def test_iq2xxs_grid_holds_three_magnitudes():
    """moe_gate_up_i8s_iq2_xxs codes each grid byte as 0, 1, 2 (b > 8) + (b > 25) and maps the codes back through
    the bytes 8, 25, 43 (I8S_LUT_LO): that round trip holds only if the grid has exactly these three values."""
    from ds4cupy.format.quants import iq2xxs_grid
    grid = iq2xxs_grid().astype(np.int64)
    assert set(np.unique(grid)) == {8, 25, 43}
    codes = (grid > 8).astype(np.int64) + (grid > 25)
    assert np.array_equal(np.array([8, 25, 43])[codes], grid)
    text = (kc.KERNEL_DIR / "moe.cu").read_text()
    lut_lo = int(re.search(r"#define I8S_LUT_LO 0x([0-9a-fA-F]{8})u", text).group(1), 16)
    lut_hi = int(re.search(r"#define I8S_LUT_HI 0x([0-9a-fA-F]{8})u", text).group(1), 16)
    assert [(lut_lo >> (8 * c)) & 255 for c in range(3)] == [8, 25, 43]
    assert [((lut_hi >> (8 * c)) & 255) - 256 for c in range(3)] == [-8, -25, -43]
