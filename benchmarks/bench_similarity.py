"""Benchmark the similarity ops: cosine_similarity, knn, neighborhood_consistency.

Providers: every available backend of ours ("s2dc-<backend>"), "eager" (the reference), "compile"
(torch.compile of the whole reference) and, for knn, "faiss" (exact inner-product search on unit
rows, one problem at a time) when faiss is importable.

    python benchmarks/bench_similarity.py [--quick | --gpu] [--csv FILE] [--providers a,b] [--ops a,b]
"""

from __future__ import annotations

import functools
import importlib.util

import harness
import torch
import torch.nn.functional as F

import s2dc_kernels
from s2dc_kernels import reference
from s2dc_kernels.similarity import SUPPORTED_BACKENDS

# (B, N, D, k): patch features against themselves; anchors.md's rows on GPUs.
FEATURE_SHAPES = {"quick": [(16, 216, 384, 8)], "cpu": [(16, 216, 384, 8), (8, 512, 768, 16)]}
FEATURE_SHAPES["gpu"] = [(8, 512, 768, 16), (16, 216, 384, 8), (1, 16384, 256, 16), (1, 65536, 128, 32)]
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


def make_cases(args) -> list[harness.Case]:
    preset, partial = args.preset.name, functools.partial
    ours = harness.our_backends(SUPPORTED_BACKENDS, args.device)
    has_faiss = importlib.util.find_spec("faiss") is not None
    cases = []
    for B, N, D, k in FEATURE_SHAPES[preset]:
        shape, inputs = f"{B}x{N}x{D}", partial(features, (B, N, D))
        providers = {f"s2dc-{b}": partial(s2dc_kernels.cosine_similarity, backend=b) for b in ours}
        providers["eager"] = reference.cosine_similarity
        providers["compile"] = harness.compiled(reference.cosine_similarity)
        cases.append(harness.Case("cosine_similarity", shape, "fwd", inputs, providers))

        providers = {f"s2dc-{b}": partial(s2dc_kernels.knn, k=k, backend=b) for b in ours}
        providers["eager"] = partial(reference.knn, k=k)
        providers["compile"] = partial(harness.compiled(reference.knn), k=k)
        if has_faiss:
            providers["faiss"] = partial(faiss_knn, k=k)
        cases.append(harness.Case("knn", f"{shape} k{k}", "fwd", inputs, providers))

    for B, N, D, k in NEIGHBOURHOOD_SHAPES[preset]:
        providers = {
            f"s2dc-{b}": partial(s2dc_kernels.neighborhood_consistency, k=k, backend=b) for b in ours
        }
        providers["eager"] = partial(reference.neighborhood_consistency, k=k)
        providers["compile"] = partial(harness.compiled(reference.neighborhood_consistency), k=k)
        inputs = partial(student_teacher, (B, N, D))
        for mode in ("fwd", "fwd+bwd"):
            cases.append(
                harness.Case("neighborhood_consistency", f"{B}x{N}x{D} k{k}", mode, inputs, providers)
            )
    return cases


if __name__ == "__main__":
    harness.main("bench_similarity", make_cases)
