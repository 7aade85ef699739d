"""Public similarity ops: cosine similarity, k-nearest neighbours, neighbourhood consistency (L_nc).

Each function checks its inputs, resolves the backend and runs the reference in
``s2dc_kernels.reference.similarity`` ("torch") or, for knn, the fused kernel of the compiled extension
("cpp": ``torch.ops.s2dc_C.knn_forward``, score tiles merged into running top-k lists, no N x M matrix).
Inputs are (B, N, D) batches of row vectors or single (N, D) problems; outputs keep the rank. Empty
batches and non-contiguous inputs are fine.
"""

from __future__ import annotations

import torch

from s2dc_kernels._utils import (
    check_choice,
    check_int,
    check_positive,
    check_same_device,
    check_tensor,
    check_values,
    extension,
    resolve_backend,
)
from s2dc_kernels.reference import similarity as reference

METRICS = ("cosine", "dot", "l2")
SUPPORTED_BACKENDS = ("torch",)  # cosine_similarity, neighborhood_consistency
KNN_BACKENDS = ("torch", "cpp")


def _check_pair(x: object, y: object) -> tuple[torch.Tensor, torch.Tensor | None, torch.device]:
    """Check x (B, N, D) or (N, D) and y None or (B, M, D) / (M, D) like x; return them and their device."""
    x = check_tensor("x", x, (2, 3))
    if y is None:
        return x, None, x.device
    y = check_tensor("y", y, (x.dim(),))
    device = check_same_device(x=x, y=y)
    if y.dtype != x.dtype:
        raise ValueError(f"x and y must have the same dtype, got x {x.dtype} and y {y.dtype}")
    if y.shape[-1] != x.shape[-1]:
        raise ValueError(
            f"y must have the feature dimension of x, got x {tuple(x.shape)} and y {tuple(y.shape)}"
        )
    if x.dim() == 3 and y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have the batch size of x, got x {tuple(x.shape)} and y {tuple(y.shape)}")
    return x, y, device


def cosine_similarity(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Temperature-scaled cosine similarity of every row of x with every row of y.

    S[b, i, j] = <x_bi / |x_bi|, y_bj / |y_bj|> / temperature   (norms clamped at 1e-12, so a zero row
    scores 0 against everything).

    Args:
        x: (B, N, D) or (N, D) floating tensor.
        y: (B, M, D) or (M, D), same rank, dtype, device and D as x (same B too); None means x.
        temperature: positive divisor.
        backend: "auto" or "torch" (the only backend of this op).

    Returns:
        (B, N, M) or (N, M) tensor in x's dtype.
    """
    x, y, device = _check_pair(x, y)
    temperature = check_positive("temperature", temperature)
    resolve_backend(backend, op="cosine_similarity", device=device, supported=SUPPORTED_BACKENDS)
    return reference.cosine_similarity(x, y, temperature=temperature)


def knn(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    k: int,
    metric: str = "cosine",
    exclude_self: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest rows of y for each row of x, best first.

    metric "cosine": largest <x_i, y_j> / (|x_i| |y_j|); "dot": largest <x_i, y_j>;
    "l2": smallest |x_i - y_j| (Euclidean distance, not squared). Ties are broken arbitrarily.
    The values are differentiable in x and y (through the k chosen pairs; the l2 gradient at
    distance 0 is 0); the indices are not.

    Args:
        x: (B, N, D) or (N, D) queries.
        y: (B, M, D) or (M, D) candidates, same rank, dtype, device, D (and B) as x; None means x.
        k: number of neighbours, 1 <= k <= M (M - 1 with exclude_self).
        metric: "cosine", "dot" or "l2".
        exclude_self: never return j = i for query i (for y None, or y with rows paired to x's:
            then y must have N rows).
        backend: "auto", "torch" (the reference: the (B, N, M) score matrix) or "cpp" (CPU tensors, the
            compiled extension: memory O(B N k) plus a bounded tile per thread; l2 neighbours are ranked by
            the GEMM expansion of the distance, so pairs whose distances differ by rounding may swap).

    Returns:
        values (B, N, k) or (N, k) in x's dtype, and int64 indices into y's rows of the same shape.
    """
    x, y, device = _check_pair(x, y)
    metric = check_choice("metric", metric, METRICS)
    if not isinstance(exclude_self, bool):
        raise TypeError(f"exclude_self must be a bool, got {type(exclude_self).__name__}")
    n, m = x.shape[-2], (x if y is None else y).shape[-2]
    if exclude_self and m != n:
        raise ValueError(f"exclude_self=True needs y with as many rows as x (pairs (i, i)), got N={n}, M={m}")
    k = check_int("k", k, 1)
    available = m - exclude_self
    if k > available:
        what = f"M - 1 = {available} with exclude_self" if exclude_self else f"M = {m}"
        raise ValueError(f"k must be at most the number of candidate neighbours ({what}), got {k}")
    backend = resolve_backend(backend, op="knn", device=device, supported=KNN_BACKENDS)
    if backend == "torch":
        return reference.knn(x, y, k=k, metric=metric, exclude_self=exclude_self)
    return _knn_cpp(x, y, k=k, metric=metric, exclude_self=exclude_self)


@torch.library.custom_op("s2dc::knn_select", mutates_args=())
def knn_select(
    x: torch.Tensor, y: torch.Tensor | None, k: int, metric: int, exclude_self: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused CPU kernel: (values, int64 indices), (B, N, k) each, best first; y None searches x itself
    (the kernel then computes only the upper triangle of the symmetric score matrix). No autograd: the
    differentiable values are recomputed from the chosen pairs by the caller."""
    extension()  # registers torch.ops.s2dc_C
    return tuple(torch.ops.s2dc_C.knn_forward(x, x if y is None else y, k, metric, exclude_self))


@knn_select.register_fake
def _(x, y, k, metric, exclude_self):
    return x.new_empty(*x.shape[:2], k), x.new_empty(*x.shape[:2], k, dtype=torch.int64)


def _knn_cpp(
    x: torch.Tensor, y: torch.Tensor | None, *, k: int, metric: str, exclude_self: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """knn on the "cpp" backend: indices (and values) from the fused kernel; differentiable values recomputed
    from the chosen pairs (reference.knn_values) when x or y requires grad."""
    batched = x.dim() == 3
    x3 = (x if batched else x.unsqueeze(0)).detach()
    y3 = None if y is None else (y if batched else y.unsqueeze(0)).detach()
    values, indices = knn_select(x3, y3, k, METRICS.index(metric), exclude_self)
    if not batched:
        values, indices = values.squeeze(0), indices.squeeze(0)
    if torch.is_grad_enabled() and (x.requires_grad or (y is not None and y.requires_grad)):
        values = reference.knn_values(x, y, indices, metric)
    return values, indices


def neighborhood_consistency(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    k: int = 8,
    tau_s: float = 0.1,
    tau_t: float = 0.04,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Neighbourhood similarity-distribution consistency L_nc (docs/method.md, section 4).

    Rows of student S and teacher T are paired patches of B independent problems. For each problem and
    each valid patch i (mask True):
        J_i    = the k valid teacher patches j != i with the largest cos(T_i, T_j)
        p_i(j) = softmax_{j in J_i} cos(T_i, T_j) / tau_t      (teacher: no gradient)
        q_i(j) = softmax_{j in J_i} cos(S_i, S_j) / tau_s
        L      = mean over the valid patches of all problems of KL(p_i || q_i)
               = sum_j p_i(j) (log p_i(j) - log q_i(j))
    Invalid patches are neither anchors nor neighbours. An empty batch gives 0.

    Args:
        student: (B, N, D) or (N, D) floating tensor; receives the gradient.
        teacher: same shape and device as student; treated as a constant.
        k: neighbours per patch, 1 <= k <= (fewest valid patches in a problem) - 1.
        tau_s, tau_t: positive student and teacher temperatures.
        mask: None (all patches valid) or a bool tensor of shape (B, N) / (N,), True = matched patch.
        backend: "auto" or "torch" (the only backend of this op).

    Returns:
        0-dim tensor (the loss).
    """
    student = check_tensor("student", student, (2, 3))
    teacher = check_tensor("teacher", teacher, (2, 3))
    if teacher.shape != student.shape:
        raise ValueError(
            "student and teacher must have the same shape, "
            f"got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if mask is not None and not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    device = check_same_device(student=student, teacher=teacher, mask=mask)
    tau_s = check_positive("tau_s", tau_s)
    tau_t = check_positive("tau_t", tau_t)
    k = check_int("k", k, 1)
    problems = student.shape[:-1]  # (B, N) or (N,)
    fewest_valid = problems[-1]  # N bounds k even for an empty batch (topk needs k <= N - 1)
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor, got dtype {mask.dtype}")
        if mask.shape != problems:
            raise ValueError(
                f"mask must have shape {tuple(problems)} (student without D), got {tuple(mask.shape)}"
            )
        # Data-dependent bound (one host sync), checked together with the NaN/inf scans.
        if mask.numel() and check_values():
            fewest_valid = int(mask.sum(-1).min())
    if k > fewest_valid - 1:
        raise ValueError(
            f"k must be at most the fewest valid patches in a problem minus one ({fewest_valid} - 1), got {k}"
        )
    resolve_backend(backend, op="neighborhood_consistency", device=device, supported=SUPPORTED_BACKENDS)
    return reference.neighborhood_consistency(student, teacher, k=k, tau_s=tau_s, tau_t=tau_t, mask=mask)
