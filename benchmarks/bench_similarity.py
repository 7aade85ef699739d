"""Benchmark the similarity ops: cosine_similarity, knn, neighborhood_consistency.

Providers: every available backend of ours ("s2dc-<backend>"), "eager" (the reference), "compile"
(torch.compile of the whole reference) and, for knn, "faiss" (exact inner-product search on unit
rows, one problem at a time) when faiss is importable.

The CPU preset also runs one large k-NN, 1 x 30000 x 30000 (d = 32, k = 8), on our fused backends
only: the reference ("eager", "compile", "s2dc-torch") would build the 3.6 GB score matrix, so it is
skipped there (the shape label says so). Its peak memory is measured on the CPU (Linux), where the
harness records none: the growth of the peak resident set size (VmHWM) over one call in a fresh
subprocess, after the inputs exist and a small warm-up call has loaded the libraries and thread
pools, so it counts the outputs, every temporary and allocator slack, but not the inputs. It is
printed after the timings (not stored in the CSV).

    python benchmarks/bench_similarity.py [--quick | --gpu] [--csv FILE] [--providers a,b] [--ops a,b]
"""

from __future__ import annotations

import functools
import importlib.util
import subprocess
import sys

import harness
import torch
import torch.nn.functional as F

import s2dc_kernels
from s2dc_kernels import reference
from s2dc_kernels.similarity import COSINE_BACKENDS, KNN_BACKENDS, NC_BACKENDS

# (B, N, D, k): patch features against themselves; docs/anchors.md's rows on GPUs.
FEATURE_SHAPES = {"quick": [(16, 216, 384, 8)], "cpu": [(16, 216, 384, 8), (8, 512, 768, 16)]}
FEATURE_SHAPES["gpu"] = [(8, 512, 768, 16), (16, 216, 384, 8), (1, 16384, 256, 16), (1, 65536, 128, 32)]
# (B, N, D, k): one large search whose (N, N) score matrix would take 3.6 GB in fp32; ours only.
LARGE_KNN_SHAPES = {"quick": [], "cpu": [(1, 30000, 32, 8)], "gpu": []}
LARGE_KNN_NOTE = "eager skipped: 3.6 GB matrix"
# (B, N, D, k): S2DC's L_nc, B*3 problems of 144 patches with 512-d projections.
NEIGHBOURHOOD_SHAPES = {"quick": [(12, 144, 512, 8)], "cpu": [(48, 144, 512, 8)], "gpu": [(48, 144, 512, 8)]}


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


def bare_bmm(x: torch.Tensor) -> torch.Tensor:
    """x x^T without the normalisation: the floor of cosine_similarity (issue target: <= 1.15x of it)."""
    return x @ x.mT


def make_cases(args) -> list[harness.Case]:
    preset, partial = args.preset.name, functools.partial
    ours_cosine = harness.our_backends(COSINE_BACKENDS, args.device)
    ours_knn = harness.our_backends(KNN_BACKENDS, args.device)
    ours_neighbourhood = harness.our_backends(NC_BACKENDS, args.device)
    has_faiss = importlib.util.find_spec("faiss") is not None
    cases = []
    for B, N, D, k in FEATURE_SHAPES[preset]:
        shape, inputs = f"{B}x{N}x{D}", partial(features, (B, N, D))
        providers = {f"s2dc-{b}": partial(s2dc_kernels.cosine_similarity, backend=b) for b in ours_cosine}
        providers["eager"] = reference.cosine_similarity
        providers["compile"] = harness.compiled(reference.cosine_similarity)
        providers[harness.FLOOR_PROVIDER] = bare_bmm
        for mode in ("fwd", "fwd+bwd"):
            cases.append(harness.Case("cosine_similarity", shape, mode, inputs, providers))

        providers = {f"s2dc-{b}": partial(s2dc_kernels.knn, k=k, backend=b) for b in ours_knn}
        providers["eager"] = partial(reference.knn, k=k)
        providers["compile"] = partial(harness.compiled(reference.knn), k=k)
        if has_faiss:
            providers["faiss"] = partial(faiss_knn, k=k)
        cases.append(harness.Case("knn", f"{shape} k{k}", "fwd", inputs, providers))

    for B, N, D, k in LARGE_KNN_SHAPES[preset]:
        providers = {f"s2dc-{b}": partial(s2dc_kernels.knn, k=k, backend=b) for b in ours_knn if b != "torch"}
        shape = f"{B}x{N}x{D} k{k} ({LARGE_KNN_NOTE})"
        cases.append(harness.Case("knn", shape, "fwd", partial(features, (B, N, D)), providers))

    for B, N, D, k in NEIGHBOURHOOD_SHAPES[preset]:
        providers = {
            f"s2dc-{b}": partial(s2dc_kernels.neighborhood_consistency, k=k, backend=b)
            for b in ours_neighbourhood
        }
        providers["eager"] = partial(reference.neighborhood_consistency, k=k)
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


def print_large_knn_memory(args) -> None:
    """The CPU peak memory of the large k-NN rows (see the module docstring), as a table."""
    if args.device.type != "cpu" or not sys.platform.startswith("linux"):
        return
    if args.ops is not None and "knn" not in args.ops.split(","):
        return
    body = []
    for B, N, D, k in LARGE_KNN_SHAPES[args.preset.name]:
        for backend in harness.our_backends(KNN_BACKENDS, args.device):
            if backend == "torch" or (args.providers is not None and f"s2dc-{backend}" not in args.providers):
                continue
            peak, matrix = cpu_peak_memory_mb((B, N, D), k, backend), B * N * N * 4 / 2**20
            body.append(["knn", f"{B}x{N}x{D} k{k}", f"s2dc-{backend}", f"{peak:.1f}", f"{matrix:.0f}"])
    if body:
        header = ["op", "shape", "provider", "peak MB (RSS growth, fresh process)", "fp32 score matrix MB"]
        print("\nCPU peak memory of one call, above its inputs\n" + harness.format_table(header, body))


if __name__ == "__main__":
    arguments = harness.parse_args("bench_similarity")
    harness.run_script("bench_similarity", make_cases, arguments)
    print_large_knn_memory(arguments)
