"""Neighbourhood-consistency loss L_nc of S2DC in Triton: fused forward and student backward.

One problem of the batch: student rows S (N, D), teacher rows T (N, D), valid patches m (N,). For each
valid i:
    J_i    = the k valid j != i of largest cos(T_i, T_j)     (ties: the smaller j)
    p_i(j) = softmax_{j in J_i} cos(T_i, T_j) / tau_t,   q_i(j) = softmax_{j in J_i} cos(S_i, S_j) / tau_s
    KL_i   = sum_{j in J_i} p_i(j) (log p_i(j) - log q_i(j)),   L = sum_i KL_i / (number of valid patches)
Backward, with c_ij = dL/dKL (q_i(j) - p_i(j)) / tau_s on the chosen pairs (0 elsewhere), A = C + C^T and unit
rows u = S / max(|S|, 1e-12):  G = dL/du = A u,  dL/dS_i = (G_i - u_i <u_i, G_i>) / |S_i|  (G_i / 1e-12
where the norm is clamped), and <u_i, G_i> = sum_j A_ij cos(S_i, S_j).

Design: grid (B, cdiv(N, BLOCK_I)) for both kernels; one program holds BLOCK_I rows of a problem against all
its N rows (BLOCK_N = next power of two >= N, so N is bounded by registers and shared memory: N <= 512).
Forward: a pass over D in BLOCK_D chunks per input computes the Gram blocks T_I T^T and S_I S^T with tl.dot
(fp32 in IEEE precision, not TF32: the neighbour ranking must match the reference) and the squared norms of
the rows from the same chunks; then k rounds of a row max pick J_i (no sort), and the two softmaxes and KL are
masked row reductions over the BLOCK_I x BLOCK_N tile. Writes per row KL_i, the neighbours and the weights
q - p (B, N, k); the loss is the sum of KL_i in the launcher (deterministic, no atomics).
Backward: the dense tile A[I, :] is built from the saved (neighbours, weights) of rows I (C) and of all rows
(C^T, pairs pointing into I); one pass over D computes S_I S^T and the norms (for <u_i, G_i>), a second pass
G = (A / |S_j|) S chunk by chunk with tl.dot and writes dL/dS directly (no atomics, no N x N x D temporary).
Traffic per program: T and S of the problem once (forward), S twice (backward), all from L2 (a problem is
N D elements); outputs O(N k) per problem besides dL/dS.

tau_s and tau_t reach the kernels as 1 / tau, as the int64 bit pattern of the Python float (Triton passes
Python floats as fp32, which would round them for float64 inputs); dL/dKL reaches the backward as a tensor
(no host synchronisation).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import float_bits, float_from_bits

MAX_N = 512  # rows of a problem held by one program: BLOCK_I x next_pow2(N) tiles in registers
NORM_EPS = 1e-12  # F.normalize's clamp of the norm


@triton.jit
def _gram_block(
    X_ptr,
    rows,
    row_mask,
    cols,
    col_mask,
    D,
    BLOCK_I: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """X_I X^T (BLOCK_I, BLOCK_N) and the squared norms of the rows X_I and X, from one pass over D."""
    dtype = X_ptr.dtype.element_ty
    gram = tl.zeros([BLOCK_I, BLOCK_N], dtype)
    sq_i = tl.zeros([BLOCK_I], dtype)
    sq_j = tl.zeros([BLOCK_N], dtype)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_mask = dd < D
        x_i = tl.load(
            X_ptr + rows[:, None] * D + dd[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0
        )
        x_j = tl.load(
            X_ptr + cols[:, None] * D + dd[None, :], mask=col_mask[:, None] & d_mask[None, :], other=0.0
        )
        gram += tl.dot(x_i, tl.trans(x_j), input_precision="ieee")
        sq_i += tl.sum(x_i * x_i, 1)
        sq_j += tl.sum(x_j * x_j, 1)
    return gram, sq_i, sq_j


@triton.jit
def _inverse_norm(sq):
    return 1.0 / tl.maximum(tl.sqrt(sq), 1e-12)


@triton.jit(do_not_specialize=["N", "D", "k", "inv_tau_s_bits", "inv_tau_t_bits"])
def neighborhood_forward_kernel(
    S_ptr,
    T_ptr,
    mask_ptr,
    kl_ptr,
    neighbours_ptr,
    weights_ptr,
    N,
    D,
    k,
    inv_tau_s_bits,
    inv_tau_t_bits,
    HAS_MASK: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Rows [pid_i BLOCK_I, ...) of problem pid_b: KL_i (B, N), neighbours and weights q - p (B, N, k)."""
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < N
    col_mask = cols < N
    S_b = S_ptr + b * N * D
    T_b = T_ptr + b * N * D
    dtype = S_ptr.dtype.element_ty
    if HAS_MASK:
        row_valid = tl.load(mask_ptr + b * N + rows, mask=row_mask, other=0) != 0
        col_valid = tl.load(mask_ptr + b * N + cols, mask=col_mask, other=0) != 0
    else:
        row_valid = row_mask
        col_valid = col_mask

    t_gram, t_sq_i, t_sq_j = _gram_block(T_b, rows, row_mask, cols, col_mask, D, BLOCK_I, BLOCK_N, BLOCK_D)
    s_gram, s_sq_i, s_sq_j = _gram_block(S_b, rows, row_mask, cols, col_mask, D, BLOCK_I, BLOCK_N, BLOCK_D)
    t_cos = t_gram * _inverse_norm(t_sq_i)[:, None] * _inverse_norm(t_sq_j)[None, :]
    s_cos = s_gram * _inverse_norm(s_sq_i)[:, None] * _inverse_norm(s_sq_j)[None, :]

    # J_i by k rounds of a row max over the remaining candidates (valid, j != i).
    candidate = col_valid[None, :] & (cols[None, :] != rows[:, None])
    score = tl.where(candidate, t_cos, float("-inf"))
    slot_of = tl.full([BLOCK_I, BLOCK_N], -1, tl.int32)  # the slot of each chosen column, -1 elsewhere
    row_out = (b * N + rows) * k
    for slot in range(k):
        best = tl.max(score, 1)
        found = best > float("-inf")
        best_col = tl.min(tl.where(score == best[:, None], cols[None, :], BLOCK_N), 1)
        hit = (cols[None, :] == best_col[:, None]) & found[:, None]
        slot_of = tl.where(hit, slot, slot_of)
        score = tl.where(hit, float("-inf"), score)
        out_col = tl.where(found & row_valid, best_col, -1).to(tl.int64)
        tl.store(neighbours_ptr + row_out + slot, out_col, mask=row_mask)

    selected = slot_of >= 0

    # Softmaxes over J_i in the log domain, KL and the weights q - p.
    inv_tau_s = float_from_bits(inv_tau_s_bits).to(dtype)
    inv_tau_t = float_from_bits(inv_tau_t_bits).to(dtype)
    t_logits = tl.where(selected, t_cos * inv_tau_t, float("-inf"))
    s_logits = tl.where(selected, s_cos * inv_tau_s, float("-inf"))
    t_max = tl.max(t_logits, 1)
    s_max = tl.max(s_logits, 1)
    t_lse = t_max + tl.log(tl.sum(tl.exp(t_logits - t_max[:, None]), 1))
    s_lse = s_max + tl.log(tl.sum(tl.exp(s_logits - s_max[:, None]), 1))
    log_p = tl.where(selected, t_logits - t_lse[:, None], 0.0)
    log_q = tl.where(selected, s_logits - s_lse[:, None], 0.0)
    p = tl.where(selected, tl.exp(log_p), 0.0)
    kl = tl.sum(p * (log_p - log_q), 1)
    complete = tl.sum(selected.to(tl.int32), 1) == k  # fewer than k valid candidates: NaN, as the reference
    kl = tl.where(complete, kl, float("nan"))
    tl.store(kl_ptr + b * N + rows, tl.where(row_valid, kl, 0.0), mask=row_mask)
    weight = tl.where(selected & row_valid[:, None], tl.exp(log_q) - p, 0.0)

    for slot in range(k):
        slot_weight = tl.sum(tl.where(slot_of == slot, weight, 0.0), 1)
        tl.store(weights_ptr + row_out + slot, slot_weight, mask=row_mask)


@triton.jit(do_not_specialize=["N", "D", "k"])
def neighborhood_backward_kernel(
    S_ptr,
    neighbours_ptr,
    weights_ptr,
    scale_ptr,
    grad_ptr,
    N,
    D,
    k,
    BLOCK_I: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dL/dS of rows [pid_i BLOCK_I, ...) of problem pid_b; scale_ptr holds dL/dKL / tau_s (one element)."""
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < N
    col_mask = cols < N
    S_b = S_ptr + b * N * D
    dtype = S_ptr.dtype.element_ty

    # A[I, :] = C[I, :] + C[:, I]^T from the saved slots (index -1: no pair).
    pairs = tl.zeros([BLOCK_I, BLOCK_N], dtype)
    for slot in range(k):
        own = tl.load(neighbours_ptr + (b * N + rows) * k + slot, mask=row_mask, other=-1)
        own_w = tl.load(weights_ptr + (b * N + rows) * k + slot, mask=row_mask, other=0.0)
        pairs += tl.where(cols[None, :] == own[:, None], own_w[:, None], 0.0)
        incoming = tl.load(neighbours_ptr + (b * N + cols) * k + slot, mask=col_mask, other=-1)
        incoming_w = tl.load(weights_ptr + (b * N + cols) * k + slot, mask=col_mask, other=0.0)
        pairs += tl.where(rows[:, None] == incoming[None, :], incoming_w[None, :], 0.0)
    pairs = pairs * tl.load(scale_ptr).to(dtype)

    gram, sq_i, sq_j = _gram_block(S_b, rows, row_mask, cols, col_mask, D, BLOCK_I, BLOCK_N, BLOCK_D)
    inv_i = _inverse_norm(sq_i)
    inv_j = _inverse_norm(sq_j)
    pairs = pairs * inv_j[None, :]  # G = pairs @ S
    # <u_i, G_i> = sum_j A_ij cos(S_i, S_j); no radial part where the norm is clamped.
    radial = tl.sum(pairs * gram, 1) * inv_i * inv_i * inv_i
    radial = tl.where(inv_i * 1e-12 < 1.0, radial, 0.0)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_mask = dd < D
        s_j = tl.load(
            S_b + cols[:, None] * D + dd[None, :], mask=col_mask[:, None] & d_mask[None, :], other=0.0
        )
        i_mask = row_mask[:, None] & d_mask[None, :]
        s_i = tl.load(S_b + rows[:, None] * D + dd[None, :], mask=i_mask, other=0.0)
        g = tl.dot(pairs, s_j, input_precision="ieee")
        grad = inv_i[:, None] * g - radial[:, None] * s_i
        tl.store(grad_ptr + b * N * D + rows[:, None] * D + dd[None, :], grad, mask=i_mask)


def _blocks(N: int, D: int) -> tuple[int, int, int, int]:
    """(BLOCK_I, BLOCK_N, BLOCK_D, num_warps) for problems of N rows of dimension D."""
    block_n = max(16, triton.next_power_of_2(N))
    block_d = min(32 if block_n <= 256 else 16, max(16, triton.next_power_of_2(D)))
    return 16, block_n, block_d, 4 if block_n <= 256 else 8


def _check(student: torch.Tensor, mask: torch.Tensor | None) -> None:
    if student.dim() != 3:
        raise ValueError(f"student must be (B, N, D), got {tuple(student.shape)}")
    if student.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"the Triton kernels take float32 or float64, got {student.dtype}")
    if student.shape[1] > MAX_N:
        raise ValueError(
            f"the Triton kernels hold a problem's rows in registers: N <= {MAX_N}, got {student.shape[1]}"
        )
    if mask is not None and (mask.dtype != torch.bool or mask.shape != student.shape[:2]):
        raise ValueError(f"mask must be (B, N) bool, got {tuple(mask.shape)} {mask.dtype}")


def _valid_count(mask: torch.Tensor | None, student: torch.Tensor) -> torch.Tensor:
    """Number of valid patches (at least 1), a 0-dim tensor in student's dtype (no host synchronisation)."""
    if mask is None:
        return student.new_full((), float(max(student.shape[0] * student.shape[1], 1)))
    return mask.sum().clamp_min(1).to(student.dtype)


def neighborhood_forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor | None,
    k: int,
    tau_s: float,
    tau_t: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L_nc (0-dim), neighbours (B, N, k) int64 (-1 for invalid patches) and weights q - p (B, N, k).

    student, teacher (B, N, D) float32 / float64 on one device, mask None or (B, N) bool, 1 <= k <= N - 1.
    """
    _check(student, mask)
    if teacher.shape != student.shape or teacher.dtype != student.dtype:
        raise ValueError("teacher must have student's shape and dtype")
    B, N, D = student.shape
    if not 1 <= k <= max(N - 1, 1):
        raise ValueError(f"k must be in [1, N - 1 = {N - 1}], got {k}")
    student, teacher = student.detach().contiguous(), teacher.detach().contiguous()
    kl = student.new_empty(B, N)
    neighbours = student.new_empty(B, N, k, dtype=torch.int64)
    weights = student.new_empty(B, N, k)
    if B * N == 0:
        return student.new_zeros(()), neighbours, weights
    block_i, block_n, block_d, num_warps = _blocks(N, D)
    mask_arg = kl if mask is None else mask.contiguous().view(torch.uint8)
    neighborhood_forward_kernel[(B, triton.cdiv(N, block_i))](
        student,
        teacher,
        mask_arg,
        kl,
        neighbours,
        weights,
        N,
        D,
        k,
        float_bits(1.0 / tau_s),
        float_bits(1.0 / tau_t),
        HAS_MASK=mask is not None,
        BLOCK_I=block_i,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return kl.sum() / _valid_count(mask, student), neighbours, weights


def neighborhood_backward(
    student: torch.Tensor,
    mask: torch.Tensor | None,
    neighbours: torch.Tensor,
    weights: torch.Tensor,
    grad_loss: torch.Tensor,
    tau_s: float,
) -> torch.Tensor:
    """dL/dstudent (B, N, D) from the forward's neighbours and weights (B, N, k) and dL/dloss (0-dim)."""
    _check(student, mask)
    B, N, D = student.shape
    k = neighbours.shape[-1]
    if neighbours.shape != (B, N, k) or weights.shape != neighbours.shape:
        raise ValueError("neighbours and weights must be (B, N, k) with student's B and N")
    student = student.detach().contiguous()
    grad = torch.empty_like(student)
    if B * N == 0:
        return grad
    scale = (grad_loss.reshape(()).to(student.dtype) / _valid_count(mask, student) / tau_s).reshape(1)
    block_i, block_n, block_d, num_warps = _blocks(N, D)
    neighborhood_backward_kernel[(B, triton.cdiv(N, block_i))](
        student,
        neighbours.contiguous(),
        weights.to(student.dtype).contiguous(),
        scale,
        grad,
        N,
        D,
        k,
        BLOCK_I=block_i,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return grad
