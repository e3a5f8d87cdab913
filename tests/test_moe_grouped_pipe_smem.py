"""moe_grouped.pipe_smem_bytes (the dynamic shared memory the launcher gives a moe_grouped_pipe_* kernel) against the
byte counts kernels/moe_grouped.cu asserts at compile time for 2 * sizeof(MgTile<DEC>) (its MG_PIPE_SMEM lines): one
per grouped format, the same numbers on both sides. No GPU: the .cu text and the Python function."""
from __future__ import annotations

import re

from gguf import GGMLQuantizationType as T

from ds4cupy.engines.cuda import moe_grouped as mg
from ds4cupy.engines.cuda.compile import KERNEL_DIR
from ds4cupy.engines.cuda.q8_0r import Q8_0R

DECODERS = {"MgQ8_0": T.Q8_0, "MgQ2_K": T.Q2_K, "MgQ4_K": T.Q4_K, "MgIQ2_XXS": T.IQ2_XXS, "MgQ8_0R": Q8_0R(64)}


def test_pipe_smem_bytes_match_the_kernel_asserts():
    text = (KERNEL_DIR / "moe_grouped.cu").read_text()
    asserted = {name: int(b) for name, b in re.findall(r"^MG_PIPE_SMEM\((\w+), (\d+)\);", text, re.M)}
    assert set(asserted) == set(DECODERS), asserted
    for name, qtype in DECODERS.items():
        assert mg.pipe_smem_bytes(qtype) == asserted[name], (name, mg.pipe_smem_bytes(qtype), asserted[name])
    # every grouped format has a decoder with an assert (a new format needs both)
    assert {t for t in DECODERS.values() if not isinstance(t, Q8_0R)} == set(mg.GROUPED_TYPES)
    # above the 48 KiB a launch gets without the opt-in, below the H200's / GB10's 227 KiB per block
    assert all(48 * 1024 < b <= 227 * 1024 for b in asserted.values())
