"""Pure-PyTorch references for the similarity ops: cosine similarity, k-NN, neighbourhood consistency.

Short and plainly correct; no input checks (the public functions in ``s2dc_kernels.similarity`` do
them). Shapes: x (B, N, D) or (N, D), y (B, M, D) or (M, D), same rank; outputs keep the rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_similarity(
    x: torch.Tensor, y: torch.Tensor | None = None, *, temperature: float = 1.0
) -> torch.Tensor:
    """S_ij = <x_i / |x_i|, y_j / |y_j|> / temperature, (B, N, M) or (N, M); y None means x.

    Rows are normalised with F.normalize (eps 1e-12), so a zero row has similarity 0 with everything.
    """
    x_unit = F.normalize(x, dim=-1)
    y_unit = x_unit if y is None else F.normalize(y, dim=-1)
    return x_unit @ y_unit.transpose(-1, -2) / temperature


def _gather_rows(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """rows (B, M, D) or (M, D), index (B, N, k) or (N, k) -> rows[b, index[b, i, l]] (B, N, k, D).

    Advanced indexing, so the backward is an index_put into a (B, M, D) gradient (no (B, N, M, D) buffer).
    """
    if rows.dim() == 2:
        return rows[index]
    batch = torch.arange(rows.shape[0], device=rows.device)[:, None, None]
    return rows[batch, index]


def _safe_sqrt(sq: torch.Tensor) -> torch.Tensor:
    """sqrt(sq) with gradient 0 (not inf * 0 = NaN) where sq == 0."""
    positive = sq > 0
    return torch.where(positive, torch.where(positive, sq, 1.0).sqrt(), 0.0)


def knn_values(
    x: torch.Tensor, y: torch.Tensor | None, indices: torch.Tensor, metric: str = "cosine"
) -> torch.Tensor:
    """The values of the chosen pairs (x_i, y_indices[i, l]), differentiable in x and y, (B, N, k) / (N, k).

    metric "cosine": <x_i / |x_i|, y_j / |y_j|> (F.normalize, eps 1e-12); "dot": <x_i, y_j>; "l2": |x_i - y_j|
    from the differences (exact for close pairs far from 0; gradient 0 at distance 0). y None means x.
    Gradients reach x and y through the k chosen pairs only. Memory: the (B, N, k, D) gathered rows.
    """
    y_rows = x if y is None else y
    if metric == "cosine":
        x_rows, y_rows = F.normalize(x, dim=-1), F.normalize(y_rows, dim=-1)
    else:
        x_rows = x
    chosen = _gather_rows(y_rows, indices)  # (B, N, k, D)
    if metric == "l2":
        return _safe_sqrt((x_rows.unsqueeze(-2) - chosen).square().sum(-1))
    return (x_rows.unsqueeze(-2) * chosen).sum(-1)


def knn(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    k: int,
    metric: str = "cosine",
    exclude_self: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best rows of y for each row of x, best first: (values, indices), each (B, N, k) / (N, k).

    metric "cosine": largest <x_i, y_j> / (|x_i| |y_j|); "dot": largest <x_i, y_j>;
    "l2": smallest |x_i - y_j|.
    exclude_self drops the pairs (i, i). The full score matrix (no grad) only picks the indices; the
    values are recomputed from the gathered rows (knn_values), so gradients reach x and y through the
    k chosen pairs only, and the l2 gradient at distance 0 is 0. Memory: the (B, N, M) score matrix and
    the (B, N, k, D) gathered rows.
    """
    y_rows = x if y is None else y
    largest = metric != "l2"
    with torch.no_grad():
        if metric == "cosine":
            scores = cosine_similarity(x, y)
        elif metric == "dot":
            scores = x @ y_rows.transpose(-1, -2)
        else:  # direct differences: |x|^2 + |y|^2 - 2 x.y cancels for tight clusters far from 0
            # CPU cdist has no half kernel: float32 distances there
            upcast = x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16)
            pair = (x.float(), y_rows.float()) if upcast else (x, y_rows)
            scores = torch.cdist(*pair, compute_mode="donot_use_mm_for_euclid_dist")
        if exclude_self:
            diagonal = torch.eye(scores.shape[-2], scores.shape[-1], dtype=torch.bool, device=scores.device)
            scores = scores.masked_fill(diagonal, float("-inf") if largest else float("inf"))
        indices = scores.topk(k, dim=-1, largest=largest).indices
    return knn_values(x, y, indices, metric), indices


def neighborhood_consistency(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    k: int = 8,
    tau_s: float = 0.1,
    tau_t: float = 0.04,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over valid patches i of KL(p_i || q_i) on the teacher's k nearest valid neighbours J_i of i
    (exact ties of teacher similarity go to the smaller index).

    p_i = softmax_{j in J_i} cos(T_i, T_j) / tau_t (teacher detached), q_i = softmax_{j in J_i}
    cos(S_i, S_j) / tau_s; student, teacher (B, N, D) or (N, D), mask (B, N) or (N,) bool (None: all
    valid). Returns a scalar; 0 when there is no valid patch (empty batch).
    """
    teacher_sim = cosine_similarity(teacher.detach())  # (B, N, N)
    n = teacher_sim.shape[-1]
    excluded = torch.eye(n, dtype=torch.bool, device=teacher_sim.device)
    if mask is not None:
        excluded = excluded | ~mask.unsqueeze(-2)  # invalid patches are never neighbours
    ranked = teacher_sim.masked_fill(excluded, float("-inf"))
    top_values, top_index = ranked.topk(min(k + 1, n), dim=-1)
    teacher_top, neighbours = top_values[..., :k], top_index[..., :k]
    # Exact ties at the k-th place (e.g. identical background patches) go to the smaller index, as in the
    # fused kernels (torch.topk leaves their order unspecified): such rows take a stable sort's first k.
    if k < n:
        boundary_tie = top_values[..., k - 1] == top_values[..., k]
        if boundary_tie.any():
            by_index = ranked.sort(dim=-1, descending=True, stable=True).indices[..., :k]
            neighbours = torch.where(boundary_tie[..., None], by_index, neighbours)
            teacher_top = ranked.gather(-1, neighbours)
    student_top = cosine_similarity(student).gather(-1, neighbours)

    log_p = F.log_softmax(teacher_top / tau_t, dim=-1)
    log_q = F.log_softmax(student_top / tau_s, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (B, N)
    valid = torch.ones_like(kl, dtype=torch.bool) if mask is None else mask
    return torch.where(valid, kl, 0.0).sum() / valid.sum().clamp_min(1)
