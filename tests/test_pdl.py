"""Programmatic dependent launch without a GPU: every kernel starts with DS4_PDL_ENTRY() (kernels/pdl.cuh), in the
source and in the PTX NVRTC makes of it (griddepcontrol.wait before the first global memory access of every entry,
for sm_90a and sm_121a; nothing of it for sm_80), and engines/cuda/launch.py marshals kernel arguments as CuPy does
(struct.pack of the C type CuPy picks is the reference) into the driver's CUlaunchConfig layout (cuda.h)."""
from __future__ import annotations

import ctypes
import re
import struct

import numpy as np
import pytest

from ds4cupy.engines.cuda import compile as kc
from ds4cupy.engines.cuda import launch

_KERNEL = re.compile(r'extern "C" __global__')
_ENTRY = re.compile(r"\.entry\s+(\w+)\s*\(")
# instructions that access global (or generic) memory, or start an asynchronous copy; ld.param reads the arguments
_MEMORY = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:ld|ldu|st|atom|red|cp\.async|prefetch|cp\.reduce\.async)\.(?!param)\S*",
                     re.M)


def _kernels(text: str):
    """(name, text after the body's opening brace) of every `extern "C" __global__` kernel of a .cu source."""
    for m in _KERNEL.finditer(text):
        brace = text.index("{", m.end())
        name = re.findall(r"([\w#]+)\s*\(", text[m.end():brace])[-1]
        yield name, text[brace + 1:]


@pytest.mark.parametrize("family", kc.families())
def test_every_kernel_starts_with_the_pdl_entry(family):
    """DS4_PDL_ENTRY(); is each kernel's first statement (line continuations of macro-made kernels skipped), and the
    family includes pdl.cuh."""
    text = (kc.KERNEL_DIR / f"{family}.cu").read_text()
    assert '#include "pdl.cuh"' in text, f"{family}.cu does not include pdl.cuh"
    kernels = list(_kernels(text))
    assert kernels, family
    for name, body in kernels:
        first = body.lstrip(" \t\n\\")
        assert first.startswith("DS4_PDL_ENTRY();"), f"{family}.cu: kernel {name} starts with {first[:60]!r}"


def _entries(ptx: str) -> dict[str, str]:
    starts = [(m.group(1), m.start()) for m in _ENTRY.finditer(ptx)]
    return {name: ptx[a:(starts[i + 1][1] if i + 1 < len(starts) else len(ptx))]
            for i, (name, a) in enumerate(starts)}


@pytest.mark.parametrize("arch", ["compute_90a", "compute_121a"])
@pytest.mark.parametrize("family", kc.families())
def test_ptx_waits_before_memory(family, arch):
    """In every entry of the family's PTX, griddepcontrol.wait then griddepcontrol.launch_dependents come before
    any global memory instruction."""
    ok, log, ptx = kc._compile(family, arch)
    assert ok, log
    entries = _entries(ptx.decode())
    assert entries, family
    for name, body in entries.items():
        wait = body.find("griddepcontrol.wait;")
        assert wait >= 0, f"{family}/{name} ({arch}) has no griddepcontrol.wait"
        assert body.find("griddepcontrol.launch_dependents;") > wait, f"{family}/{name} ({arch})"
        first = _MEMORY.search(body)
        assert first is None or first.start() > wait, \
            f"{family}/{name} ({arch}): {first.group(0).strip()!r} before griddepcontrol.wait"


@pytest.mark.parametrize("family", kc.families())
def test_sm80_has_no_griddepcontrol(family):
    """Below sm_90 the macro is empty: the family compiles for sm_80 and its PTX has no griddepcontrol."""
    ok, log, ptx = kc._compile(family, "compute_80")
    assert ok, log
    assert "griddepcontrol" not in ptx.decode()


def test_memory_pattern_catches_accesses():
    """The PTX check's pattern sees the instructions it must see, and not the argument loads."""
    hits = ["\tld.global.nc.f32 \t%f1, [%rd2];", "\tst.global.u32 \t[%rd1], %r2;", "\t@%p1 ld.u64 \t%rd3, [%rd4];",
            "\tatom.global.add.u32 \t%r1, [%rd1], 1;", "\tcp.async.cg.shared.global [%r1], [%rd2], 16;",
            "\tred.global.add.f32 \t[%rd1], %f1;", "\tld.shared.f32 \t%f1, [%r1];"]
    for line in hits:
        assert _MEMORY.search(line), line
    assert not _MEMORY.search("\tld.param.u64 \t%rd17, [embed_hc_param_0];")


# ---- argument marshalling (launch.arg_bytes / kernel_params) --------------------------------------------------------
SCALARS = [
    (np.float32(1.5), struct.pack("<f", 1.5)), (np.float64(-2.25), struct.pack("<d", -2.25)),
    (np.int32(-7), struct.pack("<i", -7)), (np.int64(1 << 40), struct.pack("<q", 1 << 40)),
    (np.uint64(0), struct.pack("<Q", 0)), (np.uint64(2**64 - 1), struct.pack("<Q", 2**64 - 1)),
    (np.uint32(3_000_000_000), struct.pack("<I", 3_000_000_000)), (np.int8(-3), struct.pack("<b", -3)),
    (np.uint8(200), struct.pack("<B", 200)), (np.int16(-300), struct.pack("<h", -300)),
    (np.uint16(60000), struct.pack("<H", 60000)), (np.float16(0.5), struct.pack("<e", 0.5)),
    (np.bool_(True), b"\x01"), (np.complex64(1 + 2j), struct.pack("<ff", 1, 2)),
    (np.complex128(3 - 4j), struct.pack("<dd", 3, -4)), (np.longlong(-5), struct.pack("<q", -5)),
    (np.ulonglong(6), struct.pack("<Q", 6)),
    # Python scalars: what CuPy converts them to (int -> int64, float -> float64, bool is an int -> int64)
    (7, struct.pack("<q", 7)), (-(1 << 62), struct.pack("<q", -(1 << 62))), (0.1, struct.pack("<d", 0.1)),
    (True, struct.pack("<q", 1)), (False, struct.pack("<q", 0)), (1j, struct.pack("<dd", 0, 1)),
]


@pytest.mark.parametrize("value, expected", SCALARS,
                         ids=[f"{type(v).__name__}-{i}" for i, (v, _) in enumerate(SCALARS)])
def test_scalar_bytes(value, expected):
    assert launch.arg_bytes(0, value) == expected


@pytest.mark.parametrize("bad", [None, "3", np.zeros(2, np.float32), np.array(1.0), [1], object()])
def test_unsupported_argument_names_its_index(bad):
    with pytest.raises(TypeError, match=r"kernel argument 2: unsupported type"):
        launch.kernel_params((np.int32(1), 2.0, bad))


def test_int_out_of_int64_range_is_an_error():
    with pytest.raises(OverflowError):
        launch.arg_bytes(0, 1 << 63)


def test_kernel_params_point_at_each_argument():
    """void*[i] points at argument i's bytes, 8-byte aligned (the driver copies each parameter from there)."""
    args = (np.float32(2.5), np.int64(-9), np.uint8(4), 3, np.complex128(1 - 1j))
    params, bufs = launch.kernel_params(args)
    assert len(params) == len(args)
    for i, a in enumerate(args):
        b = launch.arg_bytes(i, a)
        assert params[i] % 8 == 0
        assert ctypes.string_at(params[i], len(b)) == b


def test_launch_struct_layout():
    """cuda.h (CUDA 12 / 13): CUlaunchAttribute is {int id; char pad[4]; union of 64 bytes} = 72 bytes;
    CUlaunchConfig is 7 unsigned ints, then the stream handle (offset 32), the attribute pointer (40) and numAttrs
    (48), 56 bytes in all; the attribute id CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION is 6."""
    A, C = launch.CUlaunchAttribute, launch.CUlaunchConfig
    assert ctypes.sizeof(A) == 72 and A.value.offset == 8 and ctypes.alignment(A) == 8
    assert (C.sharedMemBytes.offset, C.hStream.offset, C.attrs.offset, C.numAttrs.offset) == (24, 32, 40, 48)
    assert ctypes.sizeof(C) == 56
    assert launch.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION == 6
    driver = pytest.importorskip("cuda.bindings.driver")
    assert driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION.value == 6


def test_switch_on_by_default_and_off_with_zero(monkeypatch):
    """On by default since its GPU run (switches.py); DS4CUPY_PDL=0 turns it off."""
    from ds4cupy.engines.cuda import switches
    monkeypatch.delenv("DS4CUPY_PDL", raising=False)
    assert switches.enabled("PDL") is True
    monkeypatch.setenv("DS4CUPY_PDL", "0")
    assert switches.enabled("PDL") is False
