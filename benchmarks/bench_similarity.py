"""Benchmark the similarity ops: cosine_similarity, knn, neighborhood_consistency.

Providers: every available backend of ours ("s2dc-<backend>"), "eager" (the reference), "compile"
(torch.compile of the whole reference) and, for knn, "eager-topk" (normalise, bmm, torch.topk: what users
run, ties in any order), "faiss" (exact inner-product search on unit rows, one problem at a time) when
faiss is importable, and on GPUs the Triton k-NN with tf32 products ("s2dc-triton-tf32") and with bf16
features ("s2dc-triton-bf16"). The GPU preset runs the 1 x 65536 x 65536 search (d = 128, k = 32) for knn
only (its cosine matrix alone is 17 GB), and torch.compile and the tf32 / bf16 k-NN only on the issue's
target shapes (GPU_TARGET_SHAPES).

recall@k: after the timings, every knn provider of a case with an "eager" row is called once more on the
same inputs and its indices are compared with the exact fp32 search (the reference, tf32 off): the
fraction of the exact top-k indices it finds per row, averaged over rows. The CSV has no column for it:
each figure is printed as a line starting with "knn recall@k" (kept in the GPU check's bench.log).

The CPU preset also runs one large k-NN, 1 x 30000 x 30000 (d = 32, k = 8), on our fused backends
only: the reference ("eager", "compile", "s2dc-torch") would build the 3.6 GB score matrix, so it is
skipped there (the shape label says so). Its peak memory is measured on the CPU (Linux), where the
harness records none: the growth of the peak resident set size (VmHWM) over one call in a fresh
subprocess, after the inputs exist and a small warm-up call has loaded the libraries and thread
pools, so it counts the outputs, every temporary and allocator slack, but not the inputs. It is stored
in the row's peak_mem_mb column, so these rows reach the CSV after that measurement.

    python benchmarks/bench_similarity.py [--quick | --gpu] [--csv FILE] [--providers a,b] [--ops a,b]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import harness
import torch
import torch.nn.functional as F

import s2dc_kernels
from s2dc_kernels import reference
from s2dc_kernels.similarity import COSINE_BACKENDS, KNN_BACKENDS, NC_BACKENDS

# (B, N, D, k): patch features against themselves (cosine_similarity and knn); docs/anchors.md's rows on GPUs.
FEATURE_SHAPES = {"quick": [(16, 216, 384, 8)], "cpu": [(16, 216, 384, 8), (8, 512, 768, 16)]}
FEATURE_SHAPES["gpu"] = [(8, 512, 768, 16), (16, 216, 384, 8), (1, 16384, 256, 16)]
# (B, N, D, k): knn only, every provider (the cosine matrix of 1 x 65536 x 65536 takes 17 GB).
KNN_SHAPES = {"quick": [], "cpu": [], "gpu": [(1, 65536, 128, 32)]}
# (B, N, D, k): one large search whose (N, N) score matrix would take 3.6 GB in fp32; ours only.
LARGE_KNN_SHAPES = {"quick": [], "cpu": [(1, 30000, 32, 8)], "gpu": []}
LARGE_KNN_NOTE = "eager skipped: 3.6 GB matrix"
# (B, N, D, k): S2DC's L_nc, B*3 problems of 144 patches with 512-d projections.
NEIGHBOURHOOD_SHAPES = {"quick": [(12, 144, 512, 8)], "cpu": [(48, 144, 512, 8)], "gpu": [(48, 144, 512, 8)]}
# The target shapes: the only ones where the GPU preset runs torch.compile and Triton's tf32 / bf16
# k-NN (each new shape or variant costs seconds of compilation; the GPU check's time is short). On CPUs
# compile runs on every shape.
GPU_TARGET_SHAPES = {(8, 512, 768, 16), (1, 65536, 128, 32), (48, 144, 512, 8)}
# Output check of the tf32 / bf16 providers against eager (relative to the largest |value|, 1 for cosine):
# bf16 keeps 8 significant bits, so its inputs and its returned values are each rounded by up to 2^-9
# relative; tf32 rounds the inputs to 11 bits. 1e-2 covers either with room for the dot's accumulation.
REDUCED_PRECISION_RTOL = 1e-2


def features(shape: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor]:
    return (torch.randn(shape, device=device),)


def student_teacher(shape: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit student rows and a teacher close to them (an EMA copy sees nearly the same embedding)."""
    student = F.normalize(torch.randn(shape, device=device), dim=-1)
    return student, F.normalize(student + 0.3 * torch.randn_like(student), dim=-1)


@functools.cache
def faiss_gpu_resources():
    import faiss

    return faiss.StandardGpuResources()


def faiss_knn(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k-NN of the unit rows of each problem by inner product (faiss.knn / faiss.knn_gpu)."""
    import faiss
    import faiss.contrib.torch_utils  # lets faiss take and return torch tensors

    unit = F.normalize(x, dim=-1)
    if x.is_cuda:
        search = functools.partial(faiss.knn_gpu, faiss_gpu_resources())
    else:
        search = faiss.knn
    found = [search(u, u, k, metric=faiss.METRIC_INNER_PRODUCT) for u in unit]
    return torch.stack([v for v, _ in found]), torch.stack([i for _, i in found])


def topk_knn(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The usual eager k-NN: normalise, bmm, torch.topk; (values, indices) (B, N, k), ties in any order.
    Memory: the (B, N, N) score matrix."""
    unit = F.normalize(x, dim=-1)
    return tuple((unit @ unit.mT).topk(k, dim=-1))


def knn_in_dtype(
    x: torch.Tensor, k: int, dtype: torch.dtype, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """s2dc_kernels.knn on x cast to ``dtype`` (the cast is part of the timed call)."""
    return s2dc_kernels.knn(x.to(dtype), k=k, backend=backend)


def bare_bmm(x: torch.Tensor) -> torch.Tensor:
    """x x^T without the normalisation: the floor of cosine_similarity (issue target: <= 1.15x of it)."""
    return x @ x.mT


def knn_providers(k: int, ours: list[str], target: bool, has_faiss: bool) -> dict:
    """The knn providers at one k: ours, eager, eager-topk, faiss; on ``target`` shapes also Triton's tf32 /
    bf16 variants and compile."""
    providers = {f"s2dc-{b}": functools.partial(s2dc_kernels.knn, k=k, backend=b) for b in ours}
    if "triton" in ours and target:  # the tensor-core variants: tf32 products, bf16 features
        providers["s2dc-triton-tf32"] = harness.provider(
            providers["s2dc-triton"],
            context=functools.partial(harness.tf32_matmuls, True),
            rtol=REDUCED_PRECISION_RTOL,
        )
        providers["s2dc-triton-bf16"] = harness.provider(
            functools.partial(knn_in_dtype, k=k, dtype=torch.bfloat16, backend="triton"),
            rtol=REDUCED_PRECISION_RTOL,
        )
    providers["eager"] = functools.partial(reference.knn, k=k)
    providers["eager-topk"] = functools.partial(topk_knn, k=k)
    if target:
        providers["compile"] = functools.partial(harness.compiled(reference.knn), k=k)
    if has_faiss:
        providers["faiss"] = functools.partial(faiss_knn, k=k)
    return providers


def large_knn_shape(B: int, N: int, D: int, k: int) -> str:
    return f"{B}x{N}x{D} k{k} ({LARGE_KNN_NOTE})"


def make_cases(args) -> list[harness.Case]:
    preset, partial = args.preset.name, functools.partial
    ours_cosine = harness.our_backends(COSINE_BACKENDS, args.device)
    ours_knn = harness.our_backends(KNN_BACKENDS, args.device)
    ours_neighbourhood = harness.our_backends(NC_BACKENDS, args.device)
    has_faiss = importlib.util.find_spec("faiss") is not None

    def target(shape: tuple[int, int, int, int]) -> bool:
        return args.device.type != "cuda" or shape in GPU_TARGET_SHAPES

    cases = []
    for B, N, D, k in FEATURE_SHAPES[preset]:
        shape, inputs = f"{B}x{N}x{D}", partial(features, (B, N, D))
        providers = {f"s2dc-{b}": partial(s2dc_kernels.cosine_similarity, backend=b) for b in ours_cosine}
        providers["eager"] = reference.cosine_similarity
        if target((B, N, D, k)):
            providers["compile"] = harness.compiled(reference.cosine_similarity)
        providers[harness.FLOOR_PROVIDER] = bare_bmm
        for mode in ("fwd", "fwd+bwd"):
            cases.append(harness.Case("cosine_similarity", shape, mode, inputs, providers))
        providers = knn_providers(k, ours_knn, target((B, N, D, k)), has_faiss)
        cases.append(harness.Case("knn", f"{shape} k{k}", "fwd", inputs, providers))

    for B, N, D, k in KNN_SHAPES[preset]:
        providers = knn_providers(k, ours_knn, target((B, N, D, k)), has_faiss)
        cases.append(harness.Case("knn", f"{B}x{N}x{D} k{k}", "fwd", partial(features, (B, N, D)), providers))

    for B, N, D, k in LARGE_KNN_SHAPES[preset]:
        providers = {f"s2dc-{b}": partial(s2dc_kernels.knn, k=k, backend=b) for b in ours_knn if b != "torch"}
        cases.append(
            harness.Case("knn", large_knn_shape(B, N, D, k), "fwd", partial(features, (B, N, D)), providers)
        )

    for B, N, D, k in NEIGHBOURHOOD_SHAPES[preset]:
        providers = {
            f"s2dc-{b}": partial(s2dc_kernels.neighborhood_consistency, k=k, backend=b)
            for b in ours_neighbourhood
        }
        providers["eager"] = partial(reference.neighborhood_consistency, k=k)
        if target((B, N, D, k)):
            providers["compile"] = partial(harness.compiled(reference.neighborhood_consistency), k=k)
        inputs = partial(student_teacher, (B, N, D))
        for mode in ("fwd", "fwd+bwd"):
            cases.append(
                harness.Case("neighborhood_consistency", f"{B}x{N}x{D} k{k}", mode, inputs, providers)
            )
    return cases


# One call of s2dc_kernels.knn in a fresh interpreter; prints the growth of its resident set size in kB: the
# peak (VmHWM, reset to the current size through /proc/self/clear_refs first) minus the size before the call.
# (Not getrusage's ru_maxrss: it also holds the peak of the forked parent before exec, so it cannot be reset.)
PEAK_MEMORY_SCRIPT = """
import torch, s2dc_kernels
def status_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
torch.manual_seed(0)
x = torch.randn({shape})
with torch.no_grad():
    s2dc_kernels.knn(torch.randn(1, 300, {d}), k={k}, backend={backend!r})  # load libraries, thread pools
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_kb("VmRSS")
    s2dc_kernels.knn(x, k={k}, backend={backend!r})
print(status_kb("VmHWM") - before)
"""


def cpu_peak_memory_mb(shape: tuple[int, int, int], k: int, backend: str) -> float:
    """Peak resident memory (MB) that one knn call adds on top of its inputs, in a fresh subprocess."""
    script = PEAK_MEMORY_SCRIPT.format(shape=shape, d=shape[-1], k=k, backend=backend)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 1024


def run_large_knn(cases: list[harness.Case], args: argparse.Namespace) -> list[dict[str, str]]:
    """Time the large k-NN cases, fill each row's peak_mem_mb with its CPU peak memory (Linux; see the
    module docstring), then append the rows to ``args.csv``."""
    with tempfile.TemporaryDirectory() as scratch:  # run_cases appends as it goes: not yet to args.csv
        rows = harness.run_cases(
            cases, argparse.Namespace(**vars(args) | {"csv": Path(scratch) / "rows.csv"})
        )
    if args.device.type == "cpu" and sys.platform.startswith("linux"):
        shapes = {large_knn_shape(*shape): shape for shape in LARGE_KNN_SHAPES[args.preset.name]}
        for row in rows:
            B, N, D, k = shapes[row["shape"]]
            row["peak_mem_mb"] = f"{cpu_peak_memory_mb((B, N, D), k, row['provider'][len('s2dc-') :]):.0f}"
    if rows:
        harness.append_rows(args.csv, rows)
    return rows


def recall_at_k(found: torch.Tensor, exact: torch.Tensor) -> float:
    """Fraction of the exact top-k indices (..., k) found among ``found``'s (..., k) per row, averaged."""
    hits = (found.unsqueeze(-1) == exact.unsqueeze(-2)).any(-1)  # (..., k): exact neighbour found or not
    return hits.double().mean().item()


def print_knn_recall(cases: list[harness.Case], rows: list[dict[str, str]], args: argparse.Namespace) -> None:
    """recall@k of every timed knn provider against the exact fp32 search, one labelled line each."""
    timed = {(r["shape"], r["provider"]) for r in rows if r["op"] == "knn"}
    for case in cases:
        if case.op != "knn" or (case.shape, "eager") not in timed:
            continue
        torch.manual_seed(0)  # the inputs run_cases timed
        inputs = case.make_inputs(args.device)
        with torch.no_grad(), harness.tf32_matmuls(False):
            exact = case.providers["eager"](*inputs)[1]
        for provider, fn in case.providers.items():
            if provider == "eager" or (case.shape, provider) not in timed:
                continue
            with torch.no_grad(), getattr(fn, "context", contextlib.nullcontext)():
                found = fn(*inputs)[1]
            recall = recall_at_k(found.to(exact.device), exact)
            print(
                f"knn recall@k {case.shape} [{provider}]: {recall:.5f} (against exact fp32 eager)", flush=True
            )
        del inputs, exact


def is_large_knn(case: harness.Case) -> bool:
    return case.shape.endswith(f"({LARGE_KNN_NOTE})")


def main() -> list[dict[str, str]]:
    args = harness.parse_args("bench_similarity")
    cases = make_cases(args)
    rows = harness.run_cases([c for c in cases if not is_large_knn(c)], args)
    rows += run_large_knn([c for c in cases if is_large_knn(c)], args)
    device = harness.device_name(args.device)
    print(f"\nbench_similarity on {device} ({args.preset.name}); rows appended to {args.csv}")
    print(harness.rows_table(rows) + "\n")
    print_knn_recall(cases, rows, args)
    return rows


if __name__ == "__main__":
    main()
