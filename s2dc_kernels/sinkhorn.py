"""Public Sinkhorn family: ``sinkhorn``, ``log_optimal_transport``, ``sinkhorn_knopp``.

Path from a public function to its kernel (the same for every backend):
``sinkhorn`` -> input checks -> ``torch.ops.s2dc.sinkhorn_solve`` (custom op, autograd registered: its
backward is ``torch.ops.s2dc.sinkhorn_solve_backward``) -> the backend's ``forward``/``backward`` (torch
below, ``torch.ops.s2dc_C`` for "cpp"/"cuda", ``s2dc_kernels.triton_kernels.sinkhorn`` for "triton").
The solver returns the potentials and their per-iteration history (O(n_iters (N + M)) per problem); the
"unroll" backward replays the iterations in reverse from that history: no N x M matrix per iteration.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ._utils import (
    check_choice,
    check_int,
    check_positive,
    check_same_device,
    check_tensor,
    check_values,
    extension,
    resolve_backend,
)
from .reference.sinkhorn import sinkhorn_outputs, uniform_log_marginal

SOLVER_BACKENDS = ("torch", "cpp", "triton", "cuda")
GRADS = ("unroll", "implicit", "envelope", "detach")
_MASS_RTOL = 1e-4


# ---------------------------------------------------------------- torch backend of the solver
def _torch_forward(C: Tensor, log_a: Tensor, log_b: Tensor, eps: float, n_iters: int, tol: float):
    """The solver loop of the docs in plain tensor ops (no autograd): f, g, f_hist, g_hist, n_done."""
    B, N, M = C.shape
    f, g = C.new_zeros(B, N), C.new_zeros(B, M)
    f_hist, g_hist = C.new_zeros(B, n_iters, N), C.new_zeros(B, n_iters, M)
    n_done = torch.zeros(B, dtype=torch.int64, device=C.device)
    active = torch.ones(B, 1, dtype=torch.bool, device=C.device)
    for t in range(n_iters):
        lse = torch.logsumexp((g[:, None, :] - C) / eps, dim=2)
        if tol > 0 and t > 0:  # row-marginal L1 error of iterate t - 1, a by-product of this lse
            active = active & ((torch.exp(f / eps + lse) - log_a.exp()).abs().sum(-1, keepdim=True) >= tol)
        f = torch.where(active, eps * (log_a - lse), f)
        g = torch.where(active, eps * (log_b - torch.logsumexp((f[:, :, None] - C) / eps, dim=1)), g)
        f_hist[:, t], g_hist[:, t] = f, g
        n_done += active[:, 0]
    return f, g, f_hist, g_hist, n_done


def _softmax_weights(f: Tensor, g: Tensor, C: Tensor, eps: float, log_m: Tensor, dim: int) -> Tensor:
    """exp((f_i + g_j - C_ij)/eps - log_m), 0 where the marginal log_m is -inf (zero mass)."""
    live = torch.isfinite(log_m).unsqueeze(dim)
    expo = (f[:, :, None] + g[:, None, :] - C) / eps - log_m.unsqueeze(dim)
    return torch.exp(torch.where(live, expo, -math.inf))


def _torch_backward(C, log_a, log_b, eps, f_hist, g_hist, n_done, grad_f, grad_g):
    """Reverse replay of the iterations from their history: grad_C, grad_log_a, grad_log_b.

    For t = n_done..1 with adjoints F (of f^t) and G (of g^t): the g-update adds G_j Pc_ij to grad_C and
    -sum_j G_j Pc_ij to F; the f-update adds F_i Pr_ij to grad_C and passes G = -sum_i F_i Pr_ij to g^{t-1};
    Pc/Pr are the column/row softmax weights of the updates. One N x M temporary per step (torch fallback).
    """
    F, G = grad_f.clone(), grad_g.clone()
    grad_C = torch.zeros_like(C)
    grad_log_a, grad_log_b = torch.zeros_like(log_a), torch.zeros_like(log_b)
    for t in reversed(range(f_hist.shape[1])):
        live = (n_done > t)[:, None]
        f_t, g_t = f_hist[:, t], g_hist[:, t]
        g_prev = g_hist[:, t - 1] if t > 0 else torch.zeros_like(g_t)
        # g^t = eps log b - eps LSE_i((f^t - C)/eps): column-softmax weights Pc.
        G_t = torch.where(live, G, 0.0)
        weighted = G_t[:, None, :] * _softmax_weights(f_t, g_t, C, eps, log_b, 1)
        grad_C += weighted
        F = F - weighted.sum(2)
        grad_log_b += eps * G_t
        # f^t = eps log a - eps LSE_j((g^{t-1} - C)/eps): row-softmax weights Pr.
        F_t = torch.where(live, F, 0.0)
        weighted = F_t[:, :, None] * _softmax_weights(f_t, g_prev, C, eps, log_a, 2)
        grad_C += weighted
        G = torch.where(live, -weighted.sum(1), G)
        grad_log_a += eps * F_t
        F = torch.where(live, 0.0, F)
    return grad_C, grad_log_a, grad_log_b


def _kernels(backend: str):
    """(forward, backward) of a solver backend."""
    if backend == "torch":
        return _torch_forward, _torch_backward
    if backend == "triton":
        from .triton_kernels import sinkhorn as triton_sinkhorn

        return triton_sinkhorn.sinkhorn_forward, triton_sinkhorn.sinkhorn_backward
    extension()  # registers torch.ops.s2dc_C (the device of the tensors picks the cpp or cuda kernel)
    return torch.ops.s2dc_C.sinkhorn_forward, torch.ops.s2dc_C.sinkhorn_backward


# ---------------------------------------------------------------- custom ops
@torch.library.custom_op("s2dc::sinkhorn_solve", mutates_args=())
def sinkhorn_solve(
    C: Tensor, log_a: Tensor, log_b: Tensor, eps: float, n_iters: int, tol: float, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Log-domain Sinkhorn solve: f (B,N), g (B,M), f_hist (B,T,N), g_hist (B,T,M), n_done (B,) int64."""
    return tuple(_kernels(backend)[0](C, log_a, log_b, eps, n_iters, tol))


@sinkhorn_solve.register_fake
def _(C, log_a, log_b, eps, n_iters, tol, backend):
    B, N, M = C.shape
    hist = (C.new_empty(B, n_iters, N), C.new_empty(B, n_iters, M))
    return C.new_empty(B, N), C.new_empty(B, M), *hist, C.new_empty(B, dtype=torch.int64)


@torch.library.custom_op("s2dc::sinkhorn_solve_backward", mutates_args=())
def sinkhorn_solve_backward(
    C: Tensor,
    log_a: Tensor,
    log_b: Tensor,
    eps: float,
    f_hist: Tensor,
    g_hist: Tensor,
    n_done: Tensor,
    grad_f: Tensor,
    grad_g: Tensor,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradient of a loss of (f, g) through all executed iterations: grad_C, grad_log_a, grad_log_b."""
    return tuple(_kernels(backend)[1](C, log_a, log_b, eps, f_hist, g_hist, n_done, grad_f, grad_g))


@sinkhorn_solve_backward.register_fake
def _(C, log_a, log_b, eps, f_hist, g_hist, n_done, grad_f, grad_g, backend):
    return torch.empty_like(C), torch.empty_like(log_a), torch.empty_like(log_b)


def _setup_context(ctx, inputs, output):
    C, log_a, log_b, eps, _, _, backend = inputs
    _, _, f_hist, g_hist, n_done = output
    ctx.save_for_backward(C, log_a, log_b, f_hist, g_hist, n_done)
    ctx.eps, ctx.backend = eps, backend


def _backward(ctx, grad_f, grad_g, *_):
    C, log_a, log_b, f_hist, g_hist, n_done = ctx.saved_tensors
    grad_f = torch.zeros_like(log_a) if grad_f is None else grad_f.contiguous()
    grad_g = torch.zeros_like(log_b) if grad_g is None else grad_g.contiguous()
    grads = sinkhorn_solve_backward(
        C, log_a, log_b, ctx.eps, f_hist, g_hist, n_done, grad_f, grad_g, ctx.backend
    )
    return *grads, None, None, None, None


sinkhorn_solve.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- shared checks
def _check_marginal(name: str, w: Tensor | None, B: int, n: int, dtype: torch.dtype) -> Tensor | None:
    """Validate a marginal ((B, n), (n,) or None) and return it as (B or 1, n) in the solver dtype."""
    if w is None:
        return None
    check_tensor(name, w, (1, 2))
    if w.shape[-1] != n or (w.dim() == 2 and w.shape[0] != B):
        want = f"({n},) or ({B}, {n})"
        raise ValueError(f"{name} must have shape {want} to match cost, got {tuple(w.shape)}")
    if check_values() and w.numel() and bool((w < 0).any()):
        raise ValueError(f"{name} has negative entries; marginals must be non-negative")
    return (w[None] if w.dim() == 1 else w).to(dtype)


def _check_masses(a: Tensor | None, b: Tensor | None) -> None:
    """Both marginals must carry the same positive total mass per problem (None = mass 1)."""
    if not check_values():
        return
    mass_a = a.sum(-1) if a is not None else torch.ones(())
    mass_b = b.sum(-1) if b is not None else torch.ones(())
    for name, mass in (("a", mass_a), ("b", mass_b)):
        if mass.numel() and bool((mass <= 0).any()):
            raise ValueError(f"{name} must have positive total mass in every problem")
    mass_a, mass_b = torch.broadcast_tensors(mass_a.double().cpu(), mass_b.double().cpu())
    if mass_a.numel() and not torch.allclose(mass_a, mass_b, rtol=_MASS_RTOL, atol=0):
        raise ValueError(
            "a and b must have the same total mass in every problem (balanced OT); "
            f"got {mass_a.flatten()[:4].tolist()} vs {mass_b.flatten()[:4].tolist()}"
        )


def _solver_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16 inputs are solved in fp32 (the potentials need the range and the precision)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _potentials(C, log_a, log_b, eps, n_iters, tol, backend, differentiable):
    """f, g from the custom op; through its registered backward when ``differentiable``."""
    args = (C.contiguous(), log_a.contiguous(), log_b.contiguous(), eps, n_iters, tol, backend)
    if differentiable:
        return sinkhorn_solve(*args)[:2]
    with torch.no_grad():
        return sinkhorn_solve(*(x.detach() if isinstance(x, Tensor) else x for x in args))[:2]


# ---------------------------------------------------------------- public API
def sinkhorn(
    cost: Tensor,
    a: Tensor | None = None,
    b: Tensor | None = None,
    *,
    eps: float = 0.05,
    n_iters: int = 100,
    tol: float | None = None,
    grad: str = "unroll",
    backend: str = "auto",
    return_potentials: bool = False,
    return_value: bool = False,
):
    """Entropic optimal transport by log-domain Sinkhorn, batched.

    From f = g = 0, ``n_iters`` alternating updates
    ``f_i = eps log a_i - eps LSE_j((g_j - C_ij)/eps)``, then
    ``g_j = eps log b_j - eps LSE_i((f_i - C_ij)/eps)``;
    returns ``P_ij = exp((f_i + g_j - C_ij)/eps)``. Equals POT's
    ``ot.batch.solve_batch(cost, reg=eps, a=a, b=b, method="log_sinkhorn", max_iter=n_iters, tol=0).plan``.

    Args:
        cost: C, (B, N, M) or (N, M), floating (fp16/bf16 are solved in fp32).
        a, b: marginals (B, N) / (N,) and (B, M) / (M,), non-negative, equal total mass; None = uniform.
            Zero entries mark rows/columns that take no mass.
        eps: entropic regularisation, > 0.
        n_iters: maximum number of iterations, >= 1.
        tol: if set, a problem stops once the row-marginal L1 error ``sum_i |sum_j P_ij - a_i|`` of its last
            iterate is below ``tol`` (checked on the device in every iteration, no host sync).
        grad: "unroll" (exactly autograd through the iterations, memory O(n_iters (N + M))), "implicit"
            (implicit differentiation of the fixed point, for converged plans), "envelope" (only the value
            has a gradient: dW/dC = P, dW/da = f - eps log a, dW/db = g - eps log b), "detach" (no gradient).
        backend: "auto", "torch", "cpp", "triton" or "cuda".
        return_potentials: also return f (B, N) and g (B, M).
        return_value: also return ``W = sum P C + eps sum P (log P - log a - log b)``, (B,).

    Returns:
        P (B, N, M) [, f, g] [, value]; unbatched inputs give unbatched outputs.
    """
    check_tensor("cost", cost, (2, 3))
    eps = check_positive("eps", eps)
    n_iters = check_int("n_iters", n_iters, 1)
    tol = 0.0 if tol is None else check_positive("tol", tol)
    check_choice("grad", grad, GRADS)
    device = check_same_device(cost=cost, a=a, b=b)
    unbatched = cost.dim() == 2
    dtype = _solver_dtype(cost.dtype)
    C = (cost[None] if unbatched else cost).to(dtype)
    B, N, M = C.shape
    if N == 0 or M == 0:
        raise ValueError(f"cost must have at least one row and one column, got shape {tuple(cost.shape)}")
    a_b, b_b = _check_marginal("a", a, B, N, dtype), _check_marginal("b", b, B, M, dtype)
    _check_masses(a_b, b_b)
    backend = resolve_backend(backend, op="sinkhorn", device=device, supported=SOLVER_BACKENDS)
    log_a, log_b = uniform_log_marginal(a_b, B, N, C), uniform_log_marginal(b_b, B, M, C)
    differentiable = grad == "unroll" and torch.is_grad_enabled()
    f, g = _potentials(C, log_a, log_b, eps, n_iters, tol, backend, differentiable)
    outputs = sinkhorn_outputs(
        C, a_b, b_b, log_a, log_b, f, g, eps, grad, return_potentials, return_value, unbatched
    )
    if dtype == cost.dtype:
        return outputs
    return outputs.to(cost.dtype) if isinstance(outputs, Tensor) else tuple(o.to(cost.dtype) for o in outputs)


def dustbin_problem(scores: Tensor, alpha: Tensor | float) -> tuple[Tensor, Tensor, Tensor, float]:
    """SuperGlue's dustbin OT as a Sinkhorn problem on (B, N, M) scores: the couplings Z (B, N+1, M+1) (solve
    with cost -Z, eps = 1), the log marginals log_mu (B, N+1) and log_nu (B, M+1), and norm = -log(N + M)."""
    B, N, M = scores.shape
    if isinstance(alpha, Tensor):  # it takes a gradient
        alpha = torch.as_tensor(alpha, dtype=scores.dtype, device=scores.device).reshape(1, 1, 1)
        couplings = torch.cat([torch.cat([scores, alpha.expand(B, N, 1)], -1), alpha.expand(B, 1, M + 1)], 1)
    else:
        couplings = F.pad(scores, (0, 1, 0, 1), value=float(alpha))
    norm = -math.log(N + M)
    log_mu = F.pad(scores.new_full((B, N), norm), (0, 1), value=math.log(M) + norm)
    log_nu = F.pad(scores.new_full((B, M), norm), (0, 1), value=math.log(N) + norm)
    return couplings, log_mu, log_nu, norm


def log_optimal_transport(
    scores: Tensor, alpha: Tensor | float, n_iters: int, *, backend: str = "auto"
) -> Tensor:
    """SuperGlue / S2DC dustbin Sinkhorn: the log plan (B, N+1, M+1), exactly as their code computes it.

    Z = scores with one dustbin row and column of score ``alpha`` appended; marginals (norm = -log(N+M)):
    rows norm (N times) then log(M) + norm, columns norm (M times) then log(N) + norm; ``n_iters``
    log-Sinkhorn iterations at eps = 1 from zero potentials; returns ``Z + u_i + v_j - norm``. It is
    ``sinkhorn``'s solver on the cost -Z, so every backend runs it; the gradient ("unroll") reaches
    ``scores`` and a tensor ``alpha``.

    Args:
        scores: (B, N, M) or (N, M) similarity scores.
        alpha: dustbin score, a float or a 0-d / one-element tensor (then it receives a gradient).
        n_iters: number of iterations, >= 1.
        backend: "auto", "torch", "cpp", "triton" or "cuda".
    """
    check_tensor("scores", scores, (2, 3))
    n_iters = check_int("n_iters", n_iters, 1)
    if isinstance(alpha, Tensor):
        check_tensor("alpha", alpha, (0, 1))
        if alpha.numel() != 1:
            raise ValueError(f"alpha must be a float or a one-element tensor, got shape {tuple(alpha.shape)}")
    elif isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise TypeError(f"alpha must be a finite float or a tensor, got {alpha!r}")
    # a 0-d CPU tensor is a scalar, as everywhere in PyTorch: it may go with scores on any device
    scalar_alpha = not isinstance(alpha, Tensor) or (alpha.dim() == 0 and alpha.device.type == "cpu")
    device = check_same_device(scores=scores, alpha=None if scalar_alpha else alpha)
    backend = resolve_backend(backend, op="log_optimal_transport", device=device, supported=SOLVER_BACKENDS)
    unbatched = scores.dim() == 2
    dtype = _solver_dtype(scores.dtype)
    Z = (scores[None] if unbatched else scores).to(dtype)
    couplings, log_mu, log_nu, norm = dustbin_problem(Z, alpha)
    differentiable = torch.is_grad_enabled()
    u, v = _potentials(-couplings, log_mu, log_nu, 1.0, n_iters, 0.0, backend, differentiable)
    log_plan = couplings + u[:, :, None] + v[:, None, :] - norm
    return (log_plan[0] if unbatched else log_plan).to(scores.dtype)


def _group_logsumexp(x: Tensor, dim: int | tuple[int, ...], group) -> Tensor:
    """log sum exp of x over ``dim`` and the ranks of ``group`` (keepdim): one MAX, one SUM all-reduce."""
    shift = x.detach().amax(dim=dim, keepdim=True)
    if group is not None:
        dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
    total = torch.exp(x - shift).sum(dim=dim, keepdim=True)
    if group is not None:
        from torch.distributed.nn.functional import all_reduce  # the differentiable one

        total = all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return shift + torch.log(total)


KNOPP_TRITON_MIN_ROWS = 2048  # "auto" takes the fused Sinkhorn-Knopp from this many samples (H200: 0.44x
# PyTorch at 256 x 65536, 3.6-4x at 5000 and 8192 x 65536; measured before the row half-step was split into
# chunks for few samples, which is unmeasured)


def _knopp_fused_unsupported(backend: str, logits: Tensor, process_group) -> str | None:
    """Why the fused Sinkhorn-Knopp of ``backend`` ("cpp" or "triton") cannot take these logits, or None."""
    if backend == "torch":
        return None
    if torch.compiler.is_compiling():
        return "it is not traced by torch.compile (use backend='torch')"
    if process_group is not None:
        return "process_group is not supported (use backend='torch')"
    if backend == "triton" and logits.dtype == torch.float64:
        return "float64 logits are not supported (use backend='torch' or, on CPUs, 'cpp')"
    if logits.requires_grad and torch.is_grad_enabled():
        return "logits that require grad are not supported (use backend='torch', or detach the logits)"
    if backend == "triton" and logits.numel() >= 2**31:
        return f"logits of {logits.numel()} entries (>= 2^31) are untested with the Triton kernels"
    return None


def sinkhorn_knopp(
    logits: Tensor,
    *,
    eps: float = 0.05,
    n_iters: int = 3,
    process_group: dist.ProcessGroup | None = None,
    backend: str = "auto",
) -> Tensor:
    """SwAV / DINOv2 Sinkhorn-Knopp on (B, K) logits, in the log domain (no overflow at any logits / eps).

    Same numbers as SwAV's ``distributed_sinkhorn``: Q = exp(logits / eps)^T normalised to total mass 1, then
    ``n_iters`` times: each prototype (row of Q) scaled to mass 1/K, each sample (column) to mass 1/B_total;
    returns B_total * Q^T, (B, K), rows summing to 1. Computed on L = logits / eps with log-sum-exp
    normalisations, so logits of +-400 at eps 0.04 work.

    Args:
        logits: (B, K) local batch of scores.
        eps: temperature, > 0.
        n_iters: iterations, >= 1.
        process_group: when given, the batch is sharded across its ranks (B_total = B * world size) and the
            prototype sums are all-reduced, as in SwAV's distributed version.
        backend: "auto", "torch", "cpp" (fused C++ on CPU tensors: one pass over the logits per half-step,
            float32/float64, float16/bfloat16 logits computed in float32) or "triton" (fused: one launch per
            half-step, float16/bfloat16/float32 logits computed in float32); the fused backends have no
            gradient and no process_group. "auto" takes "cpp" on CPU tensors and "triton" on CUDA tensors
            with B >= KNOPP_TRITON_MIN_ROWS where they apply, else "torch".
    """
    check_tensor("logits", logits, (2,))
    eps = check_positive("eps", eps)
    n_iters = check_int("n_iters", n_iters, 1)
    device = check_same_device(logits=logits)
    requested = backend
    backend = resolve_backend(
        backend,
        op="sinkhorn_knopp",
        device=device,
        supported=("torch", "cpp", "triton"),
        cannot_take=lambda b: _knopp_fused_unsupported(b, logits, process_group),
    )
    world = 1 if process_group is None else dist.get_world_size(process_group)
    B, K = logits.shape
    if B == 0 or K == 0:
        if world > 1:
            raise ValueError("logits must not be empty when a process_group is given")
        return logits.clone()
    if backend == "triton" and requested == "auto" and B < KNOPP_TRITON_MIN_ROWS:
        backend = "torch"  # too few row blocks to fill a GPU: PyTorch's reductions are faster (H200)
    if backend == "triton":
        from .triton_kernels import sinkhorn as triton_sinkhorn

        return triton_sinkhorn.sinkhorn_knopp(logits.float(), eps, n_iters).to(logits.dtype)
    if backend == "cpp":
        extension()  # registers torch.ops.s2dc_C
        Q = torch.ops.s2dc_C.sinkhorn_knopp(logits.to(_solver_dtype(logits.dtype)), eps, n_iters)
        return Q.to(logits.dtype)
    b_total = B * world
    L = logits / eps
    L = L - _group_logsumexp(L, (0, 1), process_group)
    for _ in range(n_iters):
        L = L - (_group_logsumexp(L, 0, process_group) + math.log(K))
        L = L - (torch.logsumexp(L, dim=1, keepdim=True) + math.log(b_total))
    return torch.exp(L + math.log(b_total))


# ---------------------------------------------------------------- Sinkhorn on features (cost never stored)
FEATURE_COSTS = ("cosine", "sqeuclidean", "dot")
FEATURE_BACKENDS = ("torch", "cpp", "triton")
FEATURE_GRADS = ("envelope", "detach")


@torch.library.custom_op("s2dc::sinkhorn_features_solve", mutates_args=())
def sinkhorn_features_solve(
    X: Tensor,
    Y: Tensor,
    alpha: Tensor,
    beta: Tensor,
    log_a: Tensor,
    log_b: Tensor,
    gamma: float,
    eps: float,
    n_iters: int,
    tol: float,
    allow_tf32: bool,
) -> tuple[Tensor, Tensor]:
    """Potentials f (B, N), g (B, M) of log-domain Sinkhorn on C_ij = alpha_i + beta_j - gamma X_i . Y_j,
    streamed from the features by the Triton kernels (no gradient)."""
    from .triton_kernels import sinkhorn_features as triton_features

    return triton_features.features_solve(
        X, Y, alpha, beta, log_a, log_b, gamma, eps, n_iters, tol, allow_tf32
    )


@sinkhorn_features_solve.register_fake
def _(X, Y, alpha, beta, log_a, log_b, gamma, eps, n_iters, tol, allow_tf32):
    return alpha.new_empty(alpha.shape), beta.new_empty(beta.shape)


@torch.library.custom_op("s2dc::sinkhorn_features_plan_sums", mutates_args=())
def sinkhorn_features_plan_sums(
    X: Tensor,
    Y: Tensor,
    alpha: Tensor,
    beta: Tensor,
    pot_x: Tensor,
    pot_y: Tensor,
    w: Tensor,
    gamma: float,
    eps: float,
    with_z: bool,
    allow_tf32: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sums over j of the plan P_ij = exp((pot_x_i + pot_y_j - C_ij) / eps), streamed: r = P 1 (B, N),
    q = P w (B, N), Z = P Y (B, N, d) when ``with_z`` (else (B, N, 0))."""
    from .triton_kernels import sinkhorn_features as triton_features

    return triton_features.features_plan_sums(
        X, Y, alpha, beta, pot_x, pot_y, w, gamma, eps, with_z, allow_tf32
    )


@sinkhorn_features_plan_sums.register_fake
def _(X, Y, alpha, beta, pot_x, pot_y, w, gamma, eps, with_z, allow_tf32):
    B, N, D = X.shape
    return alpha.new_empty(B, N), alpha.new_empty(B, N), alpha.new_empty(B, N, D if with_z else 0)


@torch.library.custom_op("s2dc::sinkhorn_features_value", mutates_args=())
def sinkhorn_features_value(
    X: Tensor,
    Y: Tensor,
    alpha: Tensor,
    beta: Tensor,
    f: Tensor,
    g: Tensor,
    u: Tensor,
    v: Tensor,
    gamma: float,
    eps: float,
    allow_tf32: bool,
) -> Tensor:
    """W = sum_ij P_ij (u_i + v_j) = sum_i (r_i u_i + (P v)_i), (B,): the entropic value
    sum P C + eps sum P (log P - log a - log b) with u = f - eps log a, v = g - eps log b (0 at zero mass).
    Its registered backward is the envelope gradient dW/dC = P chained to X, Y, alpha, beta."""
    r, q, _ = sinkhorn_features_plan_sums(X, Y, alpha, beta, f, g, v, gamma, eps, False, allow_tf32)
    return (r * u).sum(-1) + q.sum(-1)


@sinkhorn_features_value.register_fake
def _(X, Y, alpha, beta, f, g, u, v, gamma, eps, allow_tf32):
    return alpha.new_empty(alpha.shape[0])


def _features_value_setup(ctx, inputs, output):
    X, Y, alpha, beta, f, g, _, _, gamma, eps, allow_tf32 = inputs
    ctx.save_for_backward(X, Y, alpha, beta, f, g)
    ctx.gamma, ctx.eps, ctx.allow_tf32 = gamma, eps, allow_tf32


def _features_value_backward(ctx, grad_value):
    """dW/dX_i = -gamma sum_j P_ij Y_j, dW/dalpha_i = sum_j P_ij, and the same over i for Y and beta: one
    streamed pass per side, skipped when that side needs no gradient."""
    X, Y, alpha, beta, f, g = ctx.saved_tensors
    scale = grad_value[:, None]
    grads = [None] * 11
    for side, (rows, cols, alpha_rows, beta_cols, pot_rows, pot_cols) in enumerate(
        ((X, Y, alpha, beta, f, g), (Y, X, beta, alpha, g, f))
    ):
        if ctx.needs_input_grad[side] or ctx.needs_input_grad[2 + side]:
            row_mass, _, plan_times_cols = sinkhorn_features_plan_sums(
                rows, cols, alpha_rows, beta_cols, pot_rows, pot_cols, torch.zeros_like(pot_cols), ctx.gamma,
                ctx.eps, True, ctx.allow_tf32,
            )  # fmt: skip
            grads[side] = (-ctx.gamma * scale[..., None] * plan_times_cols).to(rows.dtype)
            grads[2 + side] = scale * row_mass
    return tuple(grads)


sinkhorn_features_value.register_autograd(_features_value_backward, setup_context=_features_value_setup)


def _feature_terms(x: Tensor, y: Tensor, cost: str, dtype: torch.dtype):
    """(X, Y, alpha, beta, gamma) with cost(x, y)_ij = alpha_i + beta_j - gamma X_i . Y_j, differentiable.

    cosine: X = x / |x|, Y = y / |y| (as F.normalize: a zero row stays zero), alpha = 1, beta = 0, gamma = 1;
    sqeuclidean: X = x, Y = y, alpha = |x|^2, beta = |y|^2, gamma = 2; dot: alpha = beta = 0, gamma = 1.
    alpha, beta in the solver ``dtype``; X, Y in the features' dtype (normalised in ``dtype`` first).
    """
    xs, ys = x.to(dtype), y.to(dtype)
    zeros_x, zeros_y = xs.new_zeros(xs.shape[:-1]), ys.new_zeros(ys.shape[:-1])
    if cost == "cosine":
        X, Y = torch.nn.functional.normalize(xs, dim=-1), torch.nn.functional.normalize(ys, dim=-1)
        return X.to(x.dtype), Y.to(y.dtype), zeros_x + 1.0, zeros_y, 1.0
    if cost == "sqeuclidean":
        return x, y, (xs * xs).sum(-1), (ys * ys).sum(-1), 2.0
    return x, y, zeros_x, zeros_y, 1.0


def _feature_cost(x: Tensor, y: Tensor, cost: str, dtype: torch.dtype) -> Tensor:
    """cost(x, y) (B, N, M) in ``dtype``, built explicitly (the torch backend)."""
    X, Y, alpha, beta, gamma = _feature_terms(x, y, cost, dtype)
    scores = X.to(dtype) @ Y.to(dtype).mT
    return alpha[..., :, None] + beta[..., None, :] - gamma * scores


def sinkhorn_features(
    x: Tensor,
    y: Tensor,
    a: Tensor | None = None,
    b: Tensor | None = None,
    *,
    eps: float = 0.05,
    n_iters: int = 100,
    cost: str = "cosine",
    tol: float | None = None,
    grad: str = "envelope",
    backend: str = "auto",
    return_value: bool = False,
):
    """Log-domain Sinkhorn between two point clouds, the cost computed from the features on the fly.

    The potentials are exactly those of ``sinkhorn(C, a, b, eps=eps, n_iters=n_iters, tol=tol,
    return_potentials=True)`` on C = cost(x, y): "cosine" C_ij = 1 - x_i.y_j / (|x_i| |y_j|), "sqeuclidean"
    C_ij = |x_i - y_j|^2, "dot" C_ij = -x_i.y_j. The Triton backend never stores C: each half-step streams
    the features (memory O((N + M) d)); fp32 features are multiplied exactly unless
    ``torch.backends.cuda.matmul.allow_tf32`` is set (then in tf32), fp16/bf16 features on the tensor cores
    with fp32 accumulation and fp32 potentials.

    Args:
        x: (B, N, d) or (N, d) features; y: (B, M, d) or (M, d), same dtype and d.
        a, b: marginals (B, N) / (N,) and (B, M) / (M,), non-negative, equal total mass; None = uniform.
            Zero entries mark points that take no mass (their potential is -inf).
        eps: entropic regularisation, > 0.
        n_iters: maximum number of iterations, >= 1.
        cost: "cosine", "sqeuclidean" or "dot".
        tol: per-problem stop on the row-marginal L1 error, as in ``sinkhorn`` (checked on the device).
        grad: "envelope" (only the value is differentiable: dW/dC = P chained to x and y through the cost,
            computed by streaming, dW/da = f - eps log a, dW/db = g - eps log b) or "detach" (nothing is).
        backend: "auto" (triton on CUDA tensors, cpp on CPU tensors), "torch" (builds C, then ``sinkhorn``:
            the reference), "cpp" (CPU tensors: builds C, then ``sinkhorn``'s fused C++ solver; memory
            O(N M)) or "triton".
        return_value: also return W = sum P C + eps sum P (log P - log a - log b), (B,), with
            P_ij = exp((f_i + g_j - C_ij) / eps).

    Returns:
        f (B, N), g (B, M) [, value (B,)] in the features' dtype; unbatched inputs give unbatched outputs.
    """
    check_tensor("x", x, (2, 3))
    check_tensor("y", y, (x.dim(),))
    eps = check_positive("eps", eps)
    n_iters = check_int("n_iters", n_iters, 1)
    tol = 0.0 if tol is None else check_positive("tol", tol)
    check_choice("cost", cost, FEATURE_COSTS)
    check_choice("grad", grad, FEATURE_GRADS)
    device = check_same_device(x=x, y=y, a=a, b=b)
    if y.dtype != x.dtype:
        raise TypeError(f"y must have the dtype of x ({x.dtype}), got {y.dtype}")
    unbatched = x.dim() == 2
    xb, yb = (x[None], y[None]) if unbatched else (x, y)
    B, N, D = xb.shape
    if yb.shape[0] != B or yb.shape[2] != D:
        raise ValueError(f"y must have shape (B, M, {D}) with B = {B} to match x, got {tuple(y.shape)}")
    M = yb.shape[1]
    if N == 0 or M == 0 or D == 0:
        raise ValueError(
            f"x and y must have at least one point and one feature, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    dtype = _solver_dtype(x.dtype)
    a_b, b_b = _check_marginal("a", a, B, N, dtype), _check_marginal("b", b, B, M, dtype)
    _check_masses(a_b, b_b)
    backend = resolve_backend(backend, op="sinkhorn_features", device=device, supported=FEATURE_BACKENDS)
    differentiable = grad == "envelope" and torch.is_grad_enabled()
    if backend in ("torch", "cpp"):
        with torch.set_grad_enabled(differentiable):
            C = _feature_cost(xb, yb, cost, dtype)
        outputs = sinkhorn(
            C, a, b, eps=eps, n_iters=n_iters, tol=tol or None, grad=grad, backend=backend,
            return_potentials=True, return_value=return_value,
        )[1:]  # fmt: skip
    else:
        outputs = _triton_features(xb, yb, a_b, b_b, eps, n_iters, cost, tol, differentiable, return_value)
    if unbatched:
        outputs = tuple(o[0] for o in outputs)
    return tuple(o.to(x.dtype) for o in outputs)


def _triton_features(x, y, a, b, eps, n_iters, cost, tol, differentiable, return_value):
    """(f, g [, value]) of sinkhorn_features by the streamed Triton kernels, batched (B, ...)."""
    B, N, _ = x.shape
    M = y.shape[1]
    dtype = _solver_dtype(x.dtype)
    allow_tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
    with torch.set_grad_enabled(differentiable):
        X, Y, alpha, beta, gamma = _feature_terms(x, y, cost, dtype)
        X, Y, alpha, beta = X.contiguous(), Y.contiguous(), alpha.contiguous(), beta.contiguous()
    like = alpha.detach()
    log_a = uniform_log_marginal(None if a is None else a.detach(), B, N, like)
    log_b = uniform_log_marginal(None if b is None else b.detach(), B, M, like)
    with torch.no_grad():
        f, g = sinkhorn_features_solve(
            X.detach(), Y.detach(), like, beta.detach(), log_a.contiguous(), log_b.contiguous(), gamma, eps,
            n_iters, tol, allow_tf32,
        )  # fmt: skip
    if not return_value:
        return f, g
    # u = f - eps log a, v = g - eps log b: the multipliers of the marginals (0 where the mass is 0)
    u = torch.where(torch.isfinite(log_a), f - eps * log_a, 0.0)
    v = torch.where(torch.isfinite(log_b), g - eps * log_b, 0.0)
    with torch.set_grad_enabled(differentiable):
        if not differentiable:
            X, Y, alpha, beta = X.detach(), Y.detach(), like, beta.detach()
        value = sinkhorn_features_value(X, Y, alpha, beta, f, g, u, v, gamma, eps, allow_tf32)
        for w, multiplier in ((a, u), (b, v)):
            if w is not None and differentiable:  # envelope: dW/dw = multiplier, as envelope_value
                value = value + ((w - w.detach()) * multiplier).sum(-1)
    return f, g, value
