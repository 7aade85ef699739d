"""The S2DC pretraining losses (docs/method.md, sections 2-5) as modules, vectorised over problems.

Shared inputs of the token losses: q (B, Z, N, d) the student's unit token rows of the source view,
k (B, Z, N, d) the teacher's unit token rows of the affine (teacher) view, truth (B, N, N) the 0/1 ground
truth of a volume (rows = source tokens, columns = teacher tokens), shared by its Z layers. The B * Z layers
are independent problems, solved in one batched call (the official code loops over them in Python).

``ops`` picks the implementation of the kernel ops (dustbin Sinkhorn, neighbourhood consistency): "fused" runs
the public ops of ``s2dc_kernels`` with backend="auto", "reference" the pure-PyTorch
``s2dc_kernels.reference``.
Each module returns an unweighted scalar; the training loop applies the weights (0 switches a term off).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import s2dc_kernels
from s2dc_kernels import reference
from s2dc_kernels._utils import check_choice, check_int, check_positive, launch_graphs

OPS = ("fused", "reference")
CLAMP = 1e-6  # probabilities are clamped to [CLAMP, 1 - CLAMP] before the logs (official value)


def _kernel_op(ops: str, name: str):
    """The op ``name``: public API with backend="auto" for "fused", ``s2dc_kernels.reference`` otherwise."""
    ops = check_choice("ops", ops, OPS)
    if ops == "fused":
        return functools.partial(getattr(s2dc_kernels, name), backend="auto")
    return getattr(reference, name)


def _check_token_inputs(q: Tensor, k: Tensor, truth: Tensor) -> None:
    """Shapes of the token-loss inputs: q, k (B, Z, N, d), truth (B, N, N)."""
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(
            f"q and k must be (B, Z, N, d) of one shape, got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    B, _, N, _ = q.shape
    if truth.shape != (B, N, N):
        raise ValueError(
            f"truth must be (B, N, N) = {(B, N, N)} for q {tuple(q.shape)}, got {tuple(truth.shape)}"
        )


def _positive_weights(q: Tensor, k: Tensor, truth: Tensor) -> Tensor:
    """Check the token-loss inputs; return the positive mask as 0/1 weights (B, 1, N, N) in q's dtype
    (shared by the Z layers of a volume, broadcast rather than copied)."""
    _check_token_inputs(q, k, truth)
    return (truth > 0.5).to(q.dtype)[:, None]


def token_scores(q: Tensor, k: Tensor) -> Tensor:
    """S = q k^T per problem: q, k (B, Z, N, d) -> (B*Z, N, N), rows = source tokens. L_p2p and L_p2s both
    start from it: computed once and passed to both, its gradient (one product with k) is taken once too."""
    B, Z, N, d = q.shape
    return q.reshape(B * Z, N, d) @ k.reshape(B * Z, N, d).transpose(1, 2)


def _scores(q: Tensor, k: Tensor, scores: Tensor | None) -> Tensor:
    """token_scores(q, k), or the given ``scores`` after a shape check."""
    if scores is None:
        return token_scores(q, k)
    B, Z, N, _ = q.shape
    if scores.shape != (B * Z, N, N):
        raise ValueError(
            f"scores must be token_scores(q, k), (B*Z, N, N) = {(B * Z, N, N)}, got {tuple(scores.shape)}"
        )
    return scores


def _masked_mean(values: Tensor, weights: Tensor) -> Tensor:
    """Mean of values (B*Z, N, N) over the entries where the 0/1 weights (B, 1, N, N) are 1, per problem
    -> (B*Z,); 0 where there are none. values must be finite (a product with the weights, cheaper than a
    select)."""
    B = weights.shape[0]
    total = (values.view(B, -1, *values.shape[-2:]) * weights).sum((-2, -1))
    return (total / weights.sum((-2, -1)).clamp_min(1)).reshape(-1)


def _mean_weights(weights: Tensor, grad: Tensor) -> Tensor:
    """The gradient of _masked_mean(values, weights) (per problem, weights (B, 1, N, M)) to its values, times
    the upstream grad (P,): grad_p w_nm / max(1, sum w) -> (B, Z, N, M)."""
    B = weights.shape[0]
    return grad.view(B, -1, 1, 1) * (weights / weights.sum((-2, -1), keepdim=True).clamp_min(1))


def _sharpness(affinity: Tensor, dim: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(max - mean) / std of affinity along dim, unbiased std: (sharpness, argmax, mean, std). On the CPU the
    std is two plain passes (torch.std reduces the strided dim 7x slower there at these shapes; same value
    and gradient); on GPUs torch.std_mean's one kernel (the loss path is bound by kernel launches there)."""
    if affinity.is_cuda:
        std, mean = torch.std_mean(affinity, dim)
    else:
        mean = affinity.mean(dim)
        std = ((affinity - mean.unsqueeze(dim)).square().sum(dim) / (affinity.shape[dim] - 1)).sqrt()
    top, argmax = affinity.max(dim)
    return (top - mean) / std, argmax, mean, std


def _replayed(key: str, fn: Callable[..., Tensor], inputs: tuple[Tensor, ...], out: Tensor) -> Tensor:
    """fn(*inputs) into ``out``, replayed as one CUDA graph on GPUs (launch_graphs: the closed forms below are
    dozens of small kernels, whose launches cost more than their work); fn(*inputs) itself elsewhere."""
    if not out.is_cuda:
        return fn(*inputs)
    launch_graphs.run((key,), lambda *args: args[-1].copy_(fn(*args[:-1])), inputs, (out,))
    return out


def _p2s_forward(scores: Tensor, positive: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
    """L_p2s per problem (see P2SLoss) of scores (P, N, M) = q k^T and the 0/1 weights positive (B, 1, N, M)
    (P = B * Z) -> (the losses (P,), the statistics that _p2s_backward takes)."""
    B, (P, N, M) = positive.shape[0], scores.shape
    affinity = (1 + scores) / 2
    col, col_argmax, col_mean, col_std = _sharpness(affinity, 1)  # (P, M)
    row, row_argmax, row_mean, row_std = _sharpness(affinity, 2)  # (P, N)
    col_weights, row_weights = F.softmax(col, -1), F.softmax(row, -1)
    clamped = affinity.clamp(CLAMP, 1 - CLAMP)
    masked = ((-torch.log(clamped)).view(B, -1, N, M) * positive).view(P, N, M)
    col_sums, row_sums = masked.sum(1), masked.sum(2)  # U (P, M), V (P, N)
    loss_pos = ((col_sums * col_weights).sum(-1) + (row_sums * row_weights).sum(-1)) / 2
    loss_neg = _masked_mean(-torch.log(1 - clamped), 1 - positive)
    stats = (col, col_argmax, col_mean, col_std, col_weights, col_sums)
    stats += (row, row_argmax, row_mean, row_std, row_weights, row_sums)
    return loss_pos + loss_neg, stats


def _p2s_backward(scores: Tensor, positive: Tensor, stats: tuple[Tensor, ...], grad: Tensor) -> Tensor:
    """dL/dscores (P, N, M) of the L_p2s losses given their upstream gradient grad (P,) (see
    _P2SClosedForm for the formulas)."""
    B, (P, N, M) = positive.shape[0], scores.shape
    affinity = (1 + scores) / 2
    col, col_argmax, col_mean, col_std, col_weights, col_sums = stats[:6]
    row, row_argmax, row_mean, row_std, row_weights, row_sums = stats[6:]
    half = grad[:, None] / 2  # (P, 1)
    clamped = affinity.clamp(CLAMP, 1 - CLAMP)
    pos_weight = (half * col_weights)[:, None, :] + (half * row_weights)[:, :, None]  # (P, N, M)
    neg_weight = _mean_weights(1 - positive, grad)  # (B, Z, N, M)
    grad_a = ((-pos_weight / clamped).view(B, -1, N, M) * positive).view(P, N, M)
    grad_a = grad_a + (neg_weight / (1 - clamped).view(B, -1, N, M)).view(P, N, M)
    grad_a = grad_a * ((affinity >= CLAMP) & (affinity <= 1 - CLAMP))
    for dim, n, sharp, argmax, mean, std, weights, sums in (
        (1, N, col, col_argmax, col_mean, col_std, col_weights, col_sums),
        (2, M, row, row_argmax, row_mean, row_std, row_weights, row_sums),
    ):
        d_sharp = half * weights * (sums - (weights * sums).sum(-1, keepdim=True))
        scaled = (d_sharp / std).unsqueeze(dim)
        centred = affinity - mean.unsqueeze(dim)
        grad_a = grad_a - scaled / n - (scaled * (sharp / ((n - 1) * std)).unsqueeze(dim)) * centred
        grad_a = grad_a.scatter_add(dim, argmax.unsqueeze(dim), scaled)
    return grad_a / 2


class _P2SClosedForm(torch.autograd.Function):
    """L_p2s per problem (see P2SLoss) with its gradient in closed form: the term (q k^T given) dispatches 54
    ops forward and 71 backward, against 58 and 102 for autograd through the formulas. On GPUs, where each op
    is a kernel launch and the loss path is launch-bound, each direction is replayed as one CUDA graph (the
    backward then recomputes the forward's statistics: no copies out of the graph).

    With A the affinity, A' = clamp(A), U_m = sum_n G_nm (-log A'_nm), V_n = sum_m G_nm (-log A'_nm), c/r
    the column/row sharpness, w = softmax(c), v = softmax(r), Neg = max(1, #{G = 0}) and the upstream gamma:
        dL/dc_m = gamma / 2 w_m (U_m - w.U),   dL/dr_n = gamma / 2 v_n (V_n - v.V)
        dc_m/dA_nm = ([n = argmax_n A_nm] - 1 / N) / std_m - c_m (A_nm - mean_m) / ((N - 1) std_m^2)
        dL/dA_nm += [clamp passes] (-gamma/2 G_nm (w_m + v_n) / A'_nm + gamma (1 - G_nm) / Neg / (1 - A'_nm))
    and the row terms alike (with M); dL/dS = dL/dA / 2.
    """

    @staticmethod
    def forward(ctx, scores: Tensor, positive: Tensor) -> Tensor:
        """scores (P, N, M) = q k^T, positive (B, 1, N, M) 0/1 weights (P = B * Z) -> the losses (P,)."""
        if scores.is_cuda:
            ctx.save_for_backward(scores, positive)
            losses = scores.new_empty(scores.shape[0])
            return _replayed("p2s forward", lambda s, g: _p2s_forward(s, g)[0], (scores, positive), losses)
        losses, stats = _p2s_forward(scores, positive)
        ctx.save_for_backward(scores, positive, *stats)
        return losses

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        scores, positive, *stats = ctx.saved_tensors
        if stats:
            return _p2s_backward(scores, positive, tuple(stats), grad), None

        def recomputed(scores: Tensor, positive: Tensor, grad: Tensor) -> Tensor:
            return _p2s_backward(scores, positive, _p2s_forward(scores, positive)[1], grad)

        return _replayed("p2s backward", recomputed, (scores, positive, grad), torch.empty_like(scores)), None


def _p2p_losses(log_plan: Tensor, positive: Tensor) -> Tensor:
    """L_p2p per problem (see P2PLoss) of the log plan (P, N + 1, M + 1) and the 0/1 weights positive
    (B, 1, N, M) (P = B * Z) -> (P,)."""
    plan = log_plan[:, :-1, :-1].exp().clamp(CLAMP, 1 - CLAMP)
    return _masked_mean(-torch.log(plan), positive) + _masked_mean(-torch.log(1 - plan), 1 - positive)


def _p2p_grad(log_plan: Tensor, positive: Tensor, grad: Tensor) -> Tensor:
    """dL/dlog_plan (P, N + 1, M + 1) of the L_p2p losses given their upstream gradient grad (P,) (see
    _P2PClosedForm for the formula)."""
    B, (P, N, M) = positive.shape[0], log_plan[:, :-1, :-1].shape
    plan = log_plan[:, :-1, :-1].exp()
    clamped = plan.clamp(CLAMP, 1 - CLAMP)
    odds = (clamped / (1 - clamped)).view(B, -1, N, M)
    grad_block = _mean_weights(1 - positive, grad) * odds - _mean_weights(positive, grad)
    grad_block = grad_block.view(P, N, M) * ((plan >= CLAMP) & (plan <= 1 - CLAMP))
    return F.pad(grad_block, (0, 1, 0, 1))


class _P2PClosedForm(torch.autograd.Function):
    """L_p2p per problem from the dustbin log plan (see P2PLoss) with its gradient in closed form, each
    direction one CUDA graph on GPUs. Where the clamp passes, d(-log P)/d(log P) = -1 and
    d(-log(1 - P))/d(log P) = P / (1 - P), so with Pos and Neg the (at least 1) counts of G = 1 and G = 0
    entries and the upstream gamma:
        dL/d(log P)_nm = gamma ([G_nm = 0] P_nm / (1 - P_nm) / Neg - [G_nm = 1] / Pos)
    on the N x M block, 0 on the dustbin row and column.
    """

    @staticmethod
    def forward(ctx, log_plan: Tensor, positive: Tensor) -> Tensor:
        """log_plan (P, N + 1, M + 1), positive (B, 1, N, M) 0/1 weights (P = B * Z) -> the losses (P,)."""
        ctx.save_for_backward(log_plan, positive)
        losses = log_plan.new_empty(log_plan.shape[0])
        return _replayed("p2p forward", _p2p_losses, (log_plan, positive), losses)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        log_plan, positive = ctx.saved_tensors
        grad_log_plan = torch.empty_like(log_plan)
        return _replayed("p2p backward", _p2p_grad, (log_plan, positive, grad), grad_log_plan), None


class P2PLoss(nn.Module):
    """L_p2p: patch-to-patch discrepancy through dustbin optimal transport (docs/method.md, section 2).

    Per problem, with S = q k^T (unit rows: cosine scores, eps = 1):
        log P = log_optimal_transport(S, alpha, n_iters)     (SuperGlue dustbin, official scaling by N + M)
        P     = clamp(exp(log P)[:N, :N], 1e-6, 1 - 1e-6)    (dustbin row and column dropped)
        L     = mean_{G=1} -log P + mean_{G=0} -log(1 - P)
    and the loss is the mean over problems. alpha is a fixed float, as in the official code (its Parameter
    never reaches the optimiser). The gradient reaches q and k through all n_iters iterations. "fused" runs
    the fused dustbin Sinkhorn and takes the loss's gradient to log P in closed form (_P2PClosedForm).
    """

    def __init__(self, ops: str, n_iters: int = 100, alpha: float = 1.0):
        super().__init__()
        self.ops = check_choice("ops", ops, OPS)
        self.log_optimal_transport = _kernel_op(ops, "log_optimal_transport")
        self.n_iters = check_int("n_iters", n_iters, 1)
        self.alpha = float(alpha)

    def forward(self, q: Tensor, k: Tensor, truth: Tensor, scores: Tensor | None = None) -> Tensor:
        """q, k (B, Z, N, d), truth (B, N, N), optionally scores = token_scores(q, k) -> scalar."""
        positive = _positive_weights(q, k, truth)
        scores = _scores(q, k, scores)  # (B*Z, N, N)
        log_plan = self.log_optimal_transport(scores, self.alpha, self.n_iters)
        if self.ops == "fused":
            return _P2PClosedForm.apply(log_plan, positive).mean()
        plan = log_plan[:, :-1, :-1].exp().clamp(CLAMP, 1 - CLAMP)
        loss_pos = _masked_mean(-torch.log(plan), positive)
        loss_neg = _masked_mean(-torch.log(1 - plan), 1 - positive)
        return (loss_pos + loss_neg).mean()


class P2SLoss(nn.Module):
    """L_p2s: patch-to-structure consistency, sharpness-weighted soft regularisation (docs/method.md, sec. 3).

    Per problem, with A = (1 + q k^T) / 2 (N, N) and unbiased std:
        w_c[m] = softmax_m((max_n A_nm - mean_n A_nm) / std_n A_nm)     (column sharpness)
        w_r[n] = softmax_n((max_m A_nm - mean_m A_nm) / std_m A_nm)     (row sharpness)
        L = 0.5 * sum_{G=1} -log A'_nm (w_c[m] + w_r[n]) + mean_{G=0} -log(1 - A'_nm)
    with A' = clamp(A, 1e-6, 1 - 1e-6), and the loss is the mean over problems. The weights keep their
    gradient (official code). No kernel op here: "reference" is autograd through these formulas, "fused" the
    same values with the gradient in closed form (_P2SClosedForm: fewer ops to launch).
    """

    def __init__(self, ops: str):
        super().__init__()
        self.ops = check_choice("ops", ops, OPS)

    def forward(self, q: Tensor, k: Tensor, truth: Tensor, scores: Tensor | None = None) -> Tensor:
        """q, k (B, Z, N, d), truth (B, N, N), optionally scores = token_scores(q, k) -> scalar."""
        positive = _positive_weights(q, k, truth)
        scores = _scores(q, k, scores)
        if self.ops == "fused":
            return _P2SClosedForm.apply(scores, positive).mean()
        affinity = (1 + scores) / 2  # (P, N, N), rows n = source, columns m = teacher
        col_sharpness = _sharpness(affinity, 1)[0]  # (P, M)
        row_sharpness = _sharpness(affinity, 2)[0]  # (P, N)
        affinity = affinity.clamp(CLAMP, 1 - CLAMP)
        B, N = positive.shape[0], affinity.shape[-1]
        # sum_{G=1} -log A'_nm (w_c[m] + w_r[n]) as the column and row sums of the masked -log A' against
        # the two weight vectors (no N x N weight matrix).
        masked = ((-torch.log(affinity)).view(B, -1, N, N) * positive).reshape(-1, N, N)
        loss_pos = (
            (masked.sum(1) * F.softmax(col_sharpness, -1)).sum(-1)
            + (masked.sum(2) * F.softmax(row_sharpness, -1)).sum(-1)
        ) / 2
        loss_neg = _masked_mean(-torch.log(1 - affinity), 1 - positive)
        return (loss_pos + loss_neg).mean()


class NCLoss(nn.Module):
    """L_nc: neighbourhood similarity-distribution consistency (docs/method.md, section 4).

    Rows are paired through G: student row i = q[b, z, i], teacher row i = k[b, z, j] with truth[b, i, j] = 1
    (G is one-to-one: mutual nearest matches); rows without a match are masked out (neither anchors nor
    neighbours). Then, per problem and matched row i,
        J_i = the k nearest matched teacher rows of teacher row i (cosine, itself excluded)
        p_i = softmax_{j in J_i} T_i.T_j / tau_t,   q_i = softmax_{j in J_i} S_i.S_j / tau_s
        L   = mean over the matched rows of all problems of KL(p_i || q_i)
    computed by ``neighborhood_consistency`` (teacher side without gradient).

    k must fit the matched rows: it is clamped to (fewest matched rows in a volume) - 1 for the batch (one
    host sync), and volumes with fewer than 2 matched rows are left out (all left out: the loss is 0).
    """

    def __init__(self, ops: str, k: int = 8, tau_s: float = 0.1, tau_t: float = 0.04):
        super().__init__()
        self.neighborhood_consistency = _kernel_op(ops, "neighborhood_consistency")
        self.k = check_int("k", k, 1)
        self.tau_s = check_positive("tau_s", tau_s)
        self.tau_t = check_positive("tau_t", tau_t)

    def forward(self, q: Tensor, k: Tensor, truth: Tensor) -> Tensor:
        """q, k (B, Z, N, d), truth (B, N, N) -> scalar."""
        _check_token_inputs(q, k, truth)
        B, Z, N, d = q.shape
        matched = truth > 0.5  # (B, N, N)
        valid = matched.any(-1)  # (B, N): source row i has a teacher partner
        partner = matched.to(torch.uint8).argmax(-1)  # (B, N): its column j (0 for unmatched rows, masked)
        teacher = k.gather(2, partner[:, None, :, None].expand(B, Z, N, d))  # teacher row i = k[b, z, j]

        n_matched = valid.sum(-1)  # (B,)
        fewest = int(n_matched.min())  # the one host sync: k must be an int
        if fewest < 2:  # rare: leave out the volumes with < 2 matches
            kept = n_matched >= 2
            q, teacher, valid, n_matched = q[kept], teacher[kept], valid[kept], n_matched[kept]
            if q.shape[0] == 0:
                return k.new_zeros(()) + q.sum() * 0.0
            fewest = int(n_matched.min())
        neighbours = min(self.k, fewest - 1)
        return self.neighborhood_consistency(
            q.reshape(-1, N, d),
            teacher.reshape(-1, N, d),
            k=neighbours,
            tau_s=self.tau_s,
            tau_t=self.tau_t,
            mask=valid[:, None].expand(-1, Z, N).reshape(-1, N),
        )


def _global_logits(
    query: Tensor, keys: Tensor, crop: Tensor, queue: Tensor, temperature: float
) -> tuple[Tensor, Tensor, Tensor]:
    """L_g's logits (B, 1 + n) / temperature (the positive first), the positives (B, d) and the n negatives
    (n, d) of query, keys (B, n_crops, d), the chosen crops (B,) and the queue (see GlobalLoss)."""
    B, n_crops, d = query.shape
    volume = torch.arange(B, device=query.device)
    anchor, positive = query[volume, crop], keys[volume, crop]  # (B, d)
    others = torch.arange(n_crops - 1, device=query.device).expand(B, -1)
    others = others + (others >= crop[:, None])  # (B, n_crops - 1): each volume's other crops, in order
    unchosen = keys.gather(1, others[..., None].expand(-1, -1, d))  # no host sync
    negatives = torch.cat([unchosen.flatten(0, 1), queue.to(keys.dtype)])  # (B*(n_crops-1)+queue, d)
    logits = torch.cat([(anchor * positive).sum(-1, keepdim=True), anchor @ negatives.T], 1) / temperature
    return logits, positive, negatives


def _global_loss(query: Tensor, keys: Tensor, crop: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """L_g (0-dim): the mean over volumes of the cross entropy of the logits against the positive."""
    logits = _global_logits(query, keys, crop, queue, temperature)[0]
    return F.cross_entropy(logits, logits.new_zeros(logits.shape[0], dtype=torch.long))


def _global_grad(
    query: Tensor, keys: Tensor, crop: Tensor, queue: Tensor, grad: Tensor, temperature: float
) -> Tensor:
    """dL_g/dquery (B, n_crops, d) given the upstream gradient grad (0-dim): only the chosen crops' rows,
    (softmax(logits) - [positive]) . [positive; negatives] * grad / (B temperature)."""
    B, n_crops, _ = query.shape
    logits, positive, negatives = _global_logits(query, keys, crop, queue, temperature)
    coef = logits.softmax(-1)
    coef[:, 0] -= 1
    grad_anchor = (coef[:, :1] * positive + coef[:, 1:] @ negatives) * (grad / (B * temperature))
    chosen = crop[:, None] == torch.arange(
        n_crops, device=crop.device
    )  # one-hot (F.one_hot checks on the host)
    return chosen[..., None] * grad_anchor[:, None, :]


class _GlobalClosedForm(torch.autograd.Function):
    """L_g (see GlobalLoss) with its gradient to the query in closed form, each direction one CUDA graph on
    GPUs (the keys and the queue are constants)."""

    @staticmethod
    def forward(ctx, query: Tensor, keys: Tensor, crop: Tensor, queue: Tensor, temperature: float) -> Tensor:
        """query, keys (B, n_crops, d), crop (B,) int64, queue (n, d) -> 0-dim loss."""
        ctx.save_for_backward(query, keys, crop, queue)
        ctx.temperature = temperature
        loss = functools.partial(_global_loss, temperature=temperature)
        inputs = (query, keys, crop, queue)
        return _replayed(f"l_g forward {temperature!r}", loss, inputs, query.new_empty(()))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
        query, keys, crop, queue = ctx.saved_tensors
        grad_query = functools.partial(_global_grad, temperature=ctx.temperature)
        inputs = (query, keys, crop, queue, grad)
        out = torch.empty_like(query)
        return _replayed(f"l_g backward {ctx.temperature!r}", grad_query, inputs, out), None, None, None, None


class GlobalLoss(nn.Module):
    """L_g: global InfoNCE with a FIFO queue (docs/method.md, section 5), as the official code computes it.

    Per volume b, with c_b a random crop (drawn from ``generator``):
        query      x_b  = query[b, c_b]                      (student, pooled source crop)
        positive   y_b  = keys[b, c_b]                       (teacher, pooled augmented view of the same crop)
        negatives       = keys[b', c] for every (b', c) with c != c_b'  (the other crops of every volume)
                          + the queue (queue_size past positive keys)
        L = mean_b cross_entropy([x_b.y_b, x_b.negatives] / temperature, target 0)
    Dot products of unnormalised embeddings (official); the keys are constants. After the loss, the positives
    enter the queue (``update_queue``). The queue starts as random unit rows (official).
    No kernel op in this term: "reference" is autograd through these formulas, "fused" the same value with
    the gradient in closed form (_GlobalClosedForm).
    """

    queue: Tensor
    queue_ptr: Tensor

    def __init__(self, ops: str, dim: int, temperature: float = 0.9, queue_size: int = 90):
        super().__init__()
        self.ops = check_choice("ops", ops, OPS)
        self.temperature = check_positive("temperature", temperature)
        self.queue_size = check_int("queue_size", queue_size, 0)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, check_int("dim", dim, 1)), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))  # next slot to overwrite

    def forward(self, query: Tensor, keys: Tensor, generator: torch.Generator) -> Tensor:
        """query (B, n_crops, d) student pooled source crops, keys (B, n_crops, d) teacher pooled augmented
        crops, generator draws the crop of each volume -> scalar. Updates the queue."""
        if query.dim() != 3 or keys.shape != query.shape or query.shape[-1] != self.queue.shape[-1]:
            raise ValueError(
                f"query and keys must be (B, n_crops, {self.queue.shape[-1]}) of one shape, "
                f"got {tuple(query.shape)} and {tuple(keys.shape)}"
            )
        B, n_crops, _ = query.shape
        keys = keys.detach()
        crop = torch.randint(n_crops, (B,), generator=generator, device=generator.device)
        if crop.device != query.device:  # pinned: a copy from pageable memory would wait for the GPU's queue
            crop = (crop.pin_memory() if query.is_cuda else crop).to(query.device, non_blocking=True)
        if self.ops == "fused":  # the queue is copied: update_queue changes it in place before the backward
            loss = _GlobalClosedForm.apply(query, keys, crop, self.queue.clone(), self.temperature)
            positive = keys[torch.arange(B, device=keys.device), crop]
        else:
            logits, positive, _ = _global_logits(query, keys, crop, self.queue, self.temperature)
            loss = F.cross_entropy(logits, logits.new_zeros(B, dtype=torch.long))
        self.update_queue(positive)
        return loss

    @torch.no_grad()
    def update_queue(self, keys: Tensor) -> None:
        """FIFO: write keys (n, d) into the queue from queue_ptr on (wrapping around), advance the pointer."""
        if self.queue_size == 0:
            return
        keys = keys.detach()[-self.queue_size :].to(self.queue.dtype)
        slots = (self.queue_ptr + torch.arange(keys.shape[0], device=self.queue.device)) % self.queue_size
        self.queue[slots] = keys
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % self.queue_size)
