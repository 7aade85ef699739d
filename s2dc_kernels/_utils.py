"""Small shared helpers: backend resolution, the compiled extension, input checks."""

from __future__ import annotations

import collections
import contextlib
import contextvars
import functools
import importlib.util
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch

BACKENDS = ("auto", "torch", "triton", "cuda", "cpp")
# Fastest first, by measurement (benchmarks/results/): on an H200 the Triton Sinkhorn kernels beat the
# CUDA C++ ones at every measured shape.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}


@functools.cache
def extension():
    """The compiled extension ``s2dc_kernels._C`` (registers ``torch.ops.s2dc_C``), or None."""
    try:
        from s2dc_kernels import _C
    except ImportError as err:
        warnings.warn(
            f"s2dc_kernels: the compiled extension is not available ({err}); "
            "the 'cpp' and 'cuda' backends are off, the PyTorch and Triton paths still work.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return _C


def triton_interpret() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _unavailable_reason(backend: str, device: torch.device | None) -> str | None:
    """Why ``backend`` cannot run on ``device`` here (None when it can)."""
    dev = None if device is None else device.type
    if backend == "torch":
        return None
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton)"
        if dev == "cpu" and not triton_interpret():
            return "Triton runs on CPU tensors only under TRITON_INTERPRET=1 (set before the first import)"
        if dev not in (None, "cpu", "cuda"):
            return f"Triton does not run on {dev} tensors"
        if dev == "cuda" and triton_interpret():
            return "TRITON_INTERPRET=1 is set, so Triton cannot launch on CUDA tensors"
        return None
    ext = extension()
    if ext is None:
        return "the compiled extension s2dc_kernels._C is not built"
    if backend == "cpp":
        return None if dev in (None, "cpu") else f"the 'cpp' backend runs on CPU tensors, got {dev}"
    if backend == "cuda":
        if not ext.with_cuda():
            return "the extension was built without CUDA (see README: building with CUDA)"
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        return None if dev in (None, "cuda") else f"the 'cuda' backend runs on CUDA tensors, got {dev}"
    raise AssertionError(backend)


def available_backends() -> dict[str, bool]:
    """Which backends can run here: ``{"torch": True, "cpp": ..., "triton": ..., "cuda": ...}``.

    "triton" is True on a CPU-only machine only under TRITON_INTERPRET=1.
    """
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    out = {}
    for name in BACKENDS[1:]:
        dev = torch.device("cpu") if name == "cpp" else device
        out[name] = _unavailable_reason(name, dev) is None
    return out


@torch.compiler.assume_constant_result  # environment probing: a constant for torch.compile
def resolve_backend(
    backend: str,
    *,
    op: str,
    device: torch.device,
    supported: Sequence[str],
    cannot_take: Callable[[str], str | None] | None = None,
) -> str:
    """Turn the ``backend`` argument of ``op`` into the backend that runs it on ``device``.

    "auto" takes ``S2DC_BACKEND`` when set and ``op`` implements it, else the fastest
    available of ``supported`` (triton > cuda > torch on GPUs, cpp > torch on CPUs).
    ``cannot_take(b)`` says why backend b cannot take this call's inputs (None: it can): "auto" and
    ``S2DC_BACKEND`` pass over such a backend; naming it explicitly is a ValueError with the reason.
    An unknown name is a ValueError; a backend that cannot run here is a RuntimeError.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def takes(b: str) -> bool:
        return cannot_take is None or cannot_take(b) is None

    if backend == "auto":
        env = os.environ.get("S2DC_BACKEND", "auto")
        if env not in BACKENDS:
            raise ValueError(f"S2DC_BACKEND must be one of {BACKENDS}, got {env!r}")
        if env != "auto" and env in supported and takes(env):
            backend = env
        else:
            order = _AUTO_ORDER.get(device.type, ("torch",))
            return next(
                b for b in order if b in supported and _unavailable_reason(b, device) is None and takes(b)
            )
    if backend not in supported:
        raise ValueError(f"backend={backend!r} does not implement {op}; {op} runs on {tuple(supported)}")
    reason = _unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} is unavailable for {op}: {reason}")
    if cannot_take is not None and (why := cannot_take(backend)) is not None:
        raise ValueError(f"backend={backend!r} for {op}: {why}")
    return backend


_VALUE_CHECKS = contextvars.ContextVar("s2dc_value_checks", default=True)


@contextlib.contextmanager
def value_checks(enabled: bool) -> Iterator[None]:
    """Turn the ops' scans of their inputs' values (NaN/inf, data-dependent bounds: host synchronisations)
    on or off inside the block (this thread / task only), e.g. ``with s2dc_kernels.value_checks(False):``
    in a training step that checks its loss once instead. Shapes, dtypes and arguments are still checked."""
    token = _VALUE_CHECKS.set(bool(enabled))
    try:
        yield
    finally:
        _VALUE_CHECKS.reset(token)


def check_values() -> bool:
    """Whether to scan inputs for NaN/inf and other data-dependent conditions (host synchronisations): not
    inside ``value_checks(False)``, while torch.compile traces, during CUDA-graph capture, nor with
    S2DC_CHECK_VALUES=0."""
    return (
        not torch.compiler.is_compiling()  # first: Dynamo does not trace ContextVar.get
        and _VALUE_CHECKS.get()
        and os.environ.get("S2DC_CHECK_VALUES", "1") != "0"
        and not (torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing())
    )


def check_tensor(name: str, t: object, ndims: Sequence[int], *, finite: bool = True) -> torch.Tensor:
    """Check that ``t`` is a floating tensor with one of ``ndims`` dimensions and (by default) finite."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.dim() not in ndims:
        want = " or ".join(str(n) for n in ndims)
        raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(t.shape)}")
    if finite and check_values() and t.numel() and not all_finite(t):
        raise ValueError(f"{name} contains NaN or inf")
    return t


def all_finite(*tensors: torch.Tensor) -> bool:
    """Whether every entry of the (non-empty, same-dtype) tensors is finite: one aminmax pass per tensor, no
    bool temporary (NaN and inf propagate into the min or max), one host copy of all the bounds."""
    bounds = torch.stack([bound for t in tensors for bound in torch.aminmax(t.detach())])
    return all(map(math.isfinite, bounds.tolist()))


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """The common device of the given tensors (None entries skipped), else a ValueError naming them."""
    named = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in named.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in named.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    return devices.pop()


def check_positive(name: str, value: float) -> float:
    """Check a positive finite real (eps, temperature)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return float(value)


def check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """Check an int in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """Check one of a fixed set of strings."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


# ---------------------------------------------------------------- CUDA-graph replay of launch sequences
_GRAPH_CACHE_SIZE = 16


class LaunchGraphs:
    """CUDA graphs of launch sequences (a solve of many small launches, a loss term's closed form), one per
    (kind, shapes, dtypes, scalars), least recently used dropped past _GRAPH_CACHE_SIZE.

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
