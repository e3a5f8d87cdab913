"""Programmatic dependent launch (switch PDL: engines/cuda/launch.py, kernels/pdl.cuh) on the GPU (sm_90+).

- The launcher: a probe kernel that stores every argument it gets, called with every argument kind the engine passes
  (and the other kinds CuPy accepts) through launch.PdlKernel and through the plain cupy.RawKernel, each captured
  into a CUDA graph (PdlKernel marshals the arguments itself only for a capturing stream; eagerly it is the plain
  launch): the same bytes, equal to the values passed (struct.pack is the reference). Dynamic shared memory above
  48 KB through the RawKernel's attribute set on the wrapper; a bad launch raises CUDA's error.
- Ordering: a chain of 200 kernels, each adding 1 to its predecessor's output after a ~5 us delay (ping-pong
  buffers), launched with PDL, eagerly and captured into a CUDA graph: exactly start + 200. The same chain of a
  kernel without griddepcontrol.wait (launch_dependents only) must come out wrong under PDL: that shows the launches
  really overlap (programmatic edges in the graph), so the first result is the wait's doing.
- The tiny model (test_gpu_model's tiny_file, q2 and q4 experts, QAT on and off): a 300-token prefill (chunks of 64)
  and 30 greedy decode steps (the decode graph captured at the second), PDL on then off: the logits identical bit
  for bit at every step (bound 0: PDL changes no arithmetic, only when kernels may start) and the same tokens. The
  switch is read when get_kernel is called, so the two sessions run one after the other with the switch set for each
  (test_gpu_model._on_and_off builds both first and then runs them in lockstep, which would run both with it off).
"""
from __future__ import annotations

import struct

import numpy as np
import pytest

from gpu_util import GPU_MARKS, gpu_available
from test_gpu_model import tiny_file  # noqa: F401 (fixture)

cp = pytest.importorskip("cupy") if gpu_available() else None

pytestmark = GPU_MARKS


@pytest.fixture(autouse=True)
def _sm90():
    from ds4cupy.engines.cuda import launch
    if not launch.supported(cp.cuda.Device().id):
        pytest.skip("PDL needs compute capability >= 9.0")


def _source(body: str) -> str:
    """`body` with kernels/pdl.cuh (DS4_PDL_ENTRY) in front."""
    from ds4cupy.engines.cuda.compile import KERNEL_DIR
    return (KERNEL_DIR / "pdl.cuh").read_text().replace("#pragma once", "") + body


def _raw_kernel(body: str, name: str):
    return cp.RawKernel(_source(body), name, options=("-std=c++17",))


PROBE = r"""
extern "C" __global__ void probe(unsigned long long* out, const float* x, unsigned long long p, int i32, long long i64,
                                 unsigned int u32, unsigned long long u64, float f32, double f64, signed char i8,
                                 unsigned char u8, short i16, unsigned short f16_bits, bool b, long long py_int,
                                 double py_float, long long py_bool, const float* mp, double2 c128) {
    DS4_PDL_ENTRY();
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    out[0] = (unsigned long long)x; out[1] = p; out[2] = (unsigned int)i32; out[3] = (unsigned long long)i64;
    out[4] = u32; out[5] = u64; out[6] = __float_as_uint(f32); out[7] = __double_as_longlong(f64);
    out[8] = (unsigned char)i8; out[9] = u8; out[10] = (unsigned short)i16; out[11] = f16_bits; out[12] = b;
    out[13] = (unsigned long long)py_int; out[14] = __double_as_longlong(py_float);
    out[15] = (unsigned long long)py_bool;
    out[16] = (unsigned long long)mp; out[17] = __double_as_longlong(c128.x); out[18] = __double_as_longlong(c128.y);
    out[19] = __float_as_uint(x[1]);                      // the pointer is usable
}
"""


def _in_graph(launch):
    """launch() captured into a CUDA graph on a fresh stream, then the graph run: PdlKernel takes cuLaunchKernelEx
    only for a stream being captured (launch.py, "Where"); eagerly it is the plain RawKernel launch."""
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            launch()
        except BaseException:
            try:
                stream.end_capture()
            except Exception:           # the capture is invalid after a failed launch: the launch's error is the news
                pass
            raise
        stream.end_capture().launch(stream)
        stream.synchronize()


@pytest.fixture
def pdl_launches(monkeypatch):
    """Counts the launches that went through cuLaunchKernelEx."""
    from ds4cupy.engines.cuda import launch
    count = [0]
    real = launch._launch_ex

    def counting(*a):
        count[0] += 1
        return real(*a)
    monkeypatch.setattr(launch, "_launch_ex", counting)
    return count


def _u64(fmt, v):
    return struct.unpack("<Q", struct.pack(fmt, v).ljust(8, b"\0"))[0]


def test_every_argument_kind_as_cupy_passes_it(pdl_launches):
    from ds4cupy.engines.cuda.launch import PdlKernel
    raw = _raw_kernel(PROBE, "probe")
    pdl = PdlKernel(raw)
    x = cp.asarray(np.array([0.0, 3.25], np.float32))
    mp = cp.zeros(4, np.float32)
    args = (x, np.uint64(0x1234_5678_9ABC), np.int32(-5), np.int64(-(1 << 40)), np.uint32(4_000_000_000),
            np.uint64(2**64 - 2), np.float32(1.5), np.float64(-0.1), np.int8(-7), np.uint8(250), np.int16(-1234),
            np.float16(0.333), np.bool_(True), 123_456_789_012, 2.5e-300, True, mp.data, np.complex128(1.25 - 2j))
    expected = [x.data.ptr, 0x1234_5678_9ABC, _u64("<I", 2**32 - 5), _u64("<q", -(1 << 40)), 4_000_000_000,
                2**64 - 2, _u64("<f", 1.5), _u64("<d", -0.1), 256 - 7, 250, 2**16 - 1234,
                _u64("<e", np.float16(0.333)), 1, 123_456_789_012, _u64("<d", 2.5e-300), 1, mp.data.ptr,
                _u64("<d", 1.25), _u64("<d", -2.0), _u64("<f", 3.25)]
    outs = []
    for kern in (raw, pdl):
        out = cp.full(20, 0xDEAD, np.uint64)
        _in_graph(lambda: kern((1,), (32,), (out, *args)))
        outs.append(cp.asnumpy(out))
    assert pdl_launches[0] == 1
    np.testing.assert_array_equal(outs[1], outs[0])
    np.testing.assert_array_equal(outs[1], np.array(expected, np.uint64))


def test_dynamic_shared_memory_above_48k_and_errors(pdl_launches):
    """The max-dynamic-shared-memory attribute set through the wrapper (as attention_mma / moe_grouped do) holds
    for its launches; beyond the attribute the launch fails with CUDA's error, as the RawKernel's does."""
    from cupy_backends.cuda.api.driver import CUDADriverError
    from ds4cupy.engines.cuda.launch import PdlKernel
    body = r"""
    extern "C" __global__ void smem_sum(const float* x, float* out, int n) {
        DS4_PDL_ENTRY();
        extern __shared__ float s[];
        for (int i = threadIdx.x; i < n; i += blockDim.x) s[i] = x[i];
        __syncthreads();
        if (threadIdx.x == 0) { float acc = 0.f; for (int i = 0; i < n; ++i) acc += s[i]; out[0] = acc; }
    }"""
    pdl = PdlKernel(_raw_kernel(body, "smem_sum"))
    n = 20_000                                              # 80,000 bytes
    x = cp.asarray(np.arange(n, dtype=np.float32) % 7)
    out = cp.zeros(1, np.float32)
    with pytest.raises(CUDADriverError):
        _in_graph(lambda: pdl((1,), (256,), (x, out, np.int32(n)), shared_mem=4 * n))
    pdl.max_dynamic_shared_size_bytes = 4 * n
    assert pdl.raw.max_dynamic_shared_size_bytes == 4 * n
    _in_graph(lambda: pdl((1,), (256,), (x, out, np.int32(n)), shared_mem=4 * n))
    assert pdl_launches[0] == 2
    assert float(out[0]) == float(np.sum(np.arange(n) % 7))   # small integers: exact in float32
    out[...] = 0                                               # eagerly: the plain launch, same result
    pdl((1,), (256,), (x, out, np.int32(n)), shared_mem=4 * n)
    assert pdl_launches[0] == 2 and float(out[0]) == float(np.sum(np.arange(n) % 7))


CHAIN = r"""
__device__ __forceinline__ void spin(unsigned long long ns) {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < ns);
}
// out[j] = in[j] + 1, stored after a ~5 us delay so that a kernel started early reads the old value
extern "C" __global__ void chain_step(const float* in, float* out, int n) {
    DS4_PDL_ENTRY();
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const float v = j < n ? in[j] : 0.f;
    spin(5000);
    if (j < n) out[j] = v + 1.f;
}
// the same without the wait: the control that shows the overlap
extern "C" __global__ void chain_step_nowait(const float* in, float* out, int n) {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const float v = j < n ? in[j] : 0.f;
    spin(5000);
    if (j < n) out[j] = v + 1.f;
}
"""
CHAIN_LEN, CHAIN_N = 200, 1000


def _run_chain(kern, graph: bool):
    a = cp.asarray(np.arange(CHAIN_N, dtype=np.float32))
    b = cp.full(CHAIN_N, -1, np.float32)
    stream = cp.cuda.Stream(non_blocking=True)

    def launches():
        for i in range(CHAIN_LEN):
            src, dst = (a, b) if i % 2 == 0 else (b, a)
            kern(((CHAIN_N + 127) // 128,), (128,), (src, dst, np.int32(CHAIN_N)))
    with stream:
        if graph:
            stream.begin_capture()
            launches()
            stream.end_capture().launch(stream)
        else:
            launches()
        stream.synchronize()
    return cp.asnumpy(a if CHAIN_LEN % 2 == 0 else b)


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_dependent_chain_is_exact(graph):
    from ds4cupy.engines.cuda.launch import PdlKernel
    raw = cp.RawModule(code=_source(CHAIN), options=("-std=c++17",))
    expected = np.arange(CHAIN_N, dtype=np.float32) + CHAIN_LEN
    np.testing.assert_array_equal(_run_chain(raw.get_function("chain_step"), graph), expected)     # plain launches
    np.testing.assert_array_equal(_run_chain(PdlKernel(raw.get_function("chain_step")), graph), expected)
    # control: without the wait, PDL lets each kernel read its input before its predecessor wrote it (graph capture
    # only: eager PdlKernel launches are plain launches, launch.py "Where", so there the chain stays exact)
    nowait = _run_chain(PdlKernel(raw.get_function("chain_step_nowait")), graph)
    if graph:
        assert not np.array_equal(nowait, expected), "no overlap seen: PDL did not start kernels early (edges missing?)"
    else:
        np.testing.assert_array_equal(nowait, expected)


@pytest.mark.parametrize("qat", [False, True])
def test_tiny_model_pdl_on_vs_off_bit_identical(tiny_file, qat, rng, monkeypatch):
    from ds4cupy.engines.cuda import launch
    from ds4cupy.engines.cuda.session import CudaModel
    from ds4cupy.format.model_file import ModelFile
    launches = [0]
    real = launch._launch_ex

    def counting(*a):
        launches[0] += 1
        return real(*a)
    monkeypatch.setattr(launch, "_launch_ex", counting)
    ids = None
    runs = {}
    for value in ("1", "0"):
        monkeypatch.setenv("DS4CUPY_PDL", value)
        launches[0] = 0
        sess = CudaModel.from_file(ModelFile(tiny_file), qat=qat, memory="device", chunk=64).new_session(512)
        if ids is None:
            ids = rng.integers(0, sess.model.config.n_vocab, 300)
        logits = [sess.prefill(ids)]
        tokens = runs["1"][1] if value == "0" else []
        for step in range(30):
            if value == "1":
                tokens.append(int(np.argmax(logits[-1])))
            logits.append(sess.decode(tokens[step]))
        runs[value] = (logits, tokens, launches[0])
        del sess
    (on, toks, n_on), (off, _, n_off) = runs["1"], runs["0"]
    assert n_on > 0 and n_off == 0, (n_on, n_off)
    for step, (a, b) in enumerate(zip(on, off)):
        np.testing.assert_array_equal(a, b, err_msg=f"logits differ at step {step} (0 = the prefill)")
    assert [int(np.argmax(v)) for v in off[:-1]] == toks     # the same greedy tokens
    print(f"tiny model, PDL on vs off: {len(on)} logit vectors bit-identical; {n_on} PDL launches")
