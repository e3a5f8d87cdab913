"""Where the weights and the KV cache go: device memory or managed memory with hints, decided before any allocation.

Rules (`auto`):
- Everything (weights + KV + scratch + graph buffers + reserve) must fit in the usable memory: the device's free memory,
  and on unified-memory GPUs also the host's available memory. Managed memory is never planned above that: on a
  discrete GPU oversubscribed managed memory pages over the bus at a fraction of HBM speed, on a unified one it
  pushes the OS into swap. If it does not fit, `MemoryFitError` names the numbers and what to try.
- Discrete GPU: weights in device memory (cudaMalloc, filled through pinned staging), KV in device memory.
- Unified memory (GB10): a device copy is fastest (ds4 on GB10: 118 GB/s vs 97 managed with hints) but while it is
  filled the file's pages and the copy share one RAM. Device when two copies of the weights fit, else managed with
  ReadMostly + PreferredLocation(device) + prefetch (one copy). KV goes managed at or above `KV_MANAGED_MIN` (8 GiB,
  as ds4's `ds4_gpu_should_use_managed_kv_cache`), device below.
"""
from __future__ import annotations

from dataclasses import dataclass

from .budget import CATEGORY_LABELS, GiB, Budget
from .machine import MachineInfo

KV_MANAGED_MIN = 8 * GiB
MODES = ("auto", "device", "managed")


class PlacementError(RuntimeError):
    """A placement that cannot be made on this machine (mode not supported)."""


class MemoryFitError(PlacementError):
    """The model does not fit. Carries the numbers; the message says what to try."""

    def __init__(self, message: str, needed: int, usable: int, categories: dict[str, int], suggestions: list[str]):
        super().__init__(message)
        self.needed = needed
        self.usable = usable
        self.categories = categories
        self.suggestions = suggestions


@dataclass(frozen=True)
class Placement:
    weights_mode: str   # device | managed
    kv_mode: str        # device | managed
    reason: str         # one line, for the user
    needed: int = 0     # bytes planned
    usable: int = 0     # bytes the machine offered


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def _max_ctx_that_fits(budget: Budget, usable: int) -> int:
    """Largest context (multiple of 1024 when >= 1024) whose budget fits in `usable`; 0 if none does."""
    if budget.with_ctx(1).total > usable:
        return 0
    lo, hi = 1, budget.ctx
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if budget.with_ctx(mid).total <= usable:
            lo = mid
        else:
            hi = mid - 1
    return lo // 1024 * 1024 if lo >= 1024 else lo


def _q2_experts_bytes(budget: Budget) -> int:
    c = budget.cfg
    per_layer = c.n_expert * c.n_ff_exp * c.n_embd  # parameters of one of gate / up / down
    return c.n_layer * per_layer * (66 + 66 + 84) // 256  # IQ2_XXS gate, up + Q2_K down


def _suggestions(machine: MachineInfo, budget: Budget, usable: int) -> list[str]:
    out: list[str] = []
    floor = budget.with_ctx(1).total
    if floor > usable:
        out.append(f"no context length fits these weights: at ctx 1 they and the buffers already need {gib(floor)}")
    m = _max_ctx_that_fits(budget, usable)
    if 0 < m < budget.ctx:
        out.append(f"a smaller context: --ctx {m} or less fits (KV grows {budget.kv_per_token / 1000:.2f} KB "
                   f"a token)")
    q2 = _q2_experts_bytes(budget)
    experts = budget.weights.get("experts", 0)
    if q2 < experts * 0.9:
        t = budget.total - experts + q2
        out.append(f"q2 experts (IQ2_XXS + Q2_K) instead of {budget.weight_types.get('experts', 'these')}: "
                   f"weights {gib(budget.weights_total - experts + q2)}, total {gib(t)}"
                   + ("" if t <= usable else " (still too big at this context)"))
    fp8_saving = int(budget.kv.get("comp", 0) * (1 - 584 / 2048) + budget.kv.get("index", 0) * (1 - 200 / 512))
    if budget.total - fp8_saving <= usable:
        out.append(f"--kv fp8 once it exists (compressed rows 584 B instead of 2048, indexer rows 200 B instead of "
                   f"512: KV {gib(budget.kv_total)} -> {gib(budget.kv_total - fp8_saving)})")
    out.append(f"a GPU with at least {gib(budget.total)} free"
               + ("" if machine.unified_memory else "; managed memory above the device's free memory is never "
                  "planned (it would page over the bus)"))
    return out


def _fit_error(machine: MachineInfo, budget: Budget, mode: str) -> MemoryFitError:
    usable = machine.usable
    cats = budget.categories()
    parts = ", ".join(f"{CATEGORY_LABELS.get(k.split('.', 1)[-1], k)} {gib(v)}" for k, v in cats.items() if v)
    where = (f"{machine.name} has {gib(machine.device_free)} free of {gib(machine.device_total)}"
             + (f" (host available {gib(machine.host_available)}; unified memory, the smaller counts)"
                if machine.unified_memory else ""))
    sugg = _suggestions(machine, budget, usable)
    msg = (f"model does not fit ({mode} placement): needs {gib(budget.total)} at ctx {budget.ctx} "
           f"(weights {gib(budget.weights_total)}, KV {gib(budget.kv_total)}, scratch {gib(budget.scratch)}, "
           f"graph {gib(budget.graph)}, reserve {gib(budget.reserve)}) but {where}; short by "
           f"{gib(budget.total - usable)}.\n  per category: {parts}\n  try: " + "\n       ".join(sugg))
    return MemoryFitError(msg, budget.total, usable, cats, sugg)


def choose_placement(machine: MachineInfo, budget: Budget, mode: str = "auto") -> Placement:
    """Decide, or raise MemoryFitError / PlacementError. Allocates nothing."""
    if mode not in MODES:
        raise ValueError(f"memory mode must be one of {', '.join(MODES)}, got {mode!r}")
    usable = machine.usable
    need = budget.total
    if need > usable:
        raise _fit_error(machine, budget, mode)
    managed_ok = machine.concurrent_managed_access or machine.integrated
    kv_big = budget.kv_total >= KV_MANAGED_MIN
    kv_mode = "managed" if machine.unified_memory and kv_big else "device"
    kv_why = (f"; KV {gib(budget.kv_total)} >= {gib(KV_MANAGED_MIN)} managed on unified memory" if kv_mode == "managed"
              else "")
    fits = f"needs {gib(need)} of {gib(usable)} usable"

    if mode == "device":
        return Placement("device", "device", f"device memory as asked (--memory device); {fits}", need, usable)
    if mode == "managed":
        if not managed_ok:
            raise PlacementError(f"{machine.name}: managed memory needs concurrentManagedAccess (0 here: Windows/WSL "
                                 f"or an old GPU); use --memory device")
        return Placement("managed", kv_mode, f"managed memory with ReadMostly + PreferredLocation + prefetch as asked "
                         f"(--memory managed); {fits}{kv_why}", need, usable)

    # auto
    if not machine.unified_memory:
        return Placement("device", "device", f"discrete GPU {machine.name}: weights and KV in device memory "
                         f"(fastest reads); {fits}", need, usable)
    two_copies = need + budget.weights_total
    if two_copies <= usable:
        return Placement("device", kv_mode, f"unified memory ({machine.name}), two copies of the weights fit "
                         f"({gib(two_copies)} of {gib(usable)}): device copy, faster reads than managed{kv_why}",
                         need, usable)
    if not managed_ok:
        return Placement("device", kv_mode, f"unified memory without managed access: device copy; {fits}{kv_why}",
                         need, usable)
    return Placement("managed", kv_mode, f"unified memory ({machine.name}): a device copy next to the file's pages "
                     f"would need {gib(two_copies)} of {gib(usable)}, so weights go managed (one copy, "
                     f"ReadMostly + PreferredLocation + prefetch); {fits}{kv_why}", need, usable)


def format_budget(budget: Budget, placement: Placement | None = None, machine: MachineInfo | None = None) -> str:
    """The budget report printed by `ds4cupy info MODEL --ctx N` and at start-up."""
    cfg = budget.cfg
    lines = [f"memory budget: {cfg.name}, ctx {budget.ctx} (prefill chunk {budget.chunk})"]

    def row(label: str, n: int, note: str = "", indent: int = 2) -> None:
        lines.append(f"{' ' * indent}{label:<{36 - indent}}{n / GiB:>10.3f} GiB  {note}".rstrip())

    row("weights", budget.weights_total)
    for k, v in budget.weights.items():
        row(CATEGORY_LABELS[k], v, budget.weight_types.get(k, ""), 4)
    row("KV cache", budget.kv_total, f"{budget.kv_per_token / 1000:.2f} KB/token + "
        f"{(budget.kv_total - budget.kv_per_token * budget.ctx) / (1 << 20):.1f} MiB fixed")
    for k, v in budget.kv.items():
        row(CATEGORY_LABELS[k], v, "", 4)
    row("scratch (estimate)", budget.scratch)
    row("graph buffers", budget.graph)
    row("reserve", budget.reserve)
    row("total", budget.total)
    if machine is not None:
        lines.append(f"machine: {machine.name}: {'integrated, unified memory' if machine.unified_memory else 'discrete'}"
                     f", device {gib(machine.device_free)} free of {gib(machine.device_total)}, host "
                     f"{gib(machine.host_available)} available of {gib(machine.host_total)}")
    if placement is not None:
        lines.append(f"placement: weights {placement.weights_mode}, KV {placement.kv_mode}: {placement.reason}")
    return "\n".join(lines)
