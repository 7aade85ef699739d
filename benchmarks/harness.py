"""The one benchmark harness: case definitions, timing, the CSV, the tables.

Every benchmark is a ``Case`` (op, shape label, mode, an input factory, providers). ``run_cases``
times each provider on the same inputs: warm-up calls, then repeated single-call timings (CUDA
events on GPUs, ``perf_counter`` on CPUs), reported as median / p20 / p80 in ms, plus the peak GPU
memory of the timed calls (inputs included; empty on CPUs, where PyTorch tracks no peak, unless a script
measures its own, as bench_similarity does for its large CPU k-NN). Each row
is appended to ONE CSV as soon as it is measured, so a run cut short keeps what it finished.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import functools
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch

try:
    from tqdm import tqdm
except ImportError:  # progress bars are optional

    def tqdm(items, **_):
        return items


try:
    import s2dc_kernels
except ImportError:  # not installed: use the source tree this script belongs to
    sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
    import s2dc_kernels

RESULTS_CSV = Path(__file__).resolve().parent / "results" / "results.csv"
COLUMNS = tuple(
    "op provider shape mode median_ms p20_ms p80_ms peak_mem_mb device versions timestamp".split()
)
# Column order of the tables: our backends first, then the baselines and peers.
PROVIDER_ORDER = (
    "s2dc-cuda",
    "s2dc-triton",
    "s2dc-triton-program",
    "s2dc-triton-split",
    "s2dc-triton-tf32",
    "s2dc-triton-bf16",
    "s2dc-cpp",
    "s2dc-torch",
)
PROVIDER_ORDER += ("eager", "eager-topk", "compile", "pot", "official-loop", "faiss", "flash-sinkhorn", "bmm")
FLOOR_PROVIDER = "bmm"  # a bare matmul: the floor a fused op is measured against, other output by design
# Our providers of reduced precision (tf32 products, bf16 inputs): shown, but never the "best s2dc" of a case,
# which compares like with like (fp32) against eager.
REDUCED_PRECISION_SUFFIXES = ("-tf32", "-bf16")


@dataclass(frozen=True)
class Preset:
    """How hard to time: warm-up calls, then up to ``reps`` timed calls (at least 3) within ``seconds``."""

    name: str
    warmup: int
    reps: int
    seconds: float


PRESETS = {
    "quick": Preset("quick", warmup=2, reps=10, seconds=1.0),
    "cpu": Preset("cpu", warmup=1, reps=10, seconds=5.0),
    "gpu": Preset("gpu", warmup=3, reps=50, seconds=1.0),
}
MIN_REPS = 3


@dataclass
class Case:
    """One benchmark: the same inputs for every provider.

    ``make_inputs(device)`` returns the positional inputs; the first one is differentiated in mode
    "fwd+bwd". A provider maps the inputs to a tensor or a tuple whose first element is the output.
    """

    op: str
    shape: str
    mode: str  # "fwd" (under no_grad) or "fwd+bwd" (output, then the gradient of the first input)
    make_inputs: Callable[[torch.device], tuple]
    providers: dict[str, Callable[..., torch.Tensor | tuple]] = field(default_factory=dict)


def parse_args(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags shared by every benchmark script (and run.py)."""
    parser = argparse.ArgumentParser(description=description)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small CPU shapes, few repeats (under a minute)")
    size.add_argument("--gpu", action="store_true", help="the GPU shapes of docs/anchors.md, on cuda:0")
    parser.add_argument("--csv", type=Path, default=RESULTS_CSV, help=f"CSV to append to ({RESULTS_CSV})")
    parser.add_argument(
        "--providers",
        help="comma-separated providers to run (default: all that apply; --quick: ours and eager)",
    )
    parser.add_argument("--ops", help="comma-separated ops to run (default: all of the script)")
    args = parser.parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs a CUDA device")
    args.device = torch.device("cuda" if args.gpu else "cpu")
    args.preset = PRESETS["quick" if args.quick else "gpu" if args.gpu else "cpu"]
    return args


def our_backends(op_backends: Iterable[str], device: torch.device) -> list[str]:
    """Our backends that implement the op and run on ``device`` here (Triton only on GPUs: on CPUs it is
    the interpreter, not a timing)."""
    runs_on = {"torch": ("cpu", "cuda"), "cpp": ("cpu",), "triton": ("cuda",), "cuda": ("cuda",)}
    available = s2dc_kernels.available_backends()
    return [b for b in op_backends if available.get(b) and device.type in runs_on[b]]


def compiled(fn: Callable) -> Callable:
    """torch.compile(fn), built on first use so that scripts import without compiling anything.

    Dynamo keeps one graph per grad mode, float constant (eps) and static/dynamic shape of a function:
    the benchmarks need more than its default limit of 8, past which it silently runs eagerly.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    cache = {}

    def call(*args, **kwargs):
        if "fn" not in cache:
            cache["fn"] = torch.compile(fn)
        return cache["fn"](*args, **kwargs)

    return call


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def versions() -> str:
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "-"

    s2dc = getattr(s2dc_kernels, "__version__", None) or version("s2dc-kernels")
    return (
        f"torch={torch.__version__};triton={version('triton')};s2dc={s2dc};python={platform.python_version()}"
    )


def provider(fn: Callable, *, context: Callable | None = None, rtol: float | None = None) -> Callable:
    """fn as a provider carrying the harness's attributes: ``context``, a context-manager factory entered
    around the whole timed call (see _step), and ``rtol``, its stated tolerance against eager (see
    _time_provider)."""
    wrapped = functools.partial(fn)
    if context is not None:
        wrapped.context = context
    if rtol is not None:
        wrapped.rtol = rtol
    return wrapped


@contextlib.contextmanager
def tf32_matmuls(allowed: bool):
    """torch.backends.cuda.matmul.allow_tf32 set to ``allowed`` inside (our Triton kernels follow it too),
    restored after: a provider's ``context`` for tf32 variants."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _first(out: torch.Tensor | tuple) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _step(fn: Callable, inputs: tuple, mode: str) -> Callable[[], torch.Tensor]:
    """One call to time: the forward under no_grad, or the forward and the gradient of inputs[0].

    A provider may carry ``fn.context``, a context-manager factory entered around the whole call (forward
    and backward), e.g. to force a kernel variant.
    """
    context = getattr(fn, "context", contextlib.nullcontext)
    if mode == "fwd":

        def forward() -> torch.Tensor:
            with torch.no_grad(), context():
                return _first(fn(*inputs))

        return forward
    x = inputs[0].detach().requires_grad_()
    grad_out = {}

    def forward_backward() -> torch.Tensor:
        with context():
            out = _first(fn(x, *inputs[1:]))
            if "g" not in grad_out:  # a fixed random upstream gradient, so no term is trivially zero
                grad_out["g"] = torch.randn_like(out)
            torch.autograd.grad(out, x, grad_outputs=grad_out["g"])
        return out.detach()

    return forward_backward


def _time_once(step: Callable, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    start = time.perf_counter()
    step()
    return (time.perf_counter() - start) * 1e3


def measure(step: Callable, device: torch.device, preset: Preset, base_bytes: int) -> dict[str, str]:
    """Median / p20 / p80 ms of ``step`` and its peak GPU memory in MB above ``base_bytes``.

    The caller has made one call already (the output check); the remaining warm-up calls stop early
    once they took half the time budget (slow baselines such as the per-problem loop).
    """
    warmup_end = time.perf_counter() + preset.seconds / 2
    for _ in range(preset.warmup - 1):
        if time.perf_counter() > warmup_end:
            break
        step()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times, deadline = [], time.perf_counter() + preset.seconds
    while len(times) < preset.reps and (len(times) < MIN_REPS or time.perf_counter() < deadline):
        times.append(_time_once(step, device))
    q = statistics.quantiles(times, n=10, method="inclusive")
    peak = f"{(torch.cuda.max_memory_allocated(device) - base_bytes) / 2**20:.0f}" if cuda else ""
    return {
        "median_ms": f"{statistics.median(times):.4g}",
        "p20_ms": f"{q[1]:.4g}",
        "p80_ms": f"{q[7]:.4g}",
        "peak_mem_mb": peak,
    }


def _sample(t: torch.Tensor) -> torch.Tensor:
    """About 2^20 evenly spaced entries of t, on the CPU in float64 (a cheap cross-provider check)."""
    flat = t.detach().flatten()
    return flat[:: max(1, flat.numel() // 2**20)].double().cpu()


def _mismatch(sample: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-3) -> str | None:
    """Why an output sample disagrees with eager's (max error relative to the largest |entry|), or None."""
    if sample.shape != ref.shape:
        return f"shape {tuple(sample.shape)} != eager {tuple(ref.shape)}"
    finite = torch.isfinite(ref)
    if not torch.equal(finite, torch.isfinite(sample)):
        return "NaN/inf where eager has none (or the reverse)"
    if not finite.any():
        return None
    sample, ref = sample[finite], ref[finite]
    err = (sample - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
    return f"max relative error {err:.2e} vs eager" if err > rtol else None


def _time_provider(
    fn: Callable,
    inputs: tuple,
    mode: str,
    args: argparse.Namespace,
    base: int,
    ref: torch.Tensor | None,
    label: str,
) -> tuple[dict[str, str] | None, torch.Tensor | None]:
    """(timing, output sample) of one provider on one case, checked against eager's sample ``ref``;
    (None, None) with a note when it fails (compile errors, OOM, a backend that rejects the shape)."""
    try:
        step = _step(fn, inputs, mode)
        sample = _sample(step())  # the first call: also the first warm-up
        checked = ref is not None and not label.endswith(f"[{FLOOR_PROVIDER}]")
        # A provider may carry ``fn.rtol``: its stated tolerance against eager (reduced precision).
        if checked and (why := _mismatch(sample, ref, getattr(fn, "rtol", 1e-3))):
            print(f"note: {label}: output differs: {why}", file=sys.stderr)
        return measure(step, args.device, args.preset, base), sample
    except Exception as err:
        first_line = (str(err).strip().splitlines() or [""])[0][:160]
        print(f"note: {label} skipped: {type(err).__name__}: {first_line}", file=sys.stderr)
        return None, None


def append_rows(path: Path, rows: Iterable[dict[str, str]]) -> None:
    """Append rows to the CSV at ``path`` (header written when the file is new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _cuda_cleanup(device: torch.device) -> int:
    """Free cached blocks; return the bytes still allocated (the base line of the next measurement)."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated(device)


def run_cases(cases: Sequence[Case], args: argparse.Namespace) -> list[dict[str, str]]:
    """Time every (case, provider) pair that ``args`` selects, eager first (the reference for the output
    check and the ratios); append each row to ``args.csv`` as it is measured and return them all."""
    wanted = None if args.providers is None else set(args.providers.split(","))
    quick_only_ours = wanted is None and args.quick  # --quick: ours ("s2dc-*") and eager
    ops = None if args.ops is None else set(args.ops.split(","))
    device, dev_name, vers = args.device, device_name(args.device), versions()
    selected, rows = [c for c in cases if ops is None or c.op in ops], []
    for case in tqdm(selected, desc="cases", file=sys.stderr, disable=None):
        torch.manual_seed(0)
        base = _cuda_cleanup(device)
        inputs = case.make_inputs(device)
        ref = None
        for provider, fn in sorted(case.providers.items(), key=lambda kv: kv[0] != "eager"):
            if (wanted is not None and provider not in wanted) or (
                quick_only_ours and provider != "eager" and not provider.startswith("s2dc-")
            ):
                continue
            label = f"{case.op} {case.shape} {case.mode} [{provider}]"
            timing, sample = _time_provider(fn, inputs, case.mode, args, base, ref, label)
            _cuda_cleanup(device)
            if provider == "eager":
                ref = sample
            if timing is None:
                continue
            row = {"op": case.op, "provider": provider, "shape": case.shape, "mode": case.mode}
            row |= timing | {"device": dev_name, "versions": vers}
            row["timestamp"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            append_rows(args.csv, [row])
            rows.append(row)
        del inputs  # before the next case's base line
    return rows


def format_table(header: Sequence[str], body: Sequence[Sequence[str]], markdown: bool = False) -> str:
    """A plain aligned table, or a GitHub markdown table."""
    if markdown:
        lines = [header, ["---"] * len(header), *body]
        return "\n".join("| " + " | ".join(line) + " |" for line in lines)
    widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))]
    lines = [header, ["-" * w for w in widths], *body]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def _ratio(eager_ms: str | None, ms: str) -> str:
    return f"{float(eager_ms) / float(ms):.2f}x" if eager_ms else ""


def rows_table(rows: Sequence[dict[str, str]]) -> str:
    """One line per measured row, with its speed ratio against eager on the same case."""
    eager = {(r["op"], r["shape"], r["mode"]): r["median_ms"] for r in rows if r["provider"] == "eager"}
    header = ["op", "shape", "mode", "provider", "median ms", "p20", "p80", "peak MB", "x vs eager"]
    body = [
        [r["op"], r["shape"], r["mode"], r["provider"], r["median_ms"], r["p20_ms"], r["p80_ms"]]
        + [r["peak_mem_mb"], _ratio(eager.get((r["op"], r["shape"], r["mode"])), r["median_ms"])]
        for r in rows
    ]
    return format_table(header, body)


def pivot(
    rows: Sequence[dict[str, str]], column: str = "median_ms"
) -> dict[tuple[str, str, str], dict[str, str]]:
    """{(op, shape, mode): {provider: the row's ``column``}}, in the order the cases first appear (empty
    values left out)."""
    cases: dict[tuple[str, str, str], dict[str, str]] = {}
    for r in rows:
        case = cases.setdefault((r["op"], r["shape"], r["mode"]), {})
        if r[column]:
            case[r["provider"]] = r[column]
    return {key: values for key, values in cases.items() if values}


def peak_memory_table(rows: Sequence[dict[str, str]], markdown: bool = False) -> str | None:
    """One line per (op, shape, mode) with a recorded peak memory: every provider's peak MB (None if none)."""
    cases = pivot(rows, "peak_mem_mb")
    if not cases:
        return None
    seen = {p for values in cases.values() for p in values}
    providers = [p for p in PROVIDER_ORDER if p in seen] + sorted(seen - set(PROVIDER_ORDER))
    body = [[op, shape, mode, *(v.get(p, "") for p in providers)] for (op, shape, mode), v in cases.items()]
    return format_table(["op", "shape", "mode", *(f"{p} MB" for p in providers)], body, markdown)


def best_ours(medians: dict[str, str]) -> tuple[str, float] | None:
    """The fastest of our full-precision backends on one case and its speed-up over eager (None without
    both)."""
    ours = {
        p[len("s2dc-") :]: float(ms)
        for p, ms in medians.items()
        if p.startswith("s2dc-") and not p.endswith(REDUCED_PRECISION_SUFFIXES)
    }
    if not ours or "eager" not in medians:
        return None
    best = min(ours, key=ours.get)
    return best, float(medians["eager"]) / ours[best]


def summary_table(rows: Sequence[dict[str, str]], markdown: bool = False) -> str:
    """One line per (op, shape, mode): every provider's median ms, and the best s2dc backend over eager."""
    cases = pivot(rows)
    seen = {p for medians in cases.values() for p in medians}
    providers = [p for p in PROVIDER_ORDER if p in seen] + sorted(seen - set(PROVIDER_ORDER))
    body = []
    for (op, shape, mode), medians in cases.items():
        best = best_ours(medians)
        speedup = f"{best[1]:.2f}x ({best[0]})" if best else ""
        body.append([op, shape, mode, *(medians.get(p, "") for p in providers), speedup])
    header = ["op", "shape", "mode", *(f"{p} ms" for p in providers), "best s2dc vs eager"]
    return format_table(header, body, markdown)


def run_script(name: str, make_cases: Callable[[argparse.Namespace], list[Case]], args) -> list[dict]:
    """Run one script's cases and print its table."""
    rows = run_cases(make_cases(args), args)
    print(f"\n{name} on {device_name(args.device)} ({args.preset.name}); rows appended to {args.csv}")
    print(rows_table(rows))
    return rows


def main(name: str, make_cases: Callable[[argparse.Namespace], list[Case]]) -> list[dict]:
    """Entry point of one benchmark script."""
    return run_script(name, make_cases, parse_args(name))
