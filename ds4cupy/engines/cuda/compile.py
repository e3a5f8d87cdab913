"""Run-time compilation of the CUDA C kernel families in ds4cupy/kernels/*.cu.

One family = one `.cu` file = one module. Everyone's kernels go through the two calls below:

    from ds4cupy.engines.cuda.compile import get_kernel
    k = get_kernel("matvec", "matvec_q8_0")      # cupy.RawKernel, compiled once per device and cached on disk
    k((grid,), (256,), (args...))                # launch on the current CuPy stream
                                                 # (switch PDL: programmatic dependent launch, launch.py)

    compile_for_arch("matvec", "sm_90a")  -> (ok, log)   # NVRTC only, no driver or GPU needed (CI uses it)

How a family is built:
- Source: `<family>.cu`, with every `#include "x.cuh"` of a file in ds4cupy/kernels inlined (each once), framed by
  `#line` directives, so compiler messages name the original file and line. Kernels meant to be launched from Python
  are `extern "C" __global__` (no name mangling). Do not include CUDA toolkit headers (cuda_fp16.h ...): NVRTC's
  include path differs between machines; quant_blocks.cuh has the few conversions needed as PTX one-liners.
- Target: from the device's compute capability, `arch_for_capability`: 12.1 -> sm_121a (GB10), 12.0 -> sm_120,
  10.0 -> sm_100a, 9.0 -> sm_90a (H100/H200), any other X.Y -> compute_XY (PTX the driver JIT-compiles).
- Options, all in COMPILE_OPTIONS: C++17; FMA contraction on (`--fmad=true`, the default; code that needs exact
  rounding uses __fmul_rn / __fadd_rn, as quant_blocks.cuh does for dequantization); NO --use_fast_math, no
  flush-to-zero: expf, division and sqrt stay IEEE-accurate (silu, softplus, the FP8/FP4 QAT rounding depend on it).
  `-lineinfo` keeps profiler source mapping. Extra defines: `DS4_NVRTC_OPTIONS` env var (space separated), for
  experiments only.
- Compiler: NVRTC, through `cuda.bindings.nvrtc` when installed, else CuPy's own NVRTC binding (same library).
- Cache: the cubin/PTX is stored under CuPy's kernel cache directory (CUPY_CACHE_DIR, default ~/.cupy/kernel_cache)
  in `ds4cupy/`, keyed by a hash of the expanded source, options, arch and NVRTC version; the module is loaded with
  `cupy.RawModule(path=...)`. A compile error raises KernelCompileError with the NVRTC log (file:line: message).
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import tempfile
from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parents[2] / "kernels"
COMPILE_OPTIONS: tuple[str, ...] = ("-std=c++17", "--fmad=true", "-lineinfo")
_INCLUDE_RE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')
_KNOWN_ARCHS = {(12, 1): "sm_121a", (12, 0): "sm_120", (10, 0): "sm_100a", (9, 0): "sm_90a"}


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel family; the message holds the family, the arch and the compiler log."""


def families() -> list[str]:
    """Every kernel family: the stems of ds4cupy/kernels/*.cu."""
    return sorted(p.stem for p in KERNEL_DIR.glob("*.cu"))


def arch_for_capability(major: int, minor: int) -> str:
    """NVRTC target for a compute capability (see the module docstring)."""
    return _KNOWN_ARCHS.get((int(major), int(minor)), f"compute_{int(major)}{int(minor)}")


def compile_options(arch: str) -> list[str]:
    extra = os.environ.get("DS4_NVRTC_OPTIONS", "").split()
    return [*COMPILE_OPTIONS, *extra, f"--gpu-architecture={arch}"]


def expanded_source(family: str) -> str:
    """The family's source with local includes inlined (each file once) and #line directives."""
    path = KERNEL_DIR / f"{family}.cu"
    if not path.is_file():
        raise ValueError(f"no kernel family {family!r}: {path} does not exist (families: {', '.join(families())})")
    seen: set[str] = set()

    def expand(p: Path) -> list[str]:
        out = [f'#line 1 "{p.name}"']
        for lineno, line in enumerate(p.read_text().splitlines(), start=1):
            m = _INCLUDE_RE.match(line)
            if m and (KERNEL_DIR / m.group(1)).is_file():
                inc = KERNEL_DIR / m.group(1)
                if inc.name not in seen:
                    seen.add(inc.name)
                    out += expand(inc)
                out.append(f'#line {lineno + 1} "{p.name}"')
            elif line.strip() == "#pragma once":
                out.append("")
            else:
                out.append(line)
        return out

    return "\n".join(expand(path)) + "\n"


# ---- NVRTC -----------------------------------------------------------------------------------------------------------
def _nvrtc_compile_cuda_bindings(source: str, name: str, options: list[str], want_cubin: bool):
    from cuda.bindings import nvrtc

    def check(res):
        err = res[0] if isinstance(res, tuple) else res
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"NVRTC call failed: {err}")
        return res[1:] if isinstance(res, tuple) else None

    (prog,) = check(nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []))
    try:
        res = nvrtc.nvrtcCompileProgram(prog, len(options), [o.encode() for o in options])
        (log_size,) = check(nvrtc.nvrtcGetProgramLogSize(prog))
        log = b" " * log_size
        check(nvrtc.nvrtcGetProgramLog(prog, log))
        log_text = log.rstrip(b"\x00 ").decode(errors="replace")
        if res[0] != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            return False, log_text, None
        if want_cubin:
            (size,) = check(nvrtc.nvrtcGetCUBINSize(prog))
            binary = b" " * size
            check(nvrtc.nvrtcGetCUBIN(prog, binary))
        else:
            (size,) = check(nvrtc.nvrtcGetPTXSize(prog))
            binary = b" " * size
            check(nvrtc.nvrtcGetPTX(prog, binary))
        return True, log_text, bytes(binary)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def _nvrtc_compile_cupy(source: str, name: str, options: list[str], want_cubin: bool):
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram(source, name, (), ())
    try:
        try:
            nvrtc.compileProgram(prog, options)
            ok = True
        except nvrtc.NVRTCError:
            ok = False
        log = nvrtc.getProgramLog(prog).rstrip("\x00 ")
        if not ok:
            return False, log, None
        binary = nvrtc.getCUBIN(prog) if want_cubin else nvrtc.getPTX(prog)
        return True, log, binary if isinstance(binary, bytes) else binary.encode()
    finally:
        nvrtc.destroyProgram(prog)


@functools.cache
def _nvrtc_backend():
    try:
        from cuda.bindings import nvrtc  # noqa: F401
        return _nvrtc_compile_cuda_bindings
    except ImportError:
        return _nvrtc_compile_cupy


def nvrtc_version() -> tuple[int, int]:
    if _nvrtc_backend() is _nvrtc_compile_cuda_bindings:
        from cuda.bindings import nvrtc
        err, major, minor = nvrtc.nvrtcVersion()
        return int(major), int(minor)
    from cupy_backends.cuda.libs import nvrtc
    return tuple(nvrtc.getVersion())


def _compile(family: str, arch: str) -> tuple[bool, str, bytes | None]:
    source = expanded_source(family)
    return _nvrtc_backend()(source, f"{family}.cu", compile_options(arch), arch.startswith("sm_"))


def compile_for_arch(family: str, arch: str) -> tuple[bool, str]:
    """Compile one family for `arch` (e.g. "sm_90a", "compute_89") with NVRTC only; no GPU needed.
    Returns (ok, compiler log); the log is empty when there is neither error nor warning."""
    ok, log, _ = _compile(family, arch)
    return ok, log


# ---- cache and modules -----------------------------------------------------------------------------------------------
def _cache_dir() -> Path:
    base = os.environ.get("CUPY_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cupy", "kernel_cache")
    path = Path(base) / "ds4cupy"
    path.mkdir(parents=True, exist_ok=True)
    return path


def compiled_binary_path(family: str, arch: str) -> Path:
    """Path of the family's compiled binary for arch, compiling it first unless the cache holds it."""
    source = expanded_source(family)
    options = compile_options(arch)
    key = hashlib.sha256("\0".join([source, *options, arch, repr(nvrtc_version())]).encode()).hexdigest()[:32]
    path = _cache_dir() / f"{family}-{arch}-{key}.{'cubin' if arch.startswith('sm_') else 'ptx'}"
    if path.is_file():
        return path
    ok, log, binary = _nvrtc_backend()(source, f"{family}.cu", options, arch.startswith("sm_"))
    if not ok:
        raise KernelCompileError(f"kernel family {family!r} ({KERNEL_DIR / (family + '.cu')}) failed to compile "
                                 f"for {arch}:\n{log}")
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(binary)
    os.replace(tmp, path)
    return path


def device_arch(device_id: int | None = None) -> str:
    import cupy
    cc = cupy.cuda.Device(device_id).compute_capability  # e.g. "90", "121"
    return arch_for_capability(int(cc[:-1]), int(cc[-1]))


@functools.cache
def _module(family: str, device_id: int):
    import cupy
    with cupy.cuda.Device(device_id):
        return cupy.RawModule(path=str(compiled_binary_path(family, device_arch(device_id))))


def get_module(family: str):
    """The family's cupy.RawModule for the current device (compiled and loaded once)."""
    import cupy
    return _module(family, cupy.cuda.Device().id)


@functools.cache
def sm_count(device_id: int) -> int:
    """Number of multiprocessors of a device (launch geometry of the kernels that fill the GPU)."""
    import cupy
    return int(cupy.cuda.runtime.deviceGetAttribute(cupy.cuda.runtime.cudaDevAttrMultiProcessorCount, device_id))


@functools.cache
def _kernel(family: str, name: str, device_id: int):
    return _module(family, device_id).get_function(name)


@functools.cache
def _pdl_kernel(family: str, name: str, device_id: int):
    from .launch import PdlKernel
    return PdlKernel(_kernel(family, name, device_id))


def get_kernel(family: str, name: str):
    """The `extern "C"` kernel `name` of ds4cupy/kernels/<family>.cu as a cupy.RawKernel (cached per device); with
    switch PDL on and a device of compute capability >= 9.0, the same kernel wrapped in launch.PdlKernel (called the
    same way, launched with programmatic dependent launch)."""
    import cupy
    from . import launch, switches
    dev = cupy.cuda.Device().id
    if switches.enabled("PDL") and launch.supported(dev):
        return _pdl_kernel(family, name, dev)
    return _kernel(family, name, dev)


def _precompile_one(args: tuple[str, str]) -> tuple[str, str | None]:
    family, arch = args
    try:
        compiled_binary_path(family, arch)
        return family, None
    except KernelCompileError as e:
        return family, str(e)


def precompile(arch: str, jobs: int | None = None, fams: list[str] | None = None) -> dict[str, str]:
    """Compile kernel families for `arch` into the cache in `jobs` processes (NVRTC only, no GPU needed), so the
    first launches do not wait for the compiler. Returns {family: error} for the ones that failed."""
    import multiprocessing

    todo = [(f, arch) for f in (fams or families())]
    with multiprocessing.get_context("spawn").Pool(max(1, min(jobs or os.cpu_count() or 1, len(todo)))) as pool:
        return {f: err for f, err in pool.imap_unordered(_precompile_one, todo) if err}


def main(argv: list[str] | None = None) -> int:
    import argparse
    import time

    ap = argparse.ArgumentParser(prog="python -m ds4cupy.engines.cuda.compile",
                                 description="Compile every kernel family into the kernel cache (CUPY_CACHE_DIR) "
                                             "ahead of time, in parallel.")
    ap.add_argument("--arch", help="target, e.g. sm_90a (H100/H200), sm_121a (GB10), sm_120; default: the GPU's")
    ap.add_argument("--jobs", type=int, default=None, help="compiler processes (default: one per CPU core)")
    a = ap.parse_args(argv)
    arch = a.arch or device_arch()
    t0 = time.perf_counter()
    errors = precompile(arch, a.jobs)
    for fam, err in sorted(errors.items()):
        print(err)
    print(f"compiled {len(families()) - len(errors)} of {len(families())} kernel families for {arch} in "
          f"{time.perf_counter() - t0:.1f} s ({_cache_dir()})")
    return 1 if errors else 0


__all__ = ["KERNEL_DIR", "COMPILE_OPTIONS", "KernelCompileError", "families", "arch_for_capability",
           "compile_options", "expanded_source", "compile_for_arch", "compiled_binary_path", "device_arch",
           "get_module", "get_kernel", "nvrtc_version", "sm_count", "precompile"]


if __name__ == "__main__":
    raise SystemExit(main())
