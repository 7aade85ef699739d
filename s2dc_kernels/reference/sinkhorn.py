"""Reference Sinkhorn family: log-domain Sinkhorn (POT), SuperGlue's dustbin OT, SwAV's Sinkhorn-Knopp.

Also the gradient rules that do not unroll the iterations ("implicit", "envelope"): they are definitions,
so the public ops use these same functions on top of their fused solvers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def uniform_log_marginal(weights: Tensor | None, batch: int, n: int, like: Tensor) -> Tensor:
    """log(weights) broadcast to (batch, n); None means uniform 1/n.

    Zero weights give -inf with a zero gradient (the log-domain gradient there would be 0 * inf).
    """
    if weights is None:
        return like.new_full((batch, n), -math.log(n)) if n else like.new_zeros((batch, 0))
    live = weights > 0
    return torch.where(live, torch.log(torch.where(live, weights, 1.0)), -math.inf).expand(batch, n)


def plan_from_potentials(cost: Tensor, f: Tensor, g: Tensor, eps: float) -> Tensor:
    """P_ij = exp((f_i + g_j - C_ij) / eps), (B, N, M)."""
    return torch.exp((f[..., :, None] + g[..., None, :] - cost) / eps)


def entropic_value(cost: Tensor, plan: Tensor, log_a: Tensor, log_b: Tensor, eps: float) -> Tensor:
    """sum_ij P_ij C_ij + eps sum_ij P_ij (log P_ij - log a_i - log b_j), per problem (B,).

    Zero-mass rows/columns (log a = -inf) carry P = 0 and contribute 0 (masked before the product, so no NaN
    reaches the gradient).
    """
    log_ab = log_a[..., :, None] + log_b[..., None, :]
    live = plan > 0
    log_ratio = torch.where(live, torch.log(torch.where(live, plan, 1.0)) - log_ab, 0.0)
    return (plan * (cost + eps * log_ratio)).sum((-2, -1))


def envelope_value(
    cost: Tensor, a: Tensor | None, b: Tensor | None, plan: Tensor, f: Tensor, g: Tensor, eps: float
) -> Tensor:
    """The entropic OT value with its envelope-theorem gradient at the solution (plan, f, g), detached.

    W = min_P <P, C> + eps KL(P | a b^T) gives dW/dC = P, dW/da = f - eps log a, dW/db = g - eps log b
    (the Lagrange multipliers of the marginal constraints, up to an additive constant that a fixed total
    mass ignores).
    """
    plan, f, g = plan.detach(), f.detach(), g.detach()
    B, N, M = plan.shape
    log_a = uniform_log_marginal(None if a is None else a.detach(), B, N, plan)
    log_b = uniform_log_marginal(None if b is None else b.detach(), B, M, plan)
    value = entropic_value(cost.detach(), plan, log_a, log_b, eps)
    value = value + ((cost - cost.detach()) * plan).sum((-2, -1))
    for w, log_w, pot in ((a, log_a, f), (b, log_b, g)):
        if w is not None:
            value = value + ((w - w.detach()) * torch.where(w.detach() > 0, pot - eps * log_w, 0.0)).sum(-1)
    return value


class ImplicitPlan(torch.autograd.Function):
    """Identity on a converged plan P whose backward is the implicit-function gradient of the fixed point.

    With K = -C/eps, P = diag(e^alpha) e^K diag(e^beta), P 1 = a, P^T 1 = b, a perturbation (dK, da, db)
    moves the scalings by the solution of H [dalpha; dbeta] = [da - (P.dK) 1; db - (P.dK)^T 1],
    H = [[diag(P 1), P], [P^T, diag(P^T 1)]] (singular along (1, -1), consistent right-hand sides). For an
    upstream gradient Gr, the adjoint [x; y] = H^+ [(Gr.P) 1; (Gr.P)^T 1] gives
    dL/dK = Gr.P - P.(x 1^T + 1 y^T), dL/da = x, dL/db = y. H is eliminated onto its smaller side: a dense
    (min(N, M))^2 solve per problem (the null direction is fixed by adding 1 1^T).
    """

    @staticmethod
    def forward(ctx, cost: Tensor, a: Tensor, b: Tensor, plan: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(plan)
        ctx.eps = eps
        return plan.clone()

    @staticmethod
    def backward(ctx, grad_plan: Tensor):
        (plan,) = ctx.saved_tensors
        gp = grad_plan * plan
        s_r, s_c = gp.sum(-1), gp.sum(-2)
        transpose = plan.shape[-1] > plan.shape[-2]
        if transpose:  # eliminate onto the smaller side: rows and columns swap roles
            x, y = _implicit_adjoint(plan.mT, s_c, s_r)
        else:
            y, x = _implicit_adjoint(plan, s_r, s_c)
        grad_k = gp - plan * (x[..., :, None] + y[..., None, :])
        return -grad_k / ctx.eps, x, y, None, None


def _implicit_adjoint(plan: Tensor, s_r: Tensor, s_c: Tensor) -> tuple[Tensor, Tensor]:
    """Solve [[diag(r), P], [P^T, diag(c)]] [x; y] = [s_r; s_c] for P (B, N, M), N >= M: returns (y, x)."""
    r, c = plan.sum(-1), plan.sum(-2)
    inv_r = torch.where(r > 0, 1.0 / r, 0.0)
    # Schur complement on the column side: (diag(c) - P^T diag(1/r) P) y = s_c - P^T (s_r / r).
    schur = torch.diag_embed(c) - plan.mT @ (inv_r[..., :, None] * plan)
    schur = schur + 1.0 / max(plan.shape[-1], 1)  # + 1 1^T / M fixes the null direction (1^T y = 0)
    rhs = s_c - (plan.mT @ (s_r * inv_r)[..., None])[..., 0]
    y = torch.linalg.solve(schur, rhs)
    x = (s_r - (plan @ y[..., None])[..., 0]) * inv_r
    return y, x


def sinkhorn(
    cost: Tensor,
    a: Tensor | None = None,
    b: Tensor | None = None,
    *,
    eps: float = 0.05,
    n_iters: int = 100,
    tol: float | None = None,
    grad: str = "unroll",
    return_potentials: bool = False,
    return_value: bool = False,
):
    """Log-domain Sinkhorn by plain autograd through the loop (see ``s2dc_kernels.sinkhorn``)."""
    unbatched = cost.dim() == 2
    C = cost[None] if unbatched else cost
    a_b = None if a is None else (a[None] if a.dim() == 1 else a)
    b_b = None if b is None else (b[None] if b.dim() == 1 else b)
    B, N, M = C.shape
    log_a = uniform_log_marginal(a_b, B, N, C)
    log_b = uniform_log_marginal(b_b, B, M, C)
    f, g = C.new_zeros(B, N), C.new_zeros(B, M)
    active = torch.ones(B, dtype=torch.bool, device=C.device)
    with torch.set_grad_enabled(grad == "unroll" and torch.is_grad_enabled()):
        for t in range(n_iters):
            lse = torch.logsumexp((g[:, None, :] - C) / eps, dim=2)
            if tol is not None and t > 0:  # row-marginal error of the previous iterate
                active = active & ((torch.exp(f / eps + lse) - log_a.exp()).abs().sum(-1) >= tol)
            f_new = eps * (log_a - lse)
            g_new = eps * (log_b - torch.logsumexp((f_new[:, :, None] - C) / eps, dim=1))
            f = torch.where(active[:, None], f_new, f)
            g = torch.where(active[:, None], g_new, g)
    return sinkhorn_outputs(
        C, a_b, b_b, log_a, log_b, f, g, eps, grad, return_potentials, return_value, unbatched
    )


def sinkhorn_outputs(
    C: Tensor,
    a: Tensor | None,
    b: Tensor | None,
    log_a: Tensor,
    log_b: Tensor,
    f: Tensor,
    g: Tensor,
    eps: float,
    grad: str,
    return_potentials: bool,
    return_value: bool,
    unbatched: bool,
):
    """Plan [, f, g] [, value] from the potentials, with the gradient rule of ``grad``.

    "unroll": f and g carry the gradient of the iterations; "implicit": the plan's gradient is ImplicitPlan's
    and the potentials are detached; "envelope": only the value has a gradient (envelope theorem);
    "detach": nothing has. a, b are (B or 1, N or M) or None (uniform).
    """
    B, N, M = C.shape
    if grad != "unroll":
        f, g = f.detach(), g.detach()
    plan = plan_from_potentials(C if grad == "unroll" else C.detach(), f, g, eps)
    if grad == "implicit":
        a_full = log_a.exp() if a is None else a.expand(B, N)
        b_full = log_b.exp() if b is None else b.expand(B, M)
        plan = ImplicitPlan.apply(C, a_full, b_full, plan, eps)
    outputs = [plan]
    if return_potentials:
        outputs += [f, g]
    if return_value:
        if grad == "envelope":
            outputs.append(envelope_value(C, a, b, plan, f, g, eps))
        else:
            outputs.append(entropic_value(C if grad != "detach" else C.detach(), plan, log_a, log_b, eps))
    if unbatched:
        outputs = [o[0] for o in outputs]
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


def log_optimal_transport(scores: Tensor, alpha: Tensor | float, n_iters: int) -> Tensor:
    """SuperGlue / S2DC dustbin Sinkhorn, as in their code: the log plan (B, N+1, M+1) scaled by N+M."""
    b, m, n = scores.shape
    one = scores.new_tensor(1)
    ms, ns = (m * one).to(scores), (n * one).to(scores)
    alpha = torch.as_tensor(alpha, dtype=scores.dtype, device=scores.device)
    bins0 = alpha.expand(b, m, 1)
    bins1 = alpha.expand(b, 1, n)
    alpha = alpha.expand(b, 1, 1)
    couplings = torch.cat([torch.cat([scores, bins0], -1), torch.cat([bins1, alpha], -1)], 1)
    norm = -(ms + ns).log()
    log_mu = torch.cat([norm.expand(m), ns.log()[None] + norm])
    log_nu = torch.cat([norm.expand(n), ms.log()[None] + norm])
    log_mu, log_nu = log_mu[None].expand(b, -1), log_nu[None].expand(b, -1)
    u, v = torch.zeros_like(log_mu), torch.zeros_like(log_nu)
    for _ in range(n_iters):
        u = log_mu - torch.logsumexp(couplings + v.unsqueeze(1), dim=2)
        v = log_nu - torch.logsumexp(couplings + u.unsqueeze(2), dim=1)
    return couplings + u.unsqueeze(2) + v.unsqueeze(1) - norm


def sinkhorn_knopp(logits: Tensor, *, eps: float = 0.05, n_iters: int = 3) -> Tensor:
    """SwAV / DINOv2 Sinkhorn-Knopp exactly as their code (scaling domain, single process): (B, K) -> (B, K).

    Overflows for large logits / eps (exp without a shift): the peers' behaviour, kept on purpose.
    """
    Q = torch.exp(logits / eps).t()
    B, K = Q.shape[1], Q.shape[0]
    Q = Q / Q.sum()
    for _ in range(n_iters):
        Q = Q / Q.sum(dim=1, keepdim=True) / K
        Q = Q / Q.sum(dim=0, keepdim=True) / B
    return (Q * B).t()
