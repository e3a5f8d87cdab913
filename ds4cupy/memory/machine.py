"""What the machine offers: GPU kind (integrated or discrete, managed-memory support) and free device / host memory.

`detect()` asks the CUDA runtime (through CuPy, imported here only) and /proc/meminfo. The named machines below are
descriptions used by the planner's tests and by `ds4cupy info --machine NAME` style previews.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

GB = 1000 ** 3
GiB = 1 << 30
MiB = 1 << 20


@dataclass(frozen=True)
class MachineInfo:
    name: str
    integrated: bool                 # GPU shares the host's RAM (GB10 / DGX Spark, Jetson)
    concurrent_managed_access: bool  # managed memory can be advised / prefetched while kernels run
    pageable_memory_access: bool     # GPU can read plain malloc'd memory (ATS / HMM)
    device_total: int                # bytes
    device_free: int
    host_total: int
    host_available: int

    @property
    def unified_memory(self) -> bool:
        """One physical pool for CPU and GPU: a device copy of the weights is a second copy in the same RAM."""
        return self.integrated

    @property
    def usable(self) -> int:
        """Bytes the planner may place on this GPU: device free, and on unified memory no more than the host has."""
        if self.unified_memory:
            return min(self.device_free, self.host_available)
        return self.device_free

    def with_free(self, device_free: int | None = None, host_available: int | None = None) -> "MachineInfo":
        return replace(self, device_free=self.device_free if device_free is None else device_free,
                       host_available=self.host_available if host_available is None else host_available)


def read_meminfo(path: str = "/proc/meminfo") -> tuple[int, int]:
    """(MemTotal, MemAvailable) in bytes; (0, 0) when the file is missing."""
    total = avail = 0
    try:
        with open(path) as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    v = int(rest.split()[0]) * 1024
                    if key == "MemTotal":
                        total = v
                    else:
                        avail = v
    except OSError:
        pass
    return total, avail


def detect(device: int = 0) -> MachineInfo:
    """Describe GPU `device` of this machine (needs a CUDA driver)."""
    import cupy

    rt = cupy.cuda.runtime
    props = rt.getDeviceProperties(device)
    name = props["name"]
    if isinstance(name, bytes):
        name = name.decode(errors="replace")

    def attr(key: str, attr_name: str) -> bool:
        if key in props:
            return bool(props[key])
        a = getattr(rt, attr_name, None)
        return bool(rt.deviceGetAttribute(a, device)) if a is not None else False

    integrated = attr("integrated", "cudaDevAttrIntegrated")
    cma = attr("concurrentManagedAccess", "cudaDevAttrConcurrentManagedAccess")
    pma = attr("pageableMemoryAccess", "cudaDevAttrPageableMemoryAccess")
    with cupy.cuda.Device(device):
        free, total = rt.memGetInfo()
    host_total, host_avail = read_meminfo()
    return MachineInfo(str(name), integrated, cma, pma, int(total), int(free), host_total, host_avail)


# ---- described machines (free memory as a fresh process typically sees it) -----------------------------------------
def _discrete(name: str, total_mib: int, host_gib: int = 512) -> MachineInfo:
    total = total_mib * MiB
    return MachineInfo(name, False, True, False, total, total - 600 * MiB, host_gib * GiB, (host_gib - 16) * GiB)


# GB10 (DGX Spark): 128 GB LPDDR5x shared by CPU and GPU; the OS and desktop hold a few GB.
GB10 = MachineInfo("NVIDIA GB10 (described)", True, True, True, 128 * GB, 128 * GB - 8 * GiB, 128 * GB,
                   128 * GB - 8 * GiB)
H100 = _discrete("NVIDIA H100 80GB HBM3 (described)", 81559)
H200 = _discrete("NVIDIA H200 (described)", 143771, host_gib=1024)
RTX_PRO_6000 = _discrete("NVIDIA RTX PRO 6000 Blackwell 96GB (described)", 97887, host_gib=256)

DESCRIBED = {"gb10": GB10, "h100": H100, "h200": H200, "rtx-pro-6000": RTX_PRO_6000}
