"""Helpers shared by the Triton kernel modules: float scalars passed as int64 bit patterns (the CUDA-graph
replay of launch sequences, ``launch_graphs``, is in s2dc_kernels._utils).

Triton passes Python floats to kernels as fp32, which would round eps, temperatures or tol to ~1e-8 relative
and spoil float64 work: launchers pass ``float_bits(x)`` and kernels read ``float_from_bits(bits)``.
"""

from __future__ import annotations

import struct

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # log2(e)


@triton.jit
def float_from_bits(bits):
    """The float64 whose IEEE-754 bit pattern is ``bits`` (an int32 or int64 scalar)."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


def float_bits(x: float) -> int:
    """The IEEE-754 binary64 bit pattern of the Python float ``x`` as a signed int64."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]
