"""Helpers shared by the Triton kernel modules: float scalars passed as int64 bit patterns, and CUDA-graph
replay of launch sequences.

Triton passes Python floats to kernels as fp32, which would round eps, temperatures or tol to ~1e-8 relative
and spoil float64 work: launchers pass ``float_bits(x)`` and kernels read ``float_from_bits(bits)``.
"""

from __future__ import annotations

import collections
import os
import struct

import torch
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


_GRAPH_CACHE_SIZE = 16


class LaunchGraphs:
    """CUDA graphs of launch sequences (a solve of many small launches), one per (kind, shapes, dtypes,
    scalars), least recently used dropped past _GRAPH_CACHE_SIZE.

    2 * n_iters launches from Python cost ~10-20 us each on the host while each runs in a few us on the
    GPU: a graph replays them all in one call. A graph owns static copies of its inputs and outputs: each
    call copies the inputs in (callers bound their size) and copies the outputs out.
    The first call of a key launches directly (it also compiles the kernels), the second captures, later
    ones replay; the keys seen once are remembered up to 4 * _GRAPH_CACHE_SIZE, least recent dropped. Off
    under stream capture by the caller and with S2DC_CUDA_GRAPHS=0.
    """

    def __init__(self) -> None:
        self.graphs: collections.OrderedDict = collections.OrderedDict()
        self.seen: collections.OrderedDict = collections.OrderedDict()  # keys launched once, not captured

    def run(self, key: tuple, launch, inputs: tuple[torch.Tensor, ...], outputs: tuple[torch.Tensor, ...]):
        """launch(*inputs, *outputs) fills ``outputs`` in place (and leaves ``inputs`` unchanged)."""
        device = inputs[0].device
        if (
            device.type != "cuda"
            or os.environ.get("S2DC_CUDA_GRAPHS", "1") == "0"
            or torch.cuda.is_current_stream_capturing()
        ):
            launch(*inputs, *outputs)
            return
        key = (*key, device, *((t.shape, t.dtype) for t in (*inputs, *outputs)))
        if key not in self.graphs:
            if self.seen.pop(key, None) is None:
                self.seen[key] = True
                if len(self.seen) > 4 * _GRAPH_CACHE_SIZE:
                    self.seen.popitem(last=False)
                launch(*inputs, *outputs)
                return
            static_in = tuple(t.clone() for t in inputs)
            static_out = tuple(torch.empty_like(t) for t in outputs)
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
                launch(*static_in, *static_out)
            torch.cuda.current_stream(device).wait_stream(stream)
            self.graphs[key] = (graph, static_in, static_out)
            if len(self.graphs) > _GRAPH_CACHE_SIZE:
                self.graphs.popitem(last=False)
        graph, static_in, static_out = self.graphs[key]
        self.graphs.move_to_end(key)
        for static, t in zip(static_in, inputs, strict=True):
            static.copy_(t)
        graph.replay()
        for t, static in zip(outputs, static_out, strict=True):
            t.copy_(static)


launch_graphs = LaunchGraphs()
