"""Benchmark the Sinkhorn family: sinkhorn, log_optimal_transport (dustbin OT), sinkhorn_knopp,
sinkhorn_features.

Providers: every available backend of ours ("s2dc-<backend>"), "eager" (the reference), "compile"
(torch.compile of ONE iteration, the loop in Python, as in docs/anchors.md), "pot" (POT's batched
log-domain solver, tol=0), "official-loop" (SuperGlue / S2DC's solver run problem by problem) and, on
GPUs for the squared-Euclidean sinkhorn_features rows, "flash-sinkhorn" (FlashSinkhorn's alternating
solver with its defaults: tf32 products, autotuned; problems one after another) when it is importable.

    python benchmarks/bench_sinkhorn.py [--quick | --gpu] [--csv FILE] [--providers a,b] [--ops a,b]
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from unittest import mock

import harness
import torch

import s2dc_kernels
from s2dc_kernels import reference
from s2dc_kernels.reference.sinkhorn import plan_from_potentials, uniform_log_marginal
from s2dc_kernels.sinkhorn import FEATURE_BACKENDS, SOLVER_BACKENDS, dustbin_problem

EPS = 0.05  # docs/anchors.md: eps 0.05, uniform marginals, cost uniform in [0, 1)
DUSTBIN_ALPHA = 1.0  # S2DC's dustbin score (docs/method.md, section 7)

# (B, N, M, iterations, modes); docs/anchors.md's rows on GPUs, its CPU rows otherwise.
SINKHORN_SHAPES = {
    "quick": [(16, 216, 216, 50, ("fwd", "fwd+bwd"))],
    "cpu": [(16, 216, 216, 50, ("fwd", "fwd+bwd")), (8, 512, 512, 50, ("fwd", "fwd+bwd"))],
    "gpu": [
        (16, 64, 64, 50, ("fwd", "fwd+bwd")),
        (16, 216, 216, 50, ("fwd", "fwd+bwd")),
        (8, 512, 512, 50, ("fwd", "fwd+bwd")),
        (4, 2048, 2048, 50, ("fwd", "fwd+bwd")),
        (1, 4096, 16384, 20, ("fwd", "fwd+bwd")),
        (1, 8192, 65536, 3, ("fwd",)),
    ],
}
# (B, N, M scores before the dustbin row and column, iterations, modes): S2DC's B*3 problems of 144 patches.
DUSTBIN_SHAPES = {
    "quick": [(16, 144, 144, 100, ("fwd+bwd",))],
    "cpu": [(16, 144, 144, 100, ("fwd", "fwd+bwd"))],
    "gpu": [(12, 144, 144, 100, ("fwd", "fwd+bwd")), (48, 144, 144, 100, ("fwd", "fwd+bwd"))],
}
# (B samples, K prototypes, iterations): SwAV / DINOv2 teacher targets.
KNOPP_SHAPES = {"quick": [(256, 8192, 3)], "cpu": [(256, 65536, 3)]}
KNOPP_SHAPES["gpu"] = [(5000, 65536, 3), (8192, 65536, 3), (256, 65536, 3)]
# (B, N, M, d, iterations, eps, cost, modes) of sinkhorn_features: FlashSinkhorn's workloads (docs/anchors.md)
# and a batch of 8 problems in one launch on GPUs; "fwd" returns f, "fwd+bwd" differentiates the value.
FEATURE_SHAPES = {
    "quick": [(1, 256, 512, 32, 10, 0.1, "sqeuclidean", ("fwd", "fwd+bwd"))],
    "cpu": [(2, 1024, 1024, 64, 10, 0.1, "sqeuclidean", ("fwd", "fwd+bwd"))],
    "gpu": [
        (1, 10000, 10000, 64, 10, 0.1, "sqeuclidean", ("fwd", "fwd+bwd")),
        (1, 4096, 16384, 128, 20, 0.05, "sqeuclidean", ("fwd", "fwd+bwd")),
        (1, 4096, 16384, 128, 20, 0.05, "cosine", ("fwd",)),
        (8, 2048, 2048, 64, 50, 0.05, "sqeuclidean", ("fwd",)),
    ],
}
POT_MAX_ENTRIES = 2**28  # POT's temporaries at 8192 x 65536 are several times the 2 GB cost


def log_sinkhorn_step(C, log_a, log_b, f, g, eps: float):
    """One alternating iteration of the reference loop: f from g, then g from the new f (cost units)."""
    f = eps * (log_a - torch.logsumexp((g[:, None, :] - C) / eps, dim=2))
    g = eps * (log_b - torch.logsumexp((f[:, :, None] - C) / eps, dim=1))
    return f, g


def loop_of(step, C, log_a, log_b, eps: float, n_iters: int):
    """Potentials after ``n_iters`` calls of ``step`` from zero potentials."""
    f, g = C.new_zeros(log_a.shape), C.new_zeros(log_b.shape)
    for _ in range(n_iters):
        f, g = step(C, log_a, log_b, f, g, eps)
    return f, g


def sinkhorn_by_steps(step, C, eps: float, n_iters: int):
    """The reference sinkhorn (uniform marginals) with its iteration replaced by ``step``."""
    B, N, M = C.shape
    log_a, log_b = uniform_log_marginal(None, B, N, C), uniform_log_marginal(None, B, M, C)
    f, g = loop_of(step, C, log_a, log_b, eps, n_iters)
    return plan_from_potentials(C, f, g, eps)


def dustbin_by_steps(step, scores, alpha, n_iters: int):
    """SuperGlue's log_optimal_transport with its iteration replaced by ``step``.

    Its update u = log_mu - LSE_j(Z_ij + v_j) is the sinkhorn f-update with eps = 1 and cost C = -Z.
    """
    Z, log_mu, log_nu, norm = dustbin_problem(scores, alpha)
    u, v = loop_of(step, -Z, log_mu, log_nu, 1.0, n_iters)
    return Z + u[:, :, None] + v[:, None, :] - norm


def swav_step(Q, K: int, B: int):
    """One SwAV Sinkhorn-Knopp iteration on Q (K, B): rows to mass 1/K, then columns to 1/B."""
    Q = Q / Q.sum(dim=1, keepdim=True) / K
    return Q / Q.sum(dim=0, keepdim=True) / B


def knopp_by_steps(step, logits, eps: float, n_iters: int):
    """The reference sinkhorn_knopp with its iteration replaced by ``step``."""
    Q = torch.exp(logits / eps).t()
    K, B = Q.shape
    Q = Q / Q.sum()
    for _ in range(n_iters):
        Q = step(Q, K, B)
    return (Q * B).t()


def uniform_cost(shape: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor]:
    return (torch.rand(shape, device=device),)


def cosine_scores(
    shape: tuple[int, int, int], device: torch.device, dim: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """S2DC's L_p2p inputs: cosine scores of unit 512-d rows (B, N, M), and the dustbin score alpha."""
    B, N, M = shape
    q = torch.nn.functional.normalize(torch.randn(B, N, dim, device=device), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, M, dim, device=device), dim=-1)
    return q @ k.mT, torch.tensor(DUSTBIN_ALPHA, device=device)


def prototype_scores(shape: tuple[int, int], device: torch.device) -> tuple[torch.Tensor]:
    """Scores of unit vectors against unit prototypes lie in [-1, 1]: exp(1 / 0.05) does not overflow fp32."""
    return (torch.rand(shape, device=device) * 2 - 1,)


def official_loop(scores: torch.Tensor, alpha: torch.Tensor, n_iters: int) -> torch.Tensor:
    """S2DC's training code: one SuperGlue solve per problem in a Python loop."""
    return torch.cat([reference.log_optimal_transport(s[None], alpha, n_iters) for s in scores])


def pot_plan(C, eps: float, n_iters: int, grad: str):
    import ot

    return ot.batch.solve_batch(C, reg=eps, max_iter=n_iters, tol=0, method="log_sinkhorn", grad=grad).plan


REGIME_MAX_ENTRIES = 512 * 512  # Triton's regimes are benchmarked side by side up to this N * M


def with_triton_regime(regime: str, fn):
    """fn with Triton's Sinkhorn regime forced ("program" or "split"; see use_split_regime) around the whole
    timed call, backward included (harness ``context``)."""

    context = functools.partial(mock.patch.dict, os.environ, {"S2DC_TRITON_SINKHORN_REGIME": regime})
    return harness.provider(fn, context=context)


def solver_providers(op, ours: list[str], n_entries: int, **kwargs) -> dict:
    """Our backends on ``op``, plus Triton with each regime forced on small and medium problems. The CUDA C++
    kernels (one block per problem) only run up to REGIME_MAX_ENTRIES: past it they take seconds per call."""
    if n_entries > REGIME_MAX_ENTRIES:
        ours = [b for b in ours if b != "cuda"]
    providers = {f"s2dc-{b}": functools.partial(op, backend=b, **kwargs) for b in ours}
    if "triton" in ours and n_entries <= REGIME_MAX_ENTRIES:
        for regime in ("program", "split"):
            providers[f"s2dc-triton-{regime}"] = with_triton_regime(regime, providers["s2dc-triton"])
    return providers


def point_clouds(shape: tuple[int, int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, N, d), y (B, M, d) Gaussian with variance 1/d per feature (squared distances about 2)."""
    B, N, M, d = shape
    return torch.randn(B, N, d, device=device) / d**0.5, torch.randn(B, M, d, device=device) / d**0.5


def stored_feature_cost(x: torch.Tensor, y: torch.Tensor, cost: str) -> torch.Tensor:
    """cost(x, y) (B, N, M) as a matrix, as an eager user builds it."""
    if cost == "cosine":
        unit_x, unit_y = torch.nn.functional.normalize(x, dim=-1), torch.nn.functional.normalize(y, dim=-1)
        return 1 - unit_x @ unit_y.mT
    if cost == "sqeuclidean":
        return (x * x).sum(-1)[..., :, None] + (y * y).sum(-1)[..., None, :] - 2 * x @ y.mT
    return -(x @ y.mT)


def features_eager(x, y, *, cost: str, eps: float, n_iters: int, value: bool):
    """The reference sinkhorn on the stored cost: f, or the envelope-differentiable value."""
    C = stored_feature_cost(x, y, cost)
    grad = "envelope" if value else "detach"
    outputs = reference.sinkhorn(
        C, eps=eps, n_iters=n_iters, grad=grad, return_potentials=True, return_value=value
    )
    return outputs[3] if value else outputs[1]


def features_ours(x, y, *, dtype: torch.dtype | None = None, value: bool, **kwargs):
    """sinkhorn_features: f, or the value (features cast to ``dtype`` first when given)."""
    if dtype is not None:
        x, y = x.to(dtype), y.to(dtype)
    outputs = s2dc_kernels.sinkhorn_features(x, y, return_value=value, **kwargs)
    return outputs[2] if value else outputs[0]


def flash_sinkhorn_f(x, y, *, eps: float, n_iters: int):
    """f of FlashSinkhorn 0.4.1's alternating solver (cost |x - y|^2, uniform marginals, its defaults: tf32,
    autotune), each problem in turn (it takes one problem per call). Its default GeomLoss convention starts
    from g = 0 with the log marginals inside the LSE; on the same iterates ours (from g = 0, OTT convention)
    is f + eps (log a_i + log b) with uniform b, and g unchanged (checked in float64 against the
    reference)."""
    from flash_sinkhorn.sinkhorn_solvers import sinkhorn_flashstyle_alternating

    potentials = []
    for xb, yb in zip(x, y, strict=True):
        n, m = xb.shape[0], yb.shape[0]
        a, b = xb.new_full((n,), 1.0 / n), yb.new_full((m,), 1.0 / m)
        f, _ = sinkhorn_flashstyle_alternating(xb, yb, a, b, eps=eps, n_iters=n_iters)
        potentials.append(f - eps * (math.log(n) + math.log(m)))
    return torch.stack(potentials)


def with_tf32(fn):
    """fn with torch.backends.cuda.matmul.allow_tf32 set around the whole timed call (harness ``context``)."""
    return harness.provider(fn, context=functools.partial(harness.tf32_matmuls, True))


def make_cases(args) -> list[harness.Case]:
    preset, device = args.preset.name, args.device
    ours = harness.our_backends(SOLVER_BACKENDS, device)
    has_pot = importlib.util.find_spec("ot") is not None
    has_flash_sinkhorn = importlib.util.find_spec("flash_sinkhorn") is not None
    compiled_step, compiled_swav = harness.compiled(log_sinkhorn_step), harness.compiled(swav_step)
    partial = functools.partial
    cases = []
    # S2DC's own workload first: a GPU check cut short by its time limit still has it.
    for B, N, M, iters, modes in DUSTBIN_SHAPES[preset]:
        for mode in modes:
            providers = solver_providers(
                s2dc_kernels.log_optimal_transport, ours, (N + 1) * (M + 1), n_iters=iters
            )
            providers["eager"] = partial(reference.log_optimal_transport, n_iters=iters)
            providers["compile"] = partial(dustbin_by_steps, compiled_step, n_iters=iters)
            providers["official-loop"] = partial(official_loop, n_iters=iters)
            inputs = partial(cosine_scores, (B, N, M))
            cases.append(
                harness.Case("log_optimal_transport", f"{B}x{N}x{M}+bin {iters}it", mode, inputs, providers)
            )

    for B, N, M, iters, modes in SINKHORN_SHAPES[preset]:
        for mode in modes:
            providers = solver_providers(s2dc_kernels.sinkhorn, ours, N * M, eps=EPS, n_iters=iters)
            providers["eager"] = partial(reference.sinkhorn, eps=EPS, n_iters=iters)
            providers["compile"] = partial(sinkhorn_by_steps, compiled_step, eps=EPS, n_iters=iters)
            if has_pot and B * N * M <= POT_MAX_ENTRIES:
                grad = "autodiff" if mode == "fwd+bwd" else "detach"
                providers["pot"] = partial(pot_plan, eps=EPS, n_iters=iters, grad=grad)
            inputs = partial(uniform_cost, (B, N, M))
            cases.append(harness.Case("sinkhorn", f"{B}x{N}x{M} {iters}it", mode, inputs, providers))

    for B, K, iters in KNOPP_SHAPES[preset]:
        providers = {
            f"s2dc-{b}": partial(s2dc_kernels.sinkhorn_knopp, eps=EPS, n_iters=iters, backend=b)
            for b in harness.our_backends(("torch", "cpp", "triton"), device)
        }
        providers["eager"] = partial(reference.sinkhorn_knopp, eps=EPS, n_iters=iters)
        providers["compile"] = partial(knopp_by_steps, compiled_swav, eps=EPS, n_iters=iters)
        inputs = partial(prototype_scores, (B, K))
        cases.append(harness.Case("sinkhorn_knopp", f"{B}x{K} {iters}it", "fwd", inputs, providers))

    for B, N, M, d, iters, eps, cost, modes in FEATURE_SHAPES[preset]:
        for mode in modes:
            kwargs = dict(cost=cost, eps=eps, n_iters=iters, value=mode == "fwd+bwd")
            providers = {
                f"s2dc-{b}": partial(features_ours, backend=b, **kwargs)
                for b in harness.our_backends(FEATURE_BACKENDS, device)
            }
            if "s2dc-triton" in providers:  # the tensor-core variants: tf32 products, bf16 features
                providers["s2dc-triton-tf32"] = with_tf32(providers["s2dc-triton"])
                providers["s2dc-triton-bf16"] = partial(
                    features_ours, backend="triton", dtype=torch.bfloat16, **kwargs
                )
            providers["eager"] = partial(features_eager, **kwargs)
            if device.type == "cuda" and cost == "sqeuclidean" and mode == "fwd" and has_flash_sinkhorn:
                providers["flash-sinkhorn"] = harness.provider(  # tf32 products (its default)
                    partial(flash_sinkhorn_f, eps=eps, n_iters=iters), rtol=1e-2
                )
            inputs = partial(point_clouds, (B, N, M, d))
            shape = f"{B}x{N}x{M} d{d} {cost} {iters}it"
            cases.append(harness.Case("sinkhorn_features", shape, mode, inputs, providers))
    return cases


if __name__ == "__main__":
    harness.main("bench_sinkhorn", make_cases)
