"""Owner of every large GPU allocation: the budget, the placement decision, weight loading, the arena.

Planning (machine descriptions, Budget, choose_placement, format_budget) needs no GPU; CuPy is imported only inside
the functions that touch the device (`detect`, `DeviceMemory.alloc`, `alloc_kv`, `place_weights`).
"""
from .arena import DeviceMemory, alloc_kv
from .budget import (Budget, KVBuffer, kv_bytes_per_token, kv_fixed_bytes, kv_layout, preset_budget,
                     preset_tensors, raw_cap, scratch_bytes, weight_category)
from .machine import DESCRIBED, GB10, H100, H200, RTX_PRO_6000, MachineInfo, detect
from .plan import (KV_MANAGED_MIN, MemoryFitError, Placement, PlacementError, choose_placement, format_budget)
from .progress import Progress
from .weights import PlacedWeights, place_model, place_weights

__all__ = ["DeviceMemory", "alloc_kv", "Budget", "KVBuffer", "kv_bytes_per_token", "kv_fixed_bytes", "kv_layout",
           "preset_budget", "preset_tensors", "raw_cap", "scratch_bytes", "weight_category", "DESCRIBED", "GB10",
           "H100", "H200", "RTX_PRO_6000", "MachineInfo", "detect", "KV_MANAGED_MIN", "MemoryFitError", "Placement",
           "PlacementError", "choose_placement", "format_budget", "Progress", "PlacedWeights", "place_model",
           "place_weights"]
