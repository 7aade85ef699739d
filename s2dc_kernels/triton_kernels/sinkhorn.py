"""Log-domain Sinkhorn in Triton: the whole solve (forward) and its exact unrolled gradient (backward).

One problem of the batch, C (N, M), log-marginals log_a (N), log_b (M) (entries may be -inf), eps > 0,
potentials in cost units, from f = 0, g = 0, for t = 1..n_iters:
    f_i = eps * (log_a_i - LSE_j((g_j - C_ij) / eps))            # row update, uses g of iteration t-1
    g_j = eps * (log_b_j - LSE_i((f_i - C_ij) / eps))            # column update, uses the new f
with the optional stop (tol > 0, t > 1): when the row-marginal L1 error of iteration t-1,
sum_i |exp(f_i / eps + LSE_j((g_j - C_ij) / eps)) - a_i|, computed from the LSE of iteration t, is below tol,
the problem stops and keeps the potentials of iteration t-1.

Design (one launch per call, grid = (B,)): one program solves one problem through all its iterations, so no
host synchronisation happens inside the iteration loop and each problem stops on its own. Each half-step
streams C from global memory in BLOCK_N x BLOCK_M tiles with an online (running max, rescaled sum) LSE, so
any N, M works and a small problem stays in L1/L2 between iterations. f and g of iteration t live in the
history rows f_hist[t-1], g_hist[t-1] that the backward needs anyway; tl.debug_barrier() separates a pass
that writes them from the pass that reads them (threads of one program read what other threads wrote).

Exponentials are taken in base 2 with the scale log2(e) / eps folded into the one multiply per entry that
dividing by eps costs anyway: exp(x / eps) = exp2(x * log2(e) / eps). On NVIDIA GPUs tl.exp itself lowers to
a multiply by log2(e) followed by the ex2 instruction, so this saves one multiply per matrix entry.

eps (and tol) reach the kernels as the int64 bit pattern of the Python float: Triton passes Python floats
as fp32, which would round eps to about 1e-8 relative and spoil float64 solves.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .._utils import launch_graphs
from ._common import LOG2E, float_bits, float_from_bits


@triton.jit
def _row_block_lse2(
    C_ptr,
    g_ptr,
    g_valid,
    rows,
    row_mask,
    M,
    stride,
    scale,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    NEGATE: tl.constexpr,
):
    """Base-2 LSE_j((g_j - C_ij) * scale) for the rows ``rows`` (BLOCK_N,), streamed over column blocks of
    the M columns (C's rows ``stride`` entries apart).

    NEGATE: the matrix in memory holds -C (scores or logits), negated as it is read.

    g = 0 when ``g_valid`` is false (the zero g of iteration 0; ``g_ptr`` must still be readable).
    Online LSE: a running max m and a sum s rescaled by exp2(m_old - m_new) whenever the max grows; a max
    of -inf is shifted by 0 instead, so a row whose entries are all -inf ends with s = 0 and LSE = -inf,
    never NaN. Reads C[rows, :] and g once.
    """
    dtype = C_ptr.dtype.element_ty
    cols_in_block = tl.arange(0, BLOCK_M)
    run_max = tl.full([BLOCK_N], float("-inf"), dtype)
    run_sum = tl.zeros([BLOCK_N], dtype)
    for col_start in range(0, M, BLOCK_M):
        cols = col_start + cols_in_block
        col_mask = cols < M
        g = tl.load(g_ptr + cols, mask=col_mask, other=float("-inf"))
        g = tl.where(g_valid, g, tl.where(col_mask, 0.0, float("-inf")))
        mask = row_mask[:, None] & col_mask[None, :]
        cost = tl.load(C_ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0)
        if NEGATE:
            cost = -cost
        x = (g[None, :] - cost) * scale
        new_max = tl.maximum(run_max, tl.max(x, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp2(run_max - shift) + tl.sum(tl.exp2(x - shift[:, None]), axis=1)
        run_max = new_max
    return run_max + tl.log2(run_sum)


@triton.jit
def _col_block_lse2(
    C_ptr,
    f_ptr,
    cols,
    col_mask,
    N,
    stride,
    scale,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    NEGATE: tl.constexpr,
):
    """Base-2 LSE_i((f_i - C_ij) * scale) for the columns ``cols`` (BLOCK_M,), streamed over the N rows
    (``stride`` entries apart) in blocks.

    The same online LSE as ``_row_block_lse2``, transposed (and the same NEGATE). Reads C[:, cols] and f once.
    """
    dtype = C_ptr.dtype.element_ty
    rows_in_block = tl.arange(0, BLOCK_N)
    run_max = tl.full([BLOCK_M], float("-inf"), dtype)
    run_sum = tl.zeros([BLOCK_M], dtype)
    for row_start in range(0, N, BLOCK_N):
        rows = row_start + rows_in_block
        row_mask = rows < N
        f = tl.load(f_ptr + rows, mask=row_mask, other=float("-inf"))
        mask = row_mask[:, None] & col_mask[None, :]
        cost = tl.load(C_ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0)
        if NEGATE:
            cost = -cost
        x = (f[:, None] - cost) * scale
        new_max = tl.maximum(run_max, tl.max(x, axis=0))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp2(run_max - shift) + tl.sum(tl.exp2(x - shift[None, :]), axis=0)
        run_max = new_max
    return run_max + tl.log2(run_sum)


@triton.jit
def _row_update(
    C_ptr,
    log_a_ptr,
    f_old_ptr,
    g_old_ptr,
    f_new_ptr,
    t,
    rows,
    row_mask,
    M,
    eps,
    scale,
    CHECK_TOL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Row update of iteration t for ``rows``:
        f^t_i = eps * log_a_i - LSE2_j((g^{t-1}_j - C_ij) * scale) / scale  -> f_new.
    Returns |exp2(f^{t-1}_i * scale + lse2_i) - a_i| per row (the row-marginal error of iteration t-1, from
    the same LSE) with CHECK_TOL, zeros otherwise; 0 on rows past N. log_a_ptr, f_old_ptr, f_new_ptr point at
    the problem's rows, g_old_ptr at g^{t-1} (g = 0 is used at t = 1)."""
    lse2 = _row_block_lse2(C_ptr, g_old_ptr, t > 1, rows, row_mask, M, M, scale, BLOCK_N, BLOCK_M, False)
    log_a = tl.load(log_a_ptr + rows, mask=row_mask, other=0.0)
    err = tl.zeros([BLOCK_N], C_ptr.dtype.element_ty)
    if CHECK_TOL:
        f_old = tl.load(f_old_ptr + rows, mask=row_mask, other=0.0)
        err = tl.where(row_mask, tl.abs(tl.exp2(f_old * scale + lse2) - tl.exp(log_a)), 0.0)
    tl.store(f_new_ptr + rows, eps * log_a - lse2 * (1.0 / scale), mask=row_mask)
    return err


@triton.jit
def _col_update(
    C_ptr,
    log_b_ptr,
    f_new_ptr,
    g_new_ptr,
    cols,
    col_mask,
    N,
    M,
    eps,
    scale,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Column update with the f^t just written: g^t_j = eps * log_b_j - LSE2_i((f^t_i - C_ij) * scale) / scale
    -> g_new, for ``cols``."""
    lse2 = _col_block_lse2(C_ptr, f_new_ptr, cols, col_mask, N, M, scale, BLOCK_N, BLOCK_M, False)
    log_b = tl.load(log_b_ptr + cols, mask=col_mask, other=0.0)
    tl.store(g_new_ptr + cols, eps * log_b - lse2 * (1.0 / scale), mask=col_mask)


@triton.jit(do_not_specialize=["n_iters", "eps_bits", "scale_bits", "tol_bits"])
def sinkhorn_log_forward_kernel(
    C_ptr,
    log_a_ptr,
    log_b_ptr,
    f_ptr,
    g_ptr,
    f_hist_ptr,
    g_hist_ptr,
    n_done_ptr,
    N,
    M,
    n_iters,
    eps_bits,
    scale_bits,
    tol_bits,
    CHECK_TOL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Solve one problem (program b of grid (B,)) through all its Sinkhorn iterations.

    C (B, N, M), log_a (B, N), log_b (B, M) in; f (B, N), g (B, M), f_hist (B, n_iters, N),
    g_hist (B, n_iters, M), n_done (B,) int64 out. Iteration t:
        lse2_i = LSE2_j((g^{t-1}_j - C_ij) * scale)          scale = log2(e) / eps, g^0 = 0
        [CHECK_TOL, t > 1]  err = sum_i |exp2(f^{t-1}_i * scale + lse2_i) - a_i|;  stop if err < tol
        f^t_i = eps * log_a_i - lse2_i / scale               -> f_hist[t-1]
        g^t_j = eps * log_b_j - LSE2_i((f^t_i - C_ij) * scale) / scale   -> g_hist[t-1]
    Then f, g = f_hist[n_done-1], g_hist[n_done-1]. Memory traffic per iteration: C read twice
    (4 or 8 * N * M bytes: one row pass, one column pass), g read ceil(N / BLOCK_N) times and f read
    ceil(M / BLOCK_M) times, f and g written once; no N x M temporary.
    """
    dtype = C_ptr.dtype.element_ty
    eps = float_from_bits(eps_bits).to(dtype)
    scale = float_from_bits(scale_bits).to(dtype)
    tol = float_from_bits(tol_bits).to(dtype)

    problem = tl.program_id(0).to(tl.int64)
    C_ptr += problem * N * M
    log_a_ptr += problem * N
    log_b_ptr += problem * M
    f_ptr += problem * N
    g_ptr += problem * M
    f_hist_ptr += problem * n_iters * N
    g_hist_ptr += problem * n_iters * M
    rows_in_block = tl.arange(0, BLOCK_N)
    cols_in_block = tl.arange(0, BLOCK_M)

    n_done = tl.full([], 0, tl.int32)
    converged = tl.full([], 0, tl.int32)
    for t in range(1, n_iters + 1):
        if converged == 0:
            f_new_ptr = f_hist_ptr + (t - 1) * N
            # f^{t-1}, g^{t-1} (row 0 stands in at t = 1: g^0 = 0 is used instead, the error is not checked)
            f_old_ptr = f_hist_ptr + tl.maximum(t - 2, 0) * N
            g_old_ptr = g_hist_ptr + tl.maximum(t - 2, 0) * M
            # Row update; with CHECK_TOL the same LSE also gives the row marginal of iteration t-1.
            err_rows = tl.zeros([BLOCK_N], dtype)
            for row_start in range(0, N, BLOCK_N):
                rows = row_start + rows_in_block
                row_mask = rows < N
                err_rows += _row_update(
                    C_ptr, log_a_ptr, f_old_ptr, g_old_ptr, f_new_ptr, t, rows, row_mask, M, eps, scale,
                    CHECK_TOL, BLOCK_N, BLOCK_M,
                )  # fmt: skip
            tl.debug_barrier()
            if CHECK_TOL:
                converged = ((t > 1) & (tl.sum(err_rows, axis=0) < tol)).to(tl.int32)
            if converged == 0:
                # Column update with the f just written.
                g_new_ptr = g_hist_ptr + (t - 1) * M
                for col_start in range(0, M, BLOCK_M):
                    cols = col_start + cols_in_block
                    col_mask = cols < M
                    _col_update(
                        C_ptr, log_b_ptr, f_new_ptr, g_new_ptr, cols, col_mask, N, M, eps, scale,
                        BLOCK_N, BLOCK_M,
                    )  # fmt: skip
                tl.debug_barrier()
                n_done = t

    for row_start in range(0, N, BLOCK_N):
        rows = row_start + rows_in_block
        row_mask = rows < N
        tl.store(f_ptr + rows, tl.load(f_hist_ptr + (n_done - 1) * N + rows, mask=row_mask), mask=row_mask)
    for col_start in range(0, M, BLOCK_M):
        cols = col_start + cols_in_block
        col_mask = cols < M
        tl.store(g_ptr + cols, tl.load(g_hist_ptr + (n_done - 1) * M + cols, mask=col_mask), mask=col_mask)
    tl.store(n_done_ptr + problem, n_done.to(tl.int64))


@triton.jit
def _col_softmax_shift(g_ptr, log_b_ptr, cols, col_mask, eps):
    """v_j = g_j - eps * log_b_j = -eps * LSE_i((f_i - C_ij) / eps) for the columns ``cols``.

    Pc_ij = exp((f_i + v_j - C_ij) / eps) is then the column softmax of the g update. Zero-mass columns
    (log_b_j = -inf) and columns past M get v_j = -inf, so their weights are exactly 0, never NaN.
    """
    g = tl.load(g_ptr + cols, mask=col_mask, other=0.0)
    log_b = tl.load(log_b_ptr + cols, mask=col_mask, other=float("-inf"))
    return tl.where(log_b > float("-inf"), g - eps * log_b, float("-inf"))


@triton.jit
def _previous_g(g_prev_ptr, t, cols, col_mask):
    """g^{t-1} on ``cols`` (g^0 = 0 at t = 1; -inf past M, so those columns weigh 0)."""
    g_prev = tl.load(g_prev_ptr + cols, mask=col_mask, other=float("-inf"))
    return tl.where(t > 1, g_prev, tl.where(col_mask, 0.0, float("-inf")))


@triton.jit
def _subtract_g_adjoint(
    adj_f, C_ptr, g_t_ptr, log_b_ptr, adj_g_ptr, f_t, rows, row_mask, M, eps, scale, BLOCK_M: tl.constexpr
):
    """adj_f - sum_j G_j Pc_ij over all column blocks for ``rows``: the g^t update's contribution to F, with
    Pc_ij = exp2((f^t_i + v_j - C_ij) * scale) (v from _col_softmax_shift) and G = adj_g."""
    for col_start in range(0, M, BLOCK_M):
        cols = col_start + tl.arange(0, BLOCK_M)
        col_mask = cols < M
        v = _col_softmax_shift(g_t_ptr, log_b_ptr, cols, col_mask, eps)
        adj_g = tl.load(adj_g_ptr + cols, mask=col_mask, other=0.0)
        cost = tl.load(
            C_ptr + rows[:, None] * M + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0
        )
        adj_f -= tl.sum(adj_g[None, :] * tl.exp2((f_t[:, None] + v[None, :] - cost) * scale), axis=1)
    return adj_f


@triton.jit
def _grad_cost_tile(
    C_ptr, grad_C_ptr, rows, cols, row_mask, col_mask, M, f_t, u, adj_f, v, g_prev, adj_g, scale
):
    """One (rows, cols) tile of a backward step with F complete:
        grad_C_ij += G_j Pc_ij + F_i Pr_ij,   Pc_ij = exp2((f^t_i + v_j - C_ij) s),
        Pr_ij = exp2((u_i + g^{t-1}_j - C_ij) s);
    returns the tile's sum_i F_i Pr_ij per column (G' of g^{t-1} is minus its sum over all rows)."""
    tile_mask = row_mask[:, None] & col_mask[None, :]
    tile_offsets = rows[:, None] * M + cols[None, :]
    cost = tl.load(C_ptr + tile_offsets, mask=tile_mask, other=0.0)
    p_col = tl.exp2((f_t[:, None] + v[None, :] - cost) * scale)
    p_row = tl.exp2((u[:, None] + g_prev[None, :] - cost) * scale)
    grad_cost = tl.load(grad_C_ptr + tile_offsets, mask=tile_mask, other=0.0)
    grad_cost += adj_g[None, :] * p_col + adj_f[:, None] * p_row
    tl.store(grad_C_ptr + tile_offsets, grad_cost, mask=tile_mask)
    return tl.sum(adj_f[:, None] * p_row, axis=0)


@triton.jit(do_not_specialize=["n_iters", "eps_bits", "scale_bits"])
def sinkhorn_log_backward_kernel(
    C_ptr,
    log_a_ptr,
    log_b_ptr,
    f_hist_ptr,
    g_hist_ptr,
    n_done_ptr,
    grad_f_ptr,
    adj_g_ptr,
    grad_C_ptr,
    grad_log_a_ptr,
    grad_log_b_ptr,
    N,
    M,
    n_iters,
    eps_bits,
    scale_bits,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Backpropagate through the n_done iterations of one problem (program b of grid (B,)).

    C (B, N, M), log_a (B, N), log_b (B, M), f_hist (B, n_iters, N), g_hist (B, n_iters, M), n_done (B,),
    grad_f (B, N) in; adj_g (B, 2, M) scratch holding grad_g in adj_g[:, 0] and zeros in adj_g[:, 1];
    grad_C (B, N, M), grad_log_a (B, N), grad_log_b (B, M) zero-initialised and accumulated. With
    adjoints F of f^t and G of g^t (F = grad_f, G = grad_g at t = n_done), for t = n_done down to 1:
        Pc_ij = exp((f^t_i + g^t_j - C_ij) / eps - log_b_j)       (softmax over i: g^t's LSE)
        Pr_ij = exp((f^t_i + g^{t-1}_j - C_ij) / eps - log_a_i)   (softmax over j: f^t's LSE; g^0 = 0)
        F_i -= sum_j G_j Pc_ij                      (dg^t_j / df^t_i = -Pc_ij)
        grad_C_ij += G_j Pc_ij + F_i Pr_ij          (dg^t_j / dC_ij = Pc_ij, df^t_i / dC_ij = Pr_ij)
        G'_j = -sum_i F_i Pr_ij                     (adjoint of g^{t-1}; df^t_i / dg^{t-1}_j = -Pr_ij)
        grad_log_a_i += eps F_i;  grad_log_b_j += eps G_j;  G = G', F = 0
    A row block finishes F_i over all columns (sweep 1), then updates its grad_C tiles and G' (sweep 2),
    so F never leaves registers; G and G' ping-pong in adj_g. Memory traffic per iteration: C read twice,
    grad_C read and written once (4 passes of N x M), G read 2 * ceil(N / BLOCK_N) times and G' read and
    written ceil(N / BLOCK_N) times; no N x M temporary beyond grad_C itself.
    """
    dtype = C_ptr.dtype.element_ty
    eps = float_from_bits(eps_bits).to(dtype)
    scale = float_from_bits(scale_bits).to(dtype)

    problem = tl.program_id(0).to(tl.int64)
    C_ptr += problem * N * M
    grad_C_ptr += problem * N * M
    log_a_ptr += problem * N
    grad_f_ptr += problem * N
    grad_log_a_ptr += problem * N
    log_b_ptr += problem * M
    grad_log_b_ptr += problem * M
    adj_g_ptr += problem * 2 * M
    f_hist_ptr += problem * n_iters * N
    g_hist_ptr += problem * n_iters * M
    rows_in_block = tl.arange(0, BLOCK_N)
    cols_in_block = tl.arange(0, BLOCK_M)

    n_done = tl.load(n_done_ptr + problem).to(tl.int32)
    for step in range(0, n_done):
        t = n_done - step
        adj_g_cur_ptr = adj_g_ptr + (step % 2) * M
        adj_g_new_ptr = adj_g_ptr + ((step + 1) % 2) * M
        f_t_ptr = f_hist_ptr + (t - 1) * N
        g_t_ptr = g_hist_ptr + (t - 1) * M
        g_prev_ptr = g_hist_ptr + tl.maximum(t - 2, 0) * M  # g^{t-1}; at t = 1 g^0 = 0 is used instead
        for row_start in range(0, N, BLOCK_N):
            rows = row_start + rows_in_block
            row_mask = rows < N
            f_t = tl.load(f_t_ptr + rows, mask=row_mask, other=float("-inf"))
            log_a = tl.load(log_a_ptr + rows, mask=row_mask, other=float("-inf"))
            # u_i = f_i - eps * log_a_i = -eps * LSE_j(...): Pr_ij = exp((u_i + g^{t-1}_j - C_ij) / eps);
            # -inf for zero-mass rows and rows past N (weights exactly 0).
            u = tl.where(log_a > float("-inf"), f_t - eps * log_a, float("-inf"))
            adj_f = tl.where(step == 0, tl.load(grad_f_ptr + rows, mask=row_mask, other=0.0), 0.0)

            # Sweep 1: the g^t update's contribution to F over all columns.
            adj_f = _subtract_g_adjoint(
                adj_f, C_ptr, g_t_ptr, log_b_ptr, adj_g_cur_ptr, f_t, rows, row_mask, M, eps, scale, BLOCK_M
            )

            # Sweep 2: grad_C tiles and the adjoint of g^{t-1}, with the complete F of this row block.
            for col_start in range(0, M, BLOCK_M):
                cols = col_start + cols_in_block
                col_mask = cols < M
                v = _col_softmax_shift(g_t_ptr, log_b_ptr, cols, col_mask, eps)
                adj_g = tl.load(adj_g_cur_ptr + cols, mask=col_mask, other=0.0)
                g_prev = _previous_g(g_prev_ptr, t, cols, col_mask)
                adj_g_new = tl.load(adj_g_new_ptr + cols, mask=col_mask, other=0.0)
                adj_g_new -= _grad_cost_tile(
                    C_ptr,
                    grad_C_ptr,
                    rows,
                    cols,
                    row_mask,
                    col_mask,
                    M,
                    f_t,
                    u,
                    adj_f,
                    v,
                    g_prev,
                    adj_g,
                    scale,
                )
                tl.store(adj_g_new_ptr + cols, adj_g_new, mask=col_mask)

            grad_log_a = tl.load(grad_log_a_ptr + rows, mask=row_mask, other=0.0)
            tl.store(grad_log_a_ptr + rows, grad_log_a + eps * adj_f, mask=row_mask)
            tl.debug_barrier()  # the next row block reads G' that other threads wrote

        # G of g^t is complete: add it to grad_log_b and clear its buffer, which holds G' of the next step.
        for col_start in range(0, M, BLOCK_M):
            cols = col_start + cols_in_block
            col_mask = cols < M
            adj_g = tl.load(adj_g_cur_ptr + cols, mask=col_mask, other=0.0)
            grad_log_b = tl.load(grad_log_b_ptr + cols, mask=col_mask, other=0.0)
            tl.store(grad_log_b_ptr + cols, grad_log_b + eps * adj_g, mask=col_mask)
            tl.store(adj_g_cur_ptr + cols, tl.zeros([BLOCK_M], dtype), mask=col_mask)
        tl.debug_barrier()


# -------------------------------------------------------------- split regime: blocks of problems in the grid
# One launch per half-step: grid (B, row blocks) for the row update, (B, column blocks) for the column
# update, so a problem spreads over many multiprocessors (the one-program kernels above use one per problem,
# latency-bound past ~100 x 100). No host synchronisation: the tol check and the per-problem stop live in
# device buffers (err_part, stopped, n_done) that the next launch reads.


@triton.jit(do_not_specialize=["t", "n_iters", "eps_bits", "scale_bits"])
def sinkhorn_split_row_kernel(
    C_ptr,
    log_a_ptr,
    f_hist_ptr,
    g_hist_ptr,
    err_part_ptr,
    stopped_ptr,
    N,
    M,
    n_iters,
    t,
    eps_bits,
    scale_bits,
    CHECK_TOL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Row update of iteration t for rows block pid(1) of problem pid(0): f^t_i -> f_hist[t-1].

    With CHECK_TOL, also this block's share of the row-marginal error of iteration t-1 (from the same LSE)
    -> err_part[b, block]; a stopped problem is skipped. Reads BLOCK_N x M of C and g^{t-1} once.
    """
    dtype = C_ptr.dtype.element_ty
    eps = float_from_bits(eps_bits).to(dtype)
    scale = float_from_bits(scale_bits).to(dtype)
    problem = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    running = True
    if CHECK_TOL:
        running = tl.load(stopped_ptr + problem) == 0
    if running:
        rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        C_ptr += problem * N * M
        f_hist_ptr += problem * n_iters * N
        g_old_ptr = g_hist_ptr + problem * n_iters * M + tl.maximum(t - 2, 0) * M
        f_old_ptr = f_hist_ptr + tl.maximum(t - 2, 0) * N
        f_new_ptr = f_hist_ptr + (t - 1) * N
        err = _row_update(
            C_ptr, log_a_ptr + problem * N, f_old_ptr, g_old_ptr, f_new_ptr, t, rows, row_mask, M, eps, scale,
            CHECK_TOL, BLOCK_N, BLOCK_M,
        )  # fmt: skip
        if CHECK_TOL:
            tl.store(err_part_ptr + problem * tl.num_programs(1) + block, tl.sum(err, axis=0))


@triton.jit(do_not_specialize=["t", "n_iters", "eps_bits", "scale_bits", "tol_bits"])
def sinkhorn_split_col_kernel(
    C_ptr,
    log_b_ptr,
    f_hist_ptr,
    g_hist_ptr,
    err_part_ptr,
    stopped_ptr,
    n_done_ptr,
    N,
    M,
    n_iters,
    t,
    eps_bits,
    scale_bits,
    tol_bits,
    n_row_blocks,
    CHECK_TOL: tl.constexpr,
    ERR_BLOCKS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Column update of iteration t for column block pid(1) of problem pid(0): g^t_j -> g_hist[t-1],
    n_done[b] = t. With CHECK_TOL (t > 1), the problem stops first when the summed err_part < tol
    (every block of the problem sees the same sum, so they agree). Reads N x BLOCK_M of C and f^t once.
    """
    dtype = C_ptr.dtype.element_ty
    eps = float_from_bits(eps_bits).to(dtype)
    scale = float_from_bits(scale_bits).to(dtype)
    problem = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    running = True
    if CHECK_TOL:
        running = tl.load(stopped_ptr + problem) == 0
        parts = tl.arange(0, ERR_BLOCKS)
        err = tl.sum(
            tl.load(err_part_ptr + problem * n_row_blocks + parts, mask=parts < n_row_blocks, other=0.0),
            axis=0,
        )
        stop_now = running & (t > 1) & (err < float_from_bits(tol_bits).to(dtype))
        tl.store(stopped_ptr + problem, 1, mask=stop_now)
        running = running != stop_now  # stop_now implies running: this clears it
    if running:
        cols = block * BLOCK_M + tl.arange(0, BLOCK_M)
        col_mask = cols < M
        f_new_ptr = f_hist_ptr + problem * n_iters * N + (t - 1) * N
        g_new_ptr = g_hist_ptr + problem * n_iters * M + (t - 1) * M
        _col_update(
            C_ptr + problem * N * M, log_b_ptr + problem * M, f_new_ptr, g_new_ptr, cols, col_mask, N, M, eps,
            scale, BLOCK_N, BLOCK_M,
        )  # fmt: skip
        if block == 0:
            tl.store(n_done_ptr + problem, t.to(tl.int64))


@triton.jit(do_not_specialize=["step", "n_iters", "eps_bits", "scale_bits"])
def sinkhorn_split_backward_row_kernel(
    C_ptr,
    log_b_ptr,
    f_hist_ptr,
    g_hist_ptr,
    n_done_ptr,
    grad_f_ptr,
    adj_g_ptr,
    adj_f_ptr,
    grad_log_a_ptr,
    N,
    M,
    n_iters,
    step,
    eps_bits,
    scale_bits,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Backward step ``step`` (t = n_done[b] - step, skipped when t < 1), rows block pid(1) of problem pid(0):
        F_i = [step == 0] grad_f_i - sum_j G_j Pc_ij  -> adj_f;   grad_log_a_i += eps F_i
    with G = adj_g[b, step % 2] the adjoint of g^t and Pc the column softmax of the g^t update (see
    sinkhorn_log_backward_kernel). Reads BLOCK_N x M of C once.
    """
    dtype = C_ptr.dtype.element_ty
    eps = float_from_bits(eps_bits).to(dtype)
    scale = float_from_bits(scale_bits).to(dtype)
    problem = tl.program_id(0).to(tl.int64)
    t = tl.load(n_done_ptr + problem).to(tl.int32) - step
    if t >= 1:
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        C_ptr += problem * N * M
        log_b_ptr += problem * M
        g_t_ptr = g_hist_ptr + problem * n_iters * M + (t - 1) * M
        adj_g_ptr += problem * 2 * M + (step % 2) * M
        f_t = tl.load(
            f_hist_ptr + problem * n_iters * N + (t - 1) * N + rows, mask=row_mask, other=float("-inf")
        )
        adj_f = tl.where(step == 0, tl.load(grad_f_ptr + problem * N + rows, mask=row_mask, other=0.0), 0.0)
        adj_f = _subtract_g_adjoint(
            adj_f, C_ptr, g_t_ptr, log_b_ptr, adj_g_ptr, f_t, rows, row_mask, M, eps, scale, BLOCK_M
        )
        tl.store(adj_f_ptr + problem * N + rows, adj_f, mask=row_mask)
        grad_log_a = tl.load(grad_log_a_ptr + problem * N + rows, mask=row_mask, other=0.0)
        tl.store(grad_log_a_ptr + problem * N + rows, grad_log_a + eps * adj_f, mask=row_mask)


@triton.jit(do_not_specialize=["step", "n_iters", "eps_bits", "scale_bits"])
def sinkhorn_split_backward_col_kernel(
    C_ptr,
    log_a_ptr,
    log_b_ptr,
    f_hist_ptr,
    g_hist_ptr,
    n_done_ptr,
    adj_g_ptr,
    adj_f_ptr,
    grad_C_ptr,
    grad_log_b_ptr,
    N,
    M,
    n_iters,
    step,
    eps_bits,
    scale_bits,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """The rest of backward step ``step`` for column block pid(1) of problem pid(0), with F complete:
        grad_C_ij += G_j Pc_ij + F_i Pr_ij;   G'_j = -sum_i F_i Pr_ij -> adj_g[b, (step + 1) % 2]
        grad_log_b_j += eps G_j
    Reads C and grad_C over N x BLOCK_M once, writes grad_C once.
    """
    dtype = C_ptr.dtype.element_ty
    eps = float_from_bits(eps_bits).to(dtype)
    scale = float_from_bits(scale_bits).to(dtype)
    problem = tl.program_id(0).to(tl.int64)
    t = tl.load(n_done_ptr + problem).to(tl.int32) - step
    if t >= 1:
        cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        col_mask = cols < M
        C_ptr += problem * N * M
        grad_C_ptr += problem * N * M
        log_a_ptr += problem * N
        adj_f_ptr += problem * N
        f_t_ptr = f_hist_ptr + problem * n_iters * N + (t - 1) * N
        g_hist_ptr += problem * n_iters * M
        adj_g_ptr += problem * 2 * M
        v = _col_softmax_shift(g_hist_ptr + (t - 1) * M, log_b_ptr + problem * M, cols, col_mask, eps)
        adj_g = tl.load(adj_g_ptr + (step % 2) * M + cols, mask=col_mask, other=0.0)
        g_prev = _previous_g(g_hist_ptr + tl.maximum(t - 2, 0) * M, t, cols, col_mask)
        adj_g_new = tl.zeros([BLOCK_M], dtype)
        for row_start in range(0, N, BLOCK_N):
            rows = row_start + tl.arange(0, BLOCK_N)
            row_mask = rows < N
            f_t = tl.load(f_t_ptr + rows, mask=row_mask, other=float("-inf"))
            log_a = tl.load(log_a_ptr + rows, mask=row_mask, other=float("-inf"))
            u = tl.where(log_a > float("-inf"), f_t - eps * log_a, float("-inf"))
            adj_f = tl.load(adj_f_ptr + rows, mask=row_mask, other=0.0)
            adj_g_new -= _grad_cost_tile(
                C_ptr, grad_C_ptr, rows, cols, row_mask, col_mask, M, f_t, u, adj_f, v, g_prev, adj_g, scale
            )
        tl.store(adj_g_ptr + ((step + 1) % 2) * M + cols, adj_g_new, mask=col_mask)
        grad_log_b = tl.load(grad_log_b_ptr + problem * M + cols, mask=col_mask, other=0.0)
        tl.store(grad_log_b_ptr + problem * M + cols, grad_log_b + eps * adj_g, mask=col_mask)


# -------------------------------------------------------------- Sinkhorn-Knopp (SwAV / DINOv2) on logits
# Sinkhorn on C = -logits (B samples x K prototypes) with the column (prototype) update first, as SwAV does:
#   g_k = -eps log K - eps LSE_i((f_i + L_ik) / eps),   f_i = -eps log B - eps LSE_k((g_k + L_ik) / eps),
# from f = 0; then Q_ik = B exp((f_i + g_k + L_ik) / eps) (rows sum to 1). Per iteration the logits are
# read twice (one launch per half-step, blocks in the grid), then once more to write Q: no (B, K)
# temporary beyond Q. SwAV's initial normalisation by the total mass is a constant shift of L that the first
# column update removes. With few samples (B = 256: 16 row blocks) the row half-step also splits the
# prototypes into chunks across the grid, each writing its partial LSE to a (chunks, B) scratch that a small
# merge launch reduces, so that the GPU is filled. Offsets are int64 (B * K may pass 2^31; the public op still
# refuses such sizes until they have run on a GPU).


@triton.jit(do_not_specialize=["log2_n_bits", "scale_bits"])
def sinkhorn_knopp_col_kernel(
    L_ptr, f_ptr, g_ptr, B, K, log2_n_bits, scale_bits, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr
):
    """g_k for the prototypes of block pid(0): reads B x BLOCK_M logits and f once."""
    scale = float_from_bits(scale_bits).to(tl.float32)
    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_mask = cols < K
    lse2 = _col_block_lse2(
        L_ptr, f_ptr, cols, col_mask, B, tl.cast(K, tl.int64), scale, BLOCK_N, BLOCK_M, NEGATE=True
    )
    tl.store(
        g_ptr + cols,
        -(float_from_bits(log2_n_bits).to(tl.float32) + lse2) / scale,
        mask=col_mask,
    )


@triton.jit(do_not_specialize=["log2_n_bits", "scale_bits"])
def sinkhorn_knopp_row_kernel(
    L_ptr,
    f_ptr,
    g_ptr,
    partial_ptr,
    B,
    K,
    chunk,
    log2_n_bits,
    scale_bits,
    SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Row half-step for the samples of block pid(0) over the ``chunk`` prototypes of chunk pid(1): reads
    BLOCK_N x chunk logits and their g once. SPLIT: the chunk's base-2 LSE -> partial[pid(1), rows] of a
    (chunks, B) scratch (see sinkhorn_knopp_merge_kernel); else (one chunk of all K) f_i itself."""
    scale = float_from_bits(scale_bits).to(tl.float32)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < B
    first = tl.program_id(1) * chunk
    lse2 = _row_block_lse2(
        L_ptr + first, g_ptr + first, True, rows.to(tl.int64), row_mask, tl.minimum(chunk, K - first), K,
        scale, BLOCK_N, BLOCK_M, NEGATE=True,
    )  # fmt: skip
    if SPLIT:
        tl.store(partial_ptr + tl.program_id(1) * B + rows, lse2, mask=row_mask)
    else:
        tl.store(f_ptr + rows, -(float_from_bits(log2_n_bits).to(tl.float32) + lse2) / scale, mask=row_mask)


@triton.jit(do_not_specialize=["log2_n_bits", "scale_bits"])
def sinkhorn_knopp_merge_kernel(
    partial_ptr, f_ptr, B, n_chunks, log2_n_bits, scale_bits, BLOCK: tl.constexpr
):
    """f_i = -(log2 B + LSE2_c partial[c, i]) / scale for the samples of block pid(0): the row half-step's
    chunks merged (reads the (chunks, BLOCK) scratch once)."""
    scale = float_from_bits(scale_bits).to(tl.float32)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_mask = rows < B
    run_max = tl.full([BLOCK], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK], tl.float32)
    for c in range(n_chunks):
        x = tl.load(partial_ptr + c * B + rows, mask=row_mask, other=float("-inf"))
        new_max = tl.maximum(run_max, x)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp2(run_max - shift) + tl.exp2(x - shift)
        run_max = new_max
    lse2 = run_max + tl.log2(run_sum)
    tl.store(f_ptr + rows, -(float_from_bits(log2_n_bits).to(tl.float32) + lse2) / scale, mask=row_mask)


@triton.jit(do_not_specialize=["log2_b_bits", "scale_bits"])
def sinkhorn_knopp_plan_kernel(
    L_ptr, f_ptr, g_ptr, Q_ptr, B, K, log2_b_bits, scale_bits, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr
):
    """Q_ik = exp2((f_i + g_k + L_ik) * scale + log2 B) on a BLOCK_N x BLOCK_M tile."""
    scale = float_from_bits(scale_bits).to(tl.float32)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = (rows < B)[:, None] & (cols < K)[None, :]
    offsets = rows[:, None].to(tl.int64) * K + cols[None, :]
    logits = tl.load(L_ptr + offsets, mask=mask, other=0.0)
    f = tl.load(f_ptr + rows, mask=rows < B, other=0.0)
    g = tl.load(g_ptr + cols, mask=cols < K, other=0.0)
    x = (f[:, None] + g[None, :] + logits) * scale + float_from_bits(log2_b_bits).to(tl.float32)
    tl.store(Q_ptr + offsets, tl.exp2(x), mask=mask)


def _tile_config(
    N: int, M: int, dtype: torch.dtype, block_n: int | None, block_m: int | None
) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_M, num_warps): power-of-two tiles, one tile for sides up to 16, at most 64 x 128.

    Columns are the contiguous axis, so they get the wider side (coalesced loads). A tile holds at most
    16 KiB (4096 fp32 / 2048 fp64 entries); 4 warps, 8 from 8 KiB up (at most 64 bytes of a tile per
    thread). For sm_90 (Triton 3.6 and 3.9, ptxas) these use up to ~250 registers and spill at most a few
    dozen bytes; 64-row fp32 tiles with 4 warps spilled 150-220 bytes.
    """
    itemsize = torch.finfo(dtype).bits // 8
    block_m = block_m or min(128, max(16, triton.next_power_of_2(M)))
    block_n = block_n or min(64, max(16, triton.next_power_of_2(N)), max(16, 16384 // (itemsize * block_m)))
    num_warps = 8 if block_n * block_m * itemsize >= 8192 else 4
    return block_n, block_m, num_warps


SPLIT_MIN_ENTRIES = 128 * 128  # N * M from which the split regime is the default (H200 measurements)


def use_split_regime(B: int, N: int, M: int) -> bool:
    """Whether a (B, N, M) solve takes the split regime (one launch per half-step, blocks of each problem
    spread over the GPU) rather than one program per problem for the whole solve.

    ``S2DC_TRITON_SINKHORN_REGIME`` = "program" or "split" forces one (benchmarks, tests); default: split
    from SPLIT_MIN_ENTRIES entries per problem, where one program per problem is latency-bound.
    """
    regime = os.environ.get("S2DC_TRITON_SINKHORN_REGIME", "auto")
    if regime not in ("auto", "program", "split"):
        raise ValueError(f"S2DC_TRITON_SINKHORN_REGIME must be auto, program or split, got {regime!r}")
    return regime == "split" or (regime == "auto" and N * M >= SPLIT_MIN_ENTRIES)


GRAPH_MAX_ENTRIES = 2**22  # B * N * M up to which split-regime launch sequences are replayed as CUDA graphs


def _split_blocks(N: int, M: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(row-pass BLOCK_N, BLOCK_M, column-pass BLOCK_N, BLOCK_M): 2048-entry fp32 tiles (1024 fp64), narrow
    row blocks / column blocks so that even one problem fills the grid."""
    wide = 128 if dtype == torch.float32 else 64
    row_n = 16
    row_m = min(wide, max(16, triton.next_power_of_2(M)))
    col_m = min(32, max(16, triton.next_power_of_2(M)))
    col_n = min(wide // 2, max(16, triton.next_power_of_2(N)))
    return row_n, row_m, col_n, col_m


def _split_forward(C, log_a, log_b, eps, n_iters, tol, f_hist, g_hist, n_done) -> None:
    """Fill f_hist, g_hist and n_done by 2 * n_iters launches (see sinkhorn_split_row_kernel), replayed as
    one CUDA graph for small problems (see s2dc_kernels._utils.LaunchGraphs)."""
    B, N, M = C.shape
    row_n, row_m, col_n, col_m = _split_blocks(N, M, C.dtype)
    n_row_blocks, n_col_blocks = triton.cdiv(N, row_n), triton.cdiv(M, col_m)
    check_tol = tol > 0
    bits = float_bits(eps), float_bits(LOG2E / eps)

    def launch(C, log_a, log_b, f_hist, g_hist, n_done):
        err_part = C.new_zeros(B, n_row_blocks)
        stopped = torch.zeros(B, dtype=torch.int32, device=C.device)
        n_done.fill_(0 if check_tol else n_iters)
        for t in range(1, n_iters + 1):
            sinkhorn_split_row_kernel[(B, n_row_blocks)](
                C, log_a, f_hist, g_hist, err_part, stopped, N, M, n_iters, t, *bits,
                CHECK_TOL=check_tol, BLOCK_N=row_n, BLOCK_M=row_m, num_warps=4,
            )  # fmt: skip
            sinkhorn_split_col_kernel[(B, n_col_blocks)](
                C, log_b, f_hist, g_hist, err_part, stopped, n_done, N, M, n_iters, t, *bits,
                float_bits(tol), n_row_blocks, CHECK_TOL=check_tol,
                ERR_BLOCKS=triton.next_power_of_2(n_row_blocks), BLOCK_N=col_n, BLOCK_M=col_m, num_warps=4,
            )  # fmt: skip

    if B * N * M > GRAPH_MAX_ENTRIES:
        launch(C, log_a, log_b, f_hist, g_hist, n_done)
    else:
        key = ("forward", n_iters, bits, float_bits(tol))
        launch_graphs.run(key, launch, (C, log_a, log_b), (f_hist, g_hist, n_done))


def _split_backward(
    C, log_a, log_b, eps, f_hist, g_hist, n_done, grad_f, adj_g, grad_C, grad_log_a, grad_log_b
):
    """Accumulate the unrolled gradient by 2 launches per iteration (see sinkhorn_split_backward_row_kernel;
    problems that stopped early skip the launches past their n_done), replayed as one CUDA graph for small
    problems. grad_C, grad_log_a, grad_log_b are overwritten (zeroed first); adj_g (B, 2, M) holds grad_g and
    zeros."""
    B, N, M = C.shape
    n_iters = f_hist.shape[1]
    row_n, row_m, col_n, col_m = _split_blocks(N, M, C.dtype)
    bits = float_bits(eps), float_bits(LOG2E / eps)

    def launch(C, log_a, log_b, f_hist, g_hist, n_done, grad_f, adj_g_in, grad_C, grad_log_a, grad_log_b):
        adj_f = torch.empty_like(log_a)
        adj_g = adj_g_in.clone()  # ping-pong scratch: the input stays as given
        for t in (grad_C, grad_log_a, grad_log_b):
            t.zero_()
        for step in range(n_iters):
            sinkhorn_split_backward_row_kernel[(B, triton.cdiv(N, row_n))](
                C, log_b, f_hist, g_hist, n_done, grad_f, adj_g, adj_f, grad_log_a, N, M, n_iters, step,
                *bits, BLOCK_N=row_n, BLOCK_M=row_m, num_warps=4,
            )  # fmt: skip
            sinkhorn_split_backward_col_kernel[(B, triton.cdiv(M, col_m))](
                C, log_a, log_b, f_hist, g_hist, n_done, adj_g, adj_f, grad_C, grad_log_b, N, M, n_iters,
                step, *bits, BLOCK_N=col_n, BLOCK_M=col_m, num_warps=4,
            )  # fmt: skip

    inputs = (C, log_a, log_b, f_hist, g_hist, n_done, grad_f, adj_g)
    if B * N * M > GRAPH_MAX_ENTRIES:
        launch(*inputs, grad_C, grad_log_a, grad_log_b)
    else:
        launch_graphs.run(("backward", bits), launch, inputs, (grad_C, grad_log_a, grad_log_b))


def _check_inputs(C: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> tuple[int, int, int]:
    """(B, N, M) of the problem, after checking shapes and dtypes."""
    if C.dim() != 3 or log_a.shape != C.shape[:2] or log_b.shape != (C.shape[0], C.shape[2]):
        raise ValueError(
            f"expected C (B, N, M), log_a (B, N), log_b (B, M), got {tuple(C.shape)}, "
            f"{tuple(log_a.shape)}, {tuple(log_b.shape)}"
        )
    if C.dtype not in (torch.float32, torch.float64) or log_a.dtype != C.dtype or log_b.dtype != C.dtype:
        raise TypeError(
            f"expected float32 or float64 inputs of one dtype, got {C.dtype}, {log_a.dtype}, {log_b.dtype}"
        )
    return C.shape


def sinkhorn_forward(
    C: torch.Tensor,
    log_a: torch.Tensor,
    log_b: torch.Tensor,
    eps: float,
    n_iters: int,
    tol: float,
    *,
    block_n: int | None = None,
    block_m: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-domain Sinkhorn for a batch in one launch (see the module docstring for the iteration).

    C (B, N, M), log_a (B, N), log_b (B, M): contiguous, float32 or float64, one dtype; eps > 0;
    n_iters >= 1; tol <= 0 turns the stopping check off. ``block_n``/``block_m`` (powers of two >= 16)
    override the tile shape. Returns f (B, N), g (B, M), f_hist (B, n_iters, N), g_hist (B, n_iters, M)
    (rows at index >= n_done hold zeros or the rejected candidate of the stopping iteration) and
    n_done (B,) int64.
    """
    B, N, M = _check_inputs(C, log_a, log_b)
    if n_iters < 1:
        raise ValueError(f"n_iters must be >= 1, got {n_iters}")
    C, log_a, log_b = C.contiguous(), log_a.contiguous(), log_b.contiguous()
    f = C.new_empty(B, N)
    g = C.new_empty(B, M)
    f_hist = C.new_zeros(B, n_iters, N)
    g_hist = C.new_zeros(B, n_iters, M)
    n_done = torch.zeros(B, dtype=torch.int64, device=C.device)
    if B == 0:
        return f, g, f_hist, g_hist, n_done
    if use_split_regime(B, N, M):
        _split_forward(C, log_a, log_b, eps, n_iters, tol, f_hist, g_hist, n_done)
        index = (n_done - 1).view(B, 1, 1)
        f.copy_(f_hist.gather(1, index.expand(B, 1, N)).squeeze(1))
        g.copy_(g_hist.gather(1, index.expand(B, 1, M)).squeeze(1))
        return f, g, f_hist, g_hist, n_done
    block_n, block_m, num_warps = _tile_config(N, M, C.dtype, block_n, block_m)
    sinkhorn_log_forward_kernel[(B,)](
        C, log_a, log_b, f, g, f_hist, g_hist, n_done,
        N, M, n_iters, float_bits(eps), float_bits(LOG2E / eps), float_bits(tol),
        CHECK_TOL=tol > 0, BLOCK_N=block_n, BLOCK_M=block_m, num_warps=num_warps,
    )  # fmt: skip
    return f, g, f_hist, g_hist, n_done


def sinkhorn_backward(
    C: torch.Tensor,
    log_a: torch.Tensor,
    log_b: torch.Tensor,
    eps: float,
    f_hist: torch.Tensor,
    g_hist: torch.Tensor,
    n_done: torch.Tensor,
    grad_f: torch.Tensor,
    grad_g: torch.Tensor,
    *,
    block_n: int | None = None,
    block_m: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact gradient of L(f, g) through the unrolled iterations of ``sinkhorn_forward``, in one launch.

    C (B, N, M), log_a (B, N), log_b (B, M), f_hist (B, n_iters, N), g_hist (B, n_iters, M), n_done (B,)
    int64 as given to / returned by the forward; grad_f (B, N), grad_g (B, M) = dL/df, dL/dg.
    Returns grad_C (B, N, M), grad_log_a (B, N), grad_log_b (B, M). Terms of zero-mass rows/columns
    (log-marginal -inf) have weight 0 (never NaN). Extra memory: a (B, 2, M) adjoint scratch.
    """
    B, N, M = _check_inputs(C, log_a, log_b)
    C, log_a, log_b = C.contiguous(), log_a.contiguous(), log_b.contiguous()
    split = B > 0 and use_split_regime(B, N, M)
    allocate = torch.empty_like if split else torch.zeros_like  # the split launches zero their outputs
    grad_C, grad_log_a, grad_log_b = allocate(C), allocate(log_a), allocate(log_b)
    if B == 0:
        return grad_C, grad_log_a, grad_log_b
    adj_g = torch.stack((grad_g.to(C.dtype), torch.zeros_like(log_b)), dim=1)  # (B, 2, M): G, G'
    if split:
        args = (C, log_a, log_b, eps, f_hist.contiguous(), g_hist.contiguous(), n_done.contiguous())
        _split_backward(*args, grad_f.to(C.dtype).contiguous(), adj_g, grad_C, grad_log_a, grad_log_b)
        return grad_C, grad_log_a, grad_log_b
    block_n, block_m, num_warps = _tile_config(N, M, C.dtype, block_n, block_m)
    sinkhorn_log_backward_kernel[(B,)](
        C, log_a, log_b, f_hist.contiguous(), g_hist.contiguous(), n_done.contiguous(),
        grad_f.to(C.dtype).contiguous(), adj_g, grad_C, grad_log_a, grad_log_b,
        N, M, f_hist.shape[1], float_bits(eps), float_bits(LOG2E / eps),
        BLOCK_N=block_n, BLOCK_M=block_m, num_warps=num_warps,
    )  # fmt: skip
    return grad_C, grad_log_a, grad_log_b


KNOPP_ROW_BLOCK = 16  # samples per program of the row half-step (16 x 128 fp32 tiles)


def knopp_row_chunks(B: int, K: int, device: torch.device) -> int:
    """Prototypes per chunk of the Sinkhorn-Knopp row half-step: all K where the B / 16 row blocks are at
    least one per multiprocessor (as measured from B = 5000 on an H200), else chunks of whole 128-column
    tiles, at least 8 tiles each, so that row blocks x chunks make 4 programs per multiprocessor.
    ``S2DC_KNOPP_ROW_CHUNKS`` forces a number of chunks (tests, benchmarks)."""
    forced = os.environ.get("S2DC_KNOPP_ROW_CHUNKS")
    if forced is not None:
        n_chunks = max(1, int(forced))
    elif device.type != "cuda":
        return K
    else:
        n_sm = torch.cuda.get_device_properties(device).multi_processor_count
        row_blocks = triton.cdiv(B, KNOPP_ROW_BLOCK)
        if row_blocks >= n_sm:
            return K
        n_chunks = min(triton.cdiv(4 * n_sm, row_blocks), triton.cdiv(K, 8 * 128))
    if n_chunks <= 1:
        return K
    return triton.cdiv(triton.cdiv(K, n_chunks), 128) * 128


def sinkhorn_knopp(logits: torch.Tensor, eps: float, n_iters: int) -> torch.Tensor:
    """SwAV's Sinkhorn-Knopp targets of (B, K) float32 logits in 2 * n_iters + 1 launches (3 * n_iters + 1
    when the row half-step is split into chunks, see knopp_row_chunks): Q (B, K), rows summing to 1."""
    logits = logits.contiguous()
    if logits.dtype != torch.float32:
        raise TypeError(f"expected float32 logits, got {logits.dtype}")
    B, K = logits.shape
    f = logits.new_zeros(B)
    g = logits.new_empty(K)
    Q = torch.empty_like(logits)
    scale = float_bits(LOG2E / eps)
    log2_b, log2_k = float_bits(math.log2(B)), float_bits(math.log2(K))
    chunk = knopp_row_chunks(B, K, logits.device)
    n_chunks = triton.cdiv(K, chunk)
    partial = logits.new_empty(n_chunks, B) if n_chunks > 1 else f  # (chunks, B) row LSEs of the chunks
    row_blocks = triton.cdiv(B, KNOPP_ROW_BLOCK)
    for _ in range(n_iters):
        sinkhorn_knopp_col_kernel[(triton.cdiv(K, 32),)](
            logits, f, g, B, K, log2_k, scale, BLOCK_N=64, BLOCK_M=32, num_warps=4
        )
        sinkhorn_knopp_row_kernel[(row_blocks, n_chunks)](
            logits, f, g, partial, B, K, chunk, log2_b, scale,
            SPLIT=n_chunks > 1, BLOCK_N=KNOPP_ROW_BLOCK, BLOCK_M=128, num_warps=4,
        )  # fmt: skip
        if n_chunks > 1:
            sinkhorn_knopp_merge_kernel[(triton.cdiv(B, 256),)](
                partial, f, B, n_chunks, log2_b, scale, BLOCK=256, num_warps=4
            )
    sinkhorn_knopp_plan_kernel[(triton.cdiv(B, 32), triton.cdiv(K, 128))](
        logits, f, g, Q, B, K, log2_b, scale, BLOCK_N=32, BLOCK_M=128, num_warps=4
    )
    return Q
