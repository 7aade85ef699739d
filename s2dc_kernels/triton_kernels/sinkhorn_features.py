"""Log-domain Sinkhorn with the cost computed from features on the fly, in Triton (no N x M matrix).

One problem of the batch: features X (N, d), Y (M, d), per-row and per-column cost terms alpha (N), beta (M)
and a factor gamma, so that
    C_ij = alpha_i + beta_j - gamma * X_i . Y_j
(cosine: X, Y unit rows, alpha = 1, beta = 0, gamma = 1; sqeuclidean: alpha = |x|^2, beta = |y|^2,
gamma = 2; dot: alpha = beta = 0, gamma = 1). From f = 0, g = 0, for t = 1..n_iters, exactly the solver of
``triton_kernels/sinkhorn.py``:
    f_i = eps * (log_a_i - LSE_j((g_j - C_ij) / eps))            # row half-step, uses g of iteration t-1
    g_j = eps * (log_b_j - LSE_i((f_i - C_ij) / eps))            # column half-step, uses the new f
with the optional per-problem stop (tol > 0, t > 1): when the row-marginal L1 error of iteration t-1 (from
the LSE of iteration t) is below tol, the problem keeps the potentials of iteration t-1.

Design. A half-step is a FlashAttention-style pass: a program owns BLOCK_N rows of X (kept in registers),
streams BLOCK_M rows of Y, forms the scores S = X Y^T of the tile with tl.dot (fp32 accumulation; "ieee"
fp32 products by default, tf32 when allowed; bf16/fp16 features straight into the tensor cores) and keeps
an online base-2 LSE of z_ij = (g_j - beta_j) * s + gamma * s * S_ij, s = log2(e) / eps (one FMA per entry;
alpha_i is a row constant added after the loop). The column half-step is the same kernel with the roles of
(X, alpha, f) and (Y, beta, g) swapped. Grid (B, row blocks, column splits): when B * row blocks cannot
fill the GPU, the columns are split among programs that write partial LSEs, combined by a small finish
kernel; otherwise the LSE kernel finishes the update itself. One to two launches per half-step, no host
synchronisation: the stop lives in device buffers (err_part, stopped, n_done) as in the split regime of
``triton_kernels/sinkhorn.py``; f alternates between two buffers so that a stopping problem keeps f^{t-1}.
On CUDA the launches of a solve are replayed as one CUDA graph (``_utils.launch_graphs``; the
graph copies only the O((N + M) d) inputs in).

Value and envelope gradients: one more streamed pass over the plan P_ij = exp2(hx_i + hy_j + gamma s S_ij),
hx = (f - alpha) s, hy = (g - beta) s, giving per row r_i = sum_j P_ij, q_i = sum_j P_ij w_j and optionally
Z_i = sum_j P_ij Y_j (d-vector, tl.dot of the P tile with the Y tile). The entropic value is
W = sum_i r_i u_i + sum_j c_j v_j with u = f - eps log a, v = g - eps log b (both 0 at zero mass), i.e.
sum_i (r_i u_i + q_i) with w = v; dW/dX_i = -gamma Z_i, dW/dalpha_i = r_i (and symmetrically for Y, beta
by the same kernel on swapped roles).

Memory traffic per half-step: X read once, Y read ceil(N / BLOCK_N) times (from L2), potentials O(N + M);
extra memory O((N + M) d) at most (the gradients), O(splits * (N + M)) partial LSEs. eps, its scale and tol
reach the kernels as the int64 bit pattern of the Python float (Triton passes Python floats as fp32).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._utils import launch_graphs
from ._common import LOG2E, float_bits, float_from_bits


@triton.jit
def _scores(
    x_first,
    X_ptr,
    Y_ptr,
    rows,
    row_mask,
    cols,
    col_mask,
    D,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """S = X[rows] Y[cols]^T (BLOCK_N, BLOCK_M), accumulated over d in BLOCK_D chunks; ``x_first`` holds the
    first chunk of X[rows] (loaded once per program). Masked rows/columns read zeros."""
    dims = tl.arange(0, BLOCK_D)
    y = tl.load(
        Y_ptr + cols[:, None] * D + dims[None, :], mask=col_mask[:, None] & (dims < D)[None, :], other=0.0
    )
    s = tl.dot(x_first, tl.trans(y), input_precision=PRECISION)
    for d_start in range(BLOCK_D, D, BLOCK_D):
        d = d_start + dims
        x = tl.load(
            X_ptr + rows[:, None] * D + d[None, :], mask=row_mask[:, None] & (d < D)[None, :], other=0.0
        )
        y = tl.load(
            Y_ptr + cols[:, None] * D + d[None, :], mask=col_mask[:, None] & (d < D)[None, :], other=0.0
        )
        s += tl.dot(x, tl.trans(y), input_precision=PRECISION)
    return s


@triton.jit
def _load_rows(X_ptr, rows, row_mask, D, BLOCK_D: tl.constexpr):
    """The first BLOCK_D features of X[rows] (zeros past N and past D)."""
    dims = tl.arange(0, BLOCK_D)
    return tl.load(
        X_ptr + rows[:, None] * D + dims[None, :], mask=row_mask[:, None] & (dims < D)[None, :], other=0.0
    )


@triton.jit
def _is_running(
    stopped_ptr,
    err_part_ptr,
    problem,
    n_err_blocks,
    t,
    tol,
    STOP_MODE: tl.constexpr,
    WRITE_STOP: tl.constexpr,
    ERR_BLOCKS: tl.constexpr,
):
    """Whether problem ``problem`` still iterates at iteration t.

    STOP_MODE 0: no tol (always). 1 (row half-step): not stopped. 2 (column half-step): not stopped and not
    stopping now, i.e. not (t > 1 and sum(err_part) < tol); with WRITE_STOP the stop is recorded. Every
    program of a launch sees the same err_part, so they agree.
    """
    running = True
    if STOP_MODE > 0:
        running = tl.load(stopped_ptr + problem) == 0
    if STOP_MODE == 2:
        parts = tl.arange(0, ERR_BLOCKS)
        err = tl.sum(
            tl.load(err_part_ptr + problem * n_err_blocks + parts, mask=parts < n_err_blocks, other=0.0),
            axis=0,
        )
        stop_now = running & (t > 1) & (err < tol)
        if WRITE_STOP:
            tl.store(stopped_ptr + problem, 1, mask=stop_now)
        running = running != stop_now  # stop_now implies running: this clears it
    return running


@triton.jit
def _finish_rows(
    lse2,
    rows,
    row_mask,
    block,
    problem,
    alpha_ptr,
    log_m_ptr,
    pot_out_ptr,
    pot_old_ptr,
    err_part_ptr,
    n_done_ptr,
    n_err_blocks,
    t,
    eps,
    scale,
    STOP_MODE: tl.constexpr,
):
    """pot_i = eps * log_m_i + alpha_i - lse2_i / scale for the rows ``rows`` (lse2 = LSE2_j z_ij).

    STOP_MODE 1: also the block's share of the marginal error of the previous iterate pot_old,
    sum_i |exp2((pot_old_i - alpha_i) * scale + lse2_i) - m_i| -> err_part[problem, block];
    STOP_MODE 2: block 0 records n_done = t.
    """
    alpha = tl.load(alpha_ptr + rows, mask=row_mask, other=0.0)
    log_m = tl.load(log_m_ptr + rows, mask=row_mask, other=0.0)
    if STOP_MODE == 1:
        old = tl.load(pot_old_ptr + rows, mask=row_mask, other=0.0)
        err = tl.where(row_mask, tl.abs(tl.exp2((old - alpha) * scale + lse2) - tl.exp(log_m)), 0.0)
        tl.store(err_part_ptr + problem * n_err_blocks + block, tl.sum(err, axis=0))
    tl.store(pot_out_ptr + rows, eps * log_m + alpha - lse2 * (1.0 / scale), mask=row_mask)
    if STOP_MODE == 2:
        if block == 0:
            tl.store(n_done_ptr + problem, t.to(tl.int64))


@triton.jit(do_not_specialize=["t", "split_cols", "eps_bits", "scale_bits", "gamma_bits", "tol_bits"])
def features_lse_kernel(
    X_ptr,
    Y_ptr,
    alpha_ptr,
    beta_ptr,
    log_m_ptr,
    pot_in_ptr,
    pot_out_ptr,
    pot_old_ptr,
    partial_ptr,
    err_part_ptr,
    stopped_ptr,
    n_done_ptr,
    N,
    M,
    D,
    split_cols,
    n_err_blocks,
    t,
    eps_bits,
    scale_bits,
    gamma_bits,
    tol_bits,
    STOP_MODE: tl.constexpr,
    FINISH: tl.constexpr,
    PRECISION: tl.constexpr,
    ERR_BLOCKS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Half-step of iteration t for rows block pid(1), columns split pid(2) of problem pid(0).

    X (B, N, d), Y (B, M, d), alpha (B, N), beta (B, M), log_m (B, N), pot_in (B, M) (the other side's
    potential), pot_out / pot_old (B, N). Computes lse2_i = LSE2_j z_ij over the columns
    [pid(2) * split_cols, (pid(2) + 1) * split_cols) with z_ij = (pot_in_j - beta_j) * s + gamma s S_ij,
    then FINISH: the update (see _finish_rows), else: lse2 -> partial (B, splits, N).
    Reads BLOCK_N x d of X once and split_cols x d of Y once.
    """
    dtype = alpha_ptr.dtype.element_ty
    eps = float_from_bits(eps_bits).to(dtype)
    scale = float_from_bits(scale_bits).to(dtype)
    gamma_scale = float_from_bits(gamma_bits).to(dtype) * scale
    problem = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    split = tl.program_id(2)
    tol = float_from_bits(tol_bits).to(dtype)
    running = _is_running(
        stopped_ptr, err_part_ptr, problem, n_err_blocks, t, tol, STOP_MODE, FINISH, ERR_BLOCKS
    )
    if running:
        X_ptr += problem * N * D
        Y_ptr += problem * M * D
        beta_ptr += problem * M
        pot_in_ptr += problem * M
        rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        x_first = _load_rows(X_ptr, rows, row_mask, D, BLOCK_D)
        col_end = tl.minimum(M, (split + 1) * split_cols)
        run_max = tl.full([BLOCK_N], float("-inf"), dtype)
        run_sum = tl.zeros([BLOCK_N], dtype)
        for col_start in range(split * split_cols, col_end, BLOCK_M):
            cols = col_start + tl.arange(0, BLOCK_M)
            col_mask = cols < col_end
            pot = tl.load(pot_in_ptr + cols, mask=col_mask, other=float("-inf"))
            beta = tl.load(beta_ptr + cols, mask=col_mask, other=0.0)
            s = _scores(x_first, X_ptr, Y_ptr, rows, row_mask, cols, col_mask, D, BLOCK_D, PRECISION)
            z = s.to(dtype) * gamma_scale + ((pot - beta) * scale)[None, :]
            new_max = tl.maximum(run_max, tl.max(z, axis=1))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            run_sum = run_sum * tl.exp2(run_max - shift) + tl.sum(tl.exp2(z - shift[:, None]), axis=1)
            run_max = new_max
        lse2 = run_max + tl.log2(run_sum)
        if FINISH:
            _finish_rows(
                lse2, rows, row_mask, block, problem, alpha_ptr + problem * N, log_m_ptr + problem * N,
                pot_out_ptr + problem * N, pot_old_ptr + problem * N, err_part_ptr, n_done_ptr, n_err_blocks,
                t, eps, scale, STOP_MODE,
            )  # fmt: skip
        else:
            tl.store(partial_ptr + (problem * tl.num_programs(2) + split) * N + rows, lse2, mask=row_mask)


@triton.jit(do_not_specialize=["t", "eps_bits", "scale_bits", "tol_bits"])
def features_finish_kernel(
    alpha_ptr,
    log_m_ptr,
    partial_ptr,
    pot_out_ptr,
    pot_old_ptr,
    err_part_ptr,
    stopped_ptr,
    n_done_ptr,
    N,
    n_splits,
    n_err_blocks,
    t,
    eps_bits,
    scale_bits,
    tol_bits,
    STOP_MODE: tl.constexpr,
    ERR_BLOCKS: tl.constexpr,
    SPLITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Combine the n_splits partial LSEs (B, n_splits, N) of rows block pid(1) of problem pid(0) and finish
    the half-step (see _finish_rows). Reads n_splits x BLOCK_N partials once."""
    dtype = alpha_ptr.dtype.element_ty
    eps = float_from_bits(eps_bits).to(dtype)
    scale = float_from_bits(scale_bits).to(dtype)
    tol = float_from_bits(tol_bits).to(dtype)
    problem = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    running = _is_running(
        stopped_ptr, err_part_ptr, problem, n_err_blocks, t, tol, STOP_MODE, True, ERR_BLOCKS
    )
    if running:
        rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        splits = tl.arange(0, SPLITS)
        parts = tl.load(
            partial_ptr + (problem * n_splits + splits[:, None]) * N + rows[None, :],
            mask=(splits < n_splits)[:, None] & row_mask[None, :],
            other=float("-inf"),
        )
        top = tl.max(parts, axis=0)
        shift = tl.where(top == float("-inf"), 0.0, top)
        lse2 = top + tl.log2(tl.sum(tl.exp2(parts - shift[None, :]), axis=0))
        _finish_rows(
            lse2, rows, row_mask, block, problem, alpha_ptr + problem * N, log_m_ptr + problem * N,
            pot_out_ptr + problem * N, pot_old_ptr + problem * N, err_part_ptr, n_done_ptr, n_err_blocks,
            t, eps, scale, STOP_MODE,
        )  # fmt: skip


@triton.jit(do_not_specialize=["scale_bits", "gamma_bits"])
def features_plan_kernel(
    X_ptr,
    Y_ptr,
    alpha_ptr,
    beta_ptr,
    pot_x_ptr,
    pot_y_ptr,
    w_ptr,
    r_ptr,
    q_ptr,
    Z_ptr,
    N,
    M,
    D,
    scale_bits,
    gamma_bits,
    WITH_Z: tl.constexpr,
    PRECISION: tl.constexpr,
    Z_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Row sums of the plan for rows block pid(1) of problem pid(0), feature chunk pid(2) of Z:
        P_ij = exp2((pot_x_i - alpha_i) s + (pot_y_j - beta_j) s + gamma s S_ij)
        r_i = sum_j P_ij,  q_i = sum_j P_ij w_j  (chunk 0 only),  WITH_Z: Z_i[chunk] = sum_j P_ij Y_j[chunk]
    X (B, N, d), Y (B, M, d), alpha, pot_x (B, N), beta, pot_y, w (B, M); r, q (B, N), Z (B, N, d) out.
    Reads BLOCK_N x d of X once, M x d of Y once (twice for the Z chunk); P never leaves registers.
    """
    dtype = alpha_ptr.dtype.element_ty
    scale = float_from_bits(scale_bits).to(dtype)
    gamma_scale = float_from_bits(gamma_bits).to(dtype) * scale
    problem = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(2)
    X_ptr += problem * N * D
    Y_ptr += problem * M * D
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    hx = tl.load(pot_x_ptr + problem * N + rows, mask=row_mask, other=float("-inf"))
    hx = (hx - tl.load(alpha_ptr + problem * N + rows, mask=row_mask, other=0.0)) * scale
    x_first = _load_rows(X_ptr, rows, row_mask, D, BLOCK_D)
    dims = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
    row_sum = tl.zeros([BLOCK_N], dtype)
    weighted_sum = tl.zeros([BLOCK_N], dtype)
    z_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype)
    for col_start in range(0, M, BLOCK_M):
        cols = col_start + tl.arange(0, BLOCK_M)
        col_mask = cols < M
        hy = tl.load(pot_y_ptr + problem * M + cols, mask=col_mask, other=float("-inf"))
        hy = (hy - tl.load(beta_ptr + problem * M + cols, mask=col_mask, other=0.0)) * scale
        s = _scores(x_first, X_ptr, Y_ptr, rows, row_mask, cols, col_mask, D, BLOCK_D, PRECISION)
        p = tl.exp2(s.to(dtype) * gamma_scale + hx[:, None] + hy[None, :])
        row_sum += tl.sum(p, axis=1)
        w = tl.load(w_ptr + problem * M + cols, mask=col_mask, other=0.0)
        weighted_sum += tl.sum(p * w[None, :], axis=1)
        if WITH_Z:
            y = tl.load(
                Y_ptr + cols[:, None] * D + dims[None, :],
                mask=col_mask[:, None] & (dims < D)[None, :],
                other=0.0,
            )
            z_acc += tl.dot(p, y.to(dtype), input_precision=Z_PRECISION)
    if chunk == 0:
        tl.store(r_ptr + problem * N + rows, row_sum, mask=row_mask)
        tl.store(q_ptr + problem * N + rows, weighted_sum, mask=row_mask)
    if WITH_Z:
        tl.store(
            Z_ptr + problem * N * D + rows[:, None] * D + dims[None, :],
            z_acc,
            mask=row_mask[:, None] & (dims < D)[None, :],
        )


# -------------------------------------------------------------- launchers
def _blocks(n_rows: int, n_cols: int, d: int, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_M, BLOCK_D, num_warps, num_stages) for a pass of n_rows rows against n_cols columns.

    FlashAttention-like tiles: 128 x 64 for 2-byte features, 64 x 64 for fp32, 32 x 32 for fp64, shrunk to
    the (power-of-two, >= 16) problem sides; d in chunks of up to 128 (64 for fp64) features, the first
    chunk of the program's rows kept in registers. Shared memory for sm_90 (Triton 3.9, wgmma): fp32
    64 x 64 x 128 tiles take 96 KiB at one stage and 192 KiB at two, so they get one (two programs per
    SM); every other configuration stays at or below 96 KiB with two stages.
    """
    itemsize = torch.finfo(dtype).bits // 8
    wide = {2: 128, 4: 64, 8: 32}[itemsize]
    block_n = min(wide, max(16, triton.next_power_of_2(n_rows)))
    block_m = min(64 if itemsize < 8 else 32, max(16, triton.next_power_of_2(n_cols)))
    block_d = min(128 if itemsize < 8 else 64, max(16, triton.next_power_of_2(d)))
    num_warps = 8 if block_n * block_d * itemsize >= 32768 else 4
    num_stages = 1 if itemsize == 4 and block_d == 128 else 2
    return block_n, block_m, block_d, num_warps, num_stages


def _num_splits(B: int, n_row_blocks: int, n_col_blocks: int, device: torch.device) -> int:
    """How many programs share a row block's columns: enough for two waves when B * row blocks programs
    cannot fill the GPU, else 1. ``S2DC_FEATURES_SPLITS`` forces a number (tests, benchmarks)."""
    forced = os.environ.get("S2DC_FEATURES_SPLITS")
    if forced is not None:
        return max(1, min(int(forced), n_col_blocks))
    if device.type != "cuda":
        return 1
    n_sm = torch.cuda.get_device_properties(device).multi_processor_count
    if B * n_row_blocks >= n_sm:
        return 1
    return min(n_col_blocks, triton.cdiv(2 * n_sm, B * n_row_blocks))


def dot_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """tl.dot's input_precision for features of ``dtype``: tf32 only for fp32 when allowed, else ieee."""
    return "tf32" if dtype == torch.float32 and allow_tf32 else "ieee"


class _HalfStep:
    """The launches of one half-step direction (rows of X against columns of Y) with their tiling."""

    def __init__(self, X: torch.Tensor, Y: torch.Tensor, precision: str, stop_mode: int):
        """Tiling and splits for X (B, N, d) against Y (B, M, d) (only their shapes, dtype and device)."""
        self.B, self.N, self.D = X.shape
        self.M = Y.shape[1]
        self.block_n, self.block_m, self.block_d, self.num_warps, self.num_stages = _blocks(
            self.N, self.M, self.D, X.dtype
        )
        self.n_row_blocks = triton.cdiv(self.N, self.block_n)
        n_col_blocks = triton.cdiv(self.M, self.block_m)
        splits = _num_splits(self.B, self.n_row_blocks, n_col_blocks, X.device)
        self.split_cols = triton.cdiv(n_col_blocks, splits) * self.block_m
        self.splits = triton.cdiv(self.M, self.split_cols)
        # the finish kernel holds a splits x finish_block tile of partials: at most 4096 entries
        self.finish_block = min(
            triton.next_power_of_2(self.N), max(16, 4096 // triton.next_power_of_2(self.splits))
        )
        # the kernel that finishes the update owns the err_part blocks
        self.n_finish_blocks = (
            self.n_row_blocks if self.splits == 1 else triton.cdiv(self.N, self.finish_block)
        )
        self.precision, self.stop_mode = precision, stop_mode

    def launch(self, X, Y, alpha, beta, log_m, pot_in, pot_out, pot_old, stop_state, t, bits) -> None:
        """Iteration t of this half-step: the LSE kernel, then the finish kernel when the columns are split.
        stop_state = (partial, err_part, stopped, n_done, n_err_blocks), shared by both half-steps."""
        partial, err_part, stopped, n_done, n_err_blocks = stop_state
        eps_bits, scale_bits, gamma_bits, tol_bits = bits
        err_blocks = triton.next_power_of_2(n_err_blocks)
        features_lse_kernel[(self.B, self.n_row_blocks, self.splits)](
            X, Y, alpha, beta, log_m, pot_in, pot_out, pot_old, partial, err_part, stopped, n_done,
            self.N, self.M, self.D, self.split_cols, n_err_blocks, t, eps_bits, scale_bits, gamma_bits,
            tol_bits, STOP_MODE=self.stop_mode, FINISH=self.splits == 1, PRECISION=self.precision,
            ERR_BLOCKS=err_blocks, BLOCK_N=self.block_n, BLOCK_M=self.block_m, BLOCK_D=self.block_d,
            num_warps=self.num_warps, num_stages=self.num_stages,
        )  # fmt: skip
        if self.splits > 1:
            features_finish_kernel[(self.B, self.n_finish_blocks)](
                alpha, log_m, partial, pot_out, pot_old, err_part, stopped, n_done, self.N, self.splits,
                n_err_blocks, t, eps_bits, scale_bits, tol_bits, STOP_MODE=self.stop_mode,
                ERR_BLOCKS=err_blocks, SPLITS=triton.next_power_of_2(self.splits), BLOCK_N=self.finish_block,
                num_warps=4,
            )  # fmt: skip


def _check_features(X, Y, alpha, beta) -> None:
    B, N, D = X.shape
    if (
        Y.dim() != 3
        or Y.shape[0] != B
        or Y.shape[2] != D
        or alpha.shape != (B, N)
        or beta.shape != (B, Y.shape[1])
    ):
        raise ValueError(
            f"expected X (B, N, d), Y (B, M, d), alpha (B, N), beta (B, M), got {tuple(X.shape)}, "
            f"{tuple(Y.shape)}, {tuple(alpha.shape)}, {tuple(beta.shape)}"
        )
    want = torch.float64 if X.dtype == torch.float64 else torch.float32
    if X.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64) or Y.dtype != X.dtype:
        raise TypeError(f"expected X and Y of one floating dtype, got {X.dtype}, {Y.dtype}")
    if alpha.dtype != want or beta.dtype != want:
        raise TypeError(
            f"expected {want} alpha and beta for {X.dtype} features, got {alpha.dtype}, {beta.dtype}"
        )


def features_solve(
    X: torch.Tensor,
    Y: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    log_a: torch.Tensor,
    log_b: torch.Tensor,
    gamma: float,
    eps: float,
    n_iters: int,
    tol: float,
    allow_tf32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Potentials f (B, N), g (B, M) of log-domain Sinkhorn on C_ij = alpha_i + beta_j - gamma X_i . Y_j.

    X (B, N, d), Y (B, M, d) float16/bfloat16/float32/float64; alpha, log_a (B, N), beta, log_b (B, M) in
    float32 (float64 for float64 features); tol <= 0 turns the stop off; ``allow_tf32``: fp32 features are
    multiplied in tf32 (else exact fp32 products). 2 to 4 launches per iteration (see the module docstring).
    """
    _check_features(X, Y, alpha, beta)
    B, N, _ = X.shape
    M = Y.shape[1]
    X, Y, alpha, beta = X.contiguous(), Y.contiguous(), alpha.contiguous(), beta.contiguous()
    log_a, log_b = log_a.to(alpha.dtype).contiguous(), log_b.to(alpha.dtype).contiguous()
    f_buf = alpha.new_zeros(2, B, N)  # f^t lives in f_buf[t % 2]
    g = beta.new_zeros(B, M)
    n_done = torch.full((B,), n_iters, dtype=torch.int64, device=X.device)
    if B == 0:
        return f_buf[0], g
    check_tol = tol > 0
    precision = dot_precision(X.dtype, allow_tf32)
    rows = _HalfStep(X, Y, precision, 1 if check_tol else 0)
    cols = _HalfStep(Y, X, precision, 2 if check_tol else 0)
    bits = float_bits(eps), float_bits(LOG2E / eps), float_bits(gamma), float_bits(tol)
    n_err = rows.n_finish_blocks

    def launch(X, Y, alpha, beta, log_a, log_b, f_buf, g, n_done):
        partial = alpha.new_empty(B * max(rows.splits * N, cols.splits * M))
        err_part = alpha.new_zeros(B, n_err)
        stopped = torch.zeros(B, dtype=torch.int32, device=X.device)
        stop_state = (partial, err_part, stopped, n_done, n_err)
        f_buf.zero_()
        g.zero_()
        n_done.fill_(n_iters)
        for t in range(1, n_iters + 1):
            f_new, f_old = f_buf[t % 2], f_buf[(t - 1) % 2]
            rows.launch(X, Y, alpha, beta, log_a, g, f_new, f_old, stop_state, t, bits)
            cols.launch(Y, X, beta, alpha, log_b, f_new, g, g, stop_state, t, bits)

    # inputs and outputs are O((N + M) d): a CUDA graph of the 2-4 launches per iteration always pays off
    key = ("features", n_iters, bits, precision, rows.splits, cols.splits)
    launch_graphs.run(key, launch, (X, Y, alpha, beta, log_a, log_b), (f_buf, g, n_done))
    index = (n_done % 2).view(1, B, 1).expand(1, B, N)
    return f_buf.gather(0, index)[0], g


def features_plan_sums(
    X: torch.Tensor,
    Y: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    pot_x: torch.Tensor,
    pot_y: torch.Tensor,
    w: torch.Tensor,
    gamma: float,
    eps: float,
    with_z: bool,
    allow_tf32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row sums of P_ij = exp((pot_x_i + pot_y_j - C_ij) / eps), C_ij = alpha_i + beta_j - gamma X_i . Y_j:
    r (B, N) = P 1, q (B, N) = P w and, with ``with_z``, Z (B, N, d) = P Y (else (B, N, 0)), in alpha's
    dtype. One launch; grid (B, row blocks, feature chunks of Z). The P Y product is an fp32 (fp64) tl.dot,
    in tf32 when ``allow_tf32`` and the features are not fp64."""
    _check_features(X, Y, alpha, beta)
    B, N, D = X.shape
    M = Y.shape[1]
    X, Y = X.contiguous(), Y.contiguous()
    r, q = alpha.new_empty(B, N), alpha.new_empty(B, N)
    Z = alpha.new_empty(B, N, D if with_z else 0)
    if B == 0:
        return r, q, Z
    block_n, block_m, block_d, num_warps, num_stages = _blocks(N, M, D, X.dtype)
    n_chunks = triton.cdiv(D, block_d) if with_z else 1
    features_plan_kernel[(B, triton.cdiv(N, block_n), n_chunks)](
        X, Y, alpha.contiguous(), beta.contiguous(), pot_x.contiguous(), pot_y.contiguous(), w.contiguous(),
        r, q, Z, N, M, D, float_bits(LOG2E / eps), float_bits(gamma), WITH_Z=with_z,
        PRECISION=dot_precision(X.dtype, allow_tf32), Z_PRECISION=dot_precision(alpha.dtype, allow_tf32),
        BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
    return r, q, Z
