"""Cosine similarity and exact k-NN in Triton: the row normalisation fused in, no N x M matrix for k-NN.

One problem of the batch: x (N, D), y (M, D), any strides (no contiguous or normalised copies are made).
Every kernel streams D in BLOCK_D slices: a (BLOCK_N, BLOCK_D) slice of x and a (BLOCK_D, BLOCK_M) slice of
y^T feed tl.dot (fp32 accumulation; fp64 for fp64 inputs) and, from the same registers, the sums of
squares |x_i|^2, |y_j|^2 of the tile's rows. The epilogue turns the raw products into the metric:
    cosine:  S_ij = x_i.y_j * a_i * b_j * scale,   a_i = 1 / max(|x_i|, 1e-12) (F.normalize's clamp),
                                                  b_j likewise, scale = 1 / temperature
    dot:     S_ij = x_i.y_j
    l2 rank: R_ij = 2 x_i.y_j - |y_j|^2            (= |x_i|^2 - |x_i - y_j|^2: largest R = nearest y_j;
                                                  of the centred rows, see below)
The norms cost (BLOCK_N + BLOCK_M) BLOCK_D squares per BLOCK_N BLOCK_M BLOCK_D multiply-adds (a few %).
fp32 products use input_precision "ieee" unless the caller asks for "tf32"; fp16/bf16 run on tensor cores.

similarity_kernel writes S (cosine_similarity's forward) or a row block of scores (k-NN with large k),
grid (row blocks, column blocks, B). Memory traffic: x and y read once per column / row block, S written once.

scaled_matmul_kernel is the backward: with G = dL/dS, the gradient with respect to the unit rows is
    P_i = sum_j G_ij (b_j * scale) y_j   (and Q_j = sum_i G_ij (a_i * scale) x_i, G by transposed strides)
with the column scale applied to the G tile in registers (no scaled or normalised copies); the launcher
then projects P onto the tangent space of the normalisation (see cosine_similarity_backward).

knn_topk_kernel keeps a running top-K list per query row on chip, grid (row blocks, B): each score is packed
with its column into one int64 key, (order-preserving int32 image of the fp32 score) << 32 | (2^32 - 1 - j),
so integer comparisons order (score, index) pairs: larger score first, then smaller index (Triton has no
sort with a payload). Per column tile of BLOCK_M keys per row:
    best = bitonic top-K of the tile's keys, ascending (runs of K sorted alternately up and down, then
           halved log2(BLOCK_M / K) times: the elementwise max of two neighbouring runs is their top K)
    top  = bitonic merge of max(top (descending), best (ascending))    # the top K of both, sorted
and both steps are skipped when no key of the tile beats its row's current K-th key. The compare-exchanges
are max / min reductions over axes of size 2 of the tile seen as a hypercube [2] * log2(size) (tl.sort's
own xor-swap costs the same on a GPU but runs element by element under the interpreter); the stages cost
log2(K) (log2(K) + 1) / 2 + (log2(BLOCK_M / K)) (log2(K) + 1) exchanges per tile entry at most.
Memory: the (B, N, k) outputs only; traffic: x read once, y once per row block. K = next power of two
>= k, at most ON_CHIP_MAX_K; larger k and fp64 inputs (whose scores do not fit the 32-bit half of a key)
take the exact chunked strategy: similarity_kernel scores for a block of query rows against all of y in a
bounded scratch (CHUNK_SCRATCH_BYTES) reduced by torch.topk.

l2 ranks the rows centred on y's mean row c (subtracted as the tiles are loaded: the expansion keeps its
digits for data far from 0); knn_l2_values_kernel then recomputes the values of the chosen pairs from the
differences, |x_i - y_j|, and the lists are re-sorted by them. Traffic: k rows of y per query.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import float_bits, float_from_bits

METRIC_COSINE, METRIC_DOT, METRIC_L2 = 0, 1, 2  # the order of s2dc_kernels.similarity.METRICS
NORM_EPS = 1e-12  # F.normalize's clamp of the row norms
ON_CHIP_MAX_K = 128  # largest padded k of the running top-k lists in registers
KNN_BLOCK_N, KNN_BLOCK_M = 32, 128  # query rows and candidate columns of a knn_topk_kernel tile
CHUNK_SCRATCH_BYTES = 64 * 2**20  # the score scratch of the chunked k-NN strategy
INVALID_KEY = tl.constexpr(-(2**63))  # below every packed (score, index) key: padding columns, excluded pairs


@triton.jit
def _dot_tile(
    x_ptr, y_ptr, centre_ptr, rows, cols, row_mask, col_mask, D,
    stride_xn, stride_xd, stride_yn, stride_yd,
    CENTRE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """(x[rows] @ y[cols]^T, |x[rows]|^2, |y[cols]|^2) in ACC_DTYPE, streamed over D in BLOCK_D slices;
    with CENTRE, of the rows minus the centre (D,) at centre_ptr."""
    acc = tl.zeros([BLOCK_N, BLOCK_M], ACC_DTYPE)
    x_sq = tl.zeros([BLOCK_N], ACC_DTYPE)
    y_sq = tl.zeros([BLOCK_M], ACC_DTYPE)
    d_in_block = tl.arange(0, BLOCK_D)
    for d_start in range(0, D, BLOCK_D):
        d = d_start + d_in_block
        d_mask = d < D
        x = tl.load(
            x_ptr + rows[:, None] * stride_xn + d[None, :] * stride_xd,
            mask=row_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        y_t = tl.load(
            y_ptr + cols[None, :] * stride_yn + d[:, None] * stride_yd,
            mask=col_mask[None, :] & d_mask[:, None],
            other=0.0,
        )
        if CENTRE:
            centre = tl.load(centre_ptr + d, mask=d_mask, other=0.0)
            x = tl.where(d_mask[None, :], x - centre[None, :], 0.0)
            y_t = tl.where(d_mask[:, None], y_t - centre[:, None], 0.0)
        acc = tl.dot(x, y_t, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        x_acc = x.to(ACC_DTYPE)
        y_acc = y_t.to(ACC_DTYPE)
        x_sq += tl.sum(x_acc * x_acc, axis=1)
        y_sq += tl.sum(y_acc * y_acc, axis=0)
    return acc, x_sq, y_sq


@triton.jit
def _metric_epilogue(acc, x_sq, y_sq, scale, METRIC: tl.constexpr):
    """The score of the metric from the raw products and squared norms (see the module docstring)."""
    if METRIC == 0:  # cosine: x.y / (max(|x|, eps) max(|y|, eps)) * scale
        inv_x = 1.0 / tl.maximum(tl.sqrt(x_sq), 1e-12)
        inv_y = 1.0 / tl.maximum(tl.sqrt(y_sq), 1e-12)
        return acc * (inv_x * scale)[:, None] * inv_y[None, :]
    elif METRIC == 1:  # dot
        return acc * scale
    else:  # l2 rank: 2 x.y - |y|^2
        return 2.0 * acc - y_sq[None, :]


@triton.jit
def similarity_kernel(
    x_ptr, y_ptr, centre_ptr, out_ptr, N, M, D, scale_bits, row_offset,
    stride_xb, stride_xn, stride_xd, stride_yb, stride_yn, stride_yd, stride_ob, stride_on, stride_om,
    METRIC: tl.constexpr, EXCLUDE_SELF: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """out[b, i, j] = score of (x[b, i], y[b, j]) for one (BLOCK_N, BLOCK_M) tile, grid (row blocks, column
    blocks, B). scale_bits: the float64 bit pattern of the scale (exact for fp64). EXCLUDE_SELF: the pairs
    with i + row_offset == j score -inf (x is a row block starting at row_offset of y's rows). The l2 rank
    is taken of the rows minus the centre (B, D) at centre_ptr (see knn)."""
    pid_n, pid_m, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask, col_mask = rows < N, cols < M
    acc, x_sq, y_sq = _dot_tile(
        x_ptr + b.to(tl.int64) * stride_xb, y_ptr + b.to(tl.int64) * stride_yb,
        centre_ptr + b.to(tl.int64) * D, rows, cols, row_mask, col_mask, D,
        stride_xn, stride_xd, stride_yn, stride_yd,
        METRIC == 2, ACC_DTYPE, PRECISION, BLOCK_N, BLOCK_M, BLOCK_D,
    )  # fmt: skip
    score = _metric_epilogue(acc, x_sq, y_sq, float_from_bits(scale_bits).to(ACC_DTYPE), METRIC)
    if EXCLUDE_SELF:
        score = tl.where(rows[:, None] + row_offset == cols[None, :], float("-inf"), score)
    out = out_ptr + b.to(tl.int64) * stride_ob + rows[:, None] * stride_on + cols[None, :] * stride_om
    tl.store(out, score.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _pack_keys(score, cols):
    """int64 keys ordering (score, column) pairs by larger fp32 score, then smaller column."""
    bits = score.to(tl.float32).to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: reverse their magnitude order
    low = (~cols).to(tl.uint32, bitcast=True).to(tl.int64)  # 2^32 - 1 - j, zero-extended
    return (ordered.to(tl.int64) << 32) | low[None, :]


@triton.jit
def _unpack_keys(keys):
    """(fp32 score, int64 column) of packed keys (inverse of _pack_keys)."""
    ordered = (keys >> 32).to(tl.int32)
    score = (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    return score, (~keys.to(tl.int32)).to(tl.int64)  # the low 32 bits hold ~j


@triton.jit
def _indicator(N_DIMS: tl.constexpr, AXIS: tl.constexpr):
    """0, 1 along hypercube axis AXIS (counted from the innermost), broadcastable to [2] * N_DIMS."""
    return tl.reshape(tl.arange(0, 2), [1] * (N_DIMS - AXIS - 1) + [2] + [1] * AXIS)


@triton.jit
def _compare_and_swap(h, flip, AXIS: tl.constexpr, N_DIMS: tl.constexpr):
    """One bitonic compare-exchange of the pairs along hypercube axis AXIS: the larger key goes to the
    right-hand slot, or to the left-hand one where ``flip`` is 1. Max / min reductions over the pair (not
    tl.sort's xor swap): the same work on a GPU, and the interpreter runs them vectorised."""
    larger = tl.max(h, axis=N_DIMS - 1 - AXIS, keep_dims=True)
    smaller = tl.min(h, axis=N_DIMS - 1 - AXIS, keep_dims=True)
    return tl.where((flip ^ _indicator(N_DIMS, AXIS)) != 0, larger, smaller)


@triton.jit
def _bitonic_merge(
    h, STAGE: tl.constexpr, ALTERNATE: tl.constexpr, DESCENDING: tl.constexpr, N_DIMS: tl.constexpr
):
    """Sort the bitonic runs of 2^STAGE keys of hypercube h ([2] * N_DIMS): ascending (or DESCENDING), or
    alternately ascending / descending from run to run when ALTERNATE."""
    if ALTERNATE:
        flip = _indicator(N_DIMS, STAGE)
    else:
        flip = DESCENDING
    for i in tl.static_range(STAGE):
        h = _compare_and_swap(h, flip, STAGE - 1 - i, N_DIMS)
    return h


@triton.jit
def _row_topk_ascending(keys, LOG_ROWS: tl.constexpr, LOG_COLS: tl.constexpr, LOG_K: tl.constexpr):
    """The 2^LOG_K largest keys of each row of keys (2^LOG_ROWS, 2^LOG_COLS), ascending: bitonic top-k
    (sort runs of 2^LOG_K keys alternately up and down, then halve: the elementwise max of two neighbouring
    runs holds their top 2^LOG_K as a bitonic run, which one merge sorts)."""
    n_dims: tl.constexpr = LOG_ROWS + LOG_COLS
    h = tl.reshape(keys, [2] * n_dims)
    for stage in tl.static_range(1, LOG_K + 1):
        h = _bitonic_merge(h, stage, stage < LOG_COLS, 0, n_dims)
    for level in tl.static_range(LOG_K + 1, LOG_COLS + 1):  # the rank of h drops by one per level
        h = tl.max(h, axis=n_dims - level)
        h = _bitonic_merge(h, LOG_K, level < LOG_COLS, 0, n_dims + LOG_K - level)
    return tl.reshape(h, [2**LOG_ROWS, 2**LOG_K])


@triton.jit
def knn_topk_kernel(
    x_ptr, y_ptr, centre_ptr, values_ptr, indices_ptr, N, M, D, k,
    stride_xb, stride_xn, stride_xd, stride_yb, stride_yn, stride_yd,
    METRIC: tl.constexpr, EXCLUDE_SELF: tl.constexpr, PRECISION: tl.constexpr,
    LOG_K: tl.constexpr, LOG_N: tl.constexpr, LOG_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """The k best columns of BLOCK_N = 2^LOG_N query rows (values: their fp32 scores, best first; indices
    int64), grid (row blocks, B), column tiles of BLOCK_M = 2^LOG_M; the running top-K lists (K = 2^LOG_K
    >= k, K <= BLOCK_M) stay in registers (see the module docstring)."""
    K: tl.constexpr = 2**LOG_K
    BLOCK_N: tl.constexpr = 2**LOG_N
    BLOCK_M: tl.constexpr = 2**LOG_M
    pid_n, b = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    x_base, y_base = x_ptr + b.to(tl.int64) * stride_xb, y_ptr + b.to(tl.int64) * stride_yb
    top = tl.full([BLOCK_N, K], INVALID_KEY, tl.int64)  # descending
    for col_start in range(0, M, BLOCK_M):
        cols = col_start + tl.arange(0, BLOCK_M)
        col_mask = cols < M
        acc, x_sq, y_sq = _dot_tile(
            x_base, y_base, centre_ptr + b.to(tl.int64) * D, rows, cols, row_mask, col_mask, D,
            stride_xn, stride_xd, stride_yn, stride_yd,
            METRIC == 2, tl.float32, PRECISION, BLOCK_N, BLOCK_M, BLOCK_D,
        )  # fmt: skip
        keys = _pack_keys(_metric_epilogue(acc, x_sq, y_sq, 1.0, METRIC), cols)
        valid = col_mask[None, :]
        if EXCLUDE_SELF:
            valid = valid & (rows[:, None] != cols[None, :])
        keys = tl.where(valid, keys, INVALID_KEY)
        kth = tl.min(top, axis=1)
        if tl.max((tl.max(keys, axis=1) > kth).to(tl.int32), axis=0) > 0:
            best = _row_topk_ascending(keys, LOG_N, LOG_M, LOG_K)
            merged = tl.reshape(tl.maximum(top, best), [2] * (LOG_N + LOG_K))  # bitonic rows: top K of both
            top = tl.reshape(_bitonic_merge(merged, LOG_K, False, 1, LOG_N + LOG_K), [BLOCK_N, K])
    score, cols = _unpack_keys(top)
    slots = tl.arange(0, K)
    offsets = (b.to(tl.int64) * N + rows[:, None]) * k + slots[None, :]
    out_mask = row_mask[:, None] & (slots[None, :] < k)
    tl.store(values_ptr + offsets, score.to(values_ptr.dtype.element_ty), mask=out_mask)
    tl.store(indices_ptr + offsets, cols, mask=out_mask)


@triton.jit
def knn_l2_values_kernel(
    x_ptr, y_ptr, indices_ptr, values_ptr, n_pairs, N, D, k,
    stride_xb, stride_xn, stride_xd, stride_yb, stride_yn, stride_yd,
    ACC_DTYPE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """values[p] = |x[b, i] - y[b, indices[p]]| for BLOCK_P pairs p = (b, i, slot) of the (B, N, k) output."""
    pairs = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    pair_mask = pairs < n_pairs
    b = pairs // (N * k)
    i = (pairs // k) % N
    j = tl.load(indices_ptr + pairs, mask=pair_mask, other=0)
    x_rows = x_ptr + b * stride_xb + i * stride_xn
    y_rows = y_ptr + b * stride_yb + j * stride_yn
    sq = tl.zeros([BLOCK_P], ACC_DTYPE)
    for d_start in range(0, D, BLOCK_D):
        d = d_start + tl.arange(0, BLOCK_D)
        mask = pair_mask[:, None] & (d < D)[None, :]
        xv = tl.load(x_rows[:, None] + d[None, :] * stride_xd, mask=mask, other=0.0).to(ACC_DTYPE)
        yv = tl.load(y_rows[:, None] + d[None, :] * stride_yd, mask=mask, other=0.0).to(ACC_DTYPE)
        diff = xv - yv
        sq += tl.sum(diff * diff, axis=1)
    tl.store(values_ptr + pairs, tl.sqrt(sq).to(values_ptr.dtype.element_ty), mask=pair_mask)


@triton.jit
def scaled_matmul_kernel(
    g_ptr, s_ptr, y_ptr, out_ptr, N, M, D,
    stride_gb, stride_gn, stride_gm, stride_yb, stride_ym, stride_yd,
    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """out[b, i, d] = sum_j g[b, i, j] s[b, j] y[b, j, d] for one (BLOCK_N, BLOCK_D) tile, grid (row blocks,
    D blocks, B); s (B, M) and out (B, N, D) contiguous in ACC_DTYPE, g and y any strides."""
    pid_n, pid_d, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask, d_mask = rows < N, d < D
    g_base, y_base = g_ptr + b.to(tl.int64) * stride_gb, y_ptr + b.to(tl.int64) * stride_yb
    acc = tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE)
    for col_start in range(0, M, BLOCK_M):
        cols = col_start + tl.arange(0, BLOCK_M)
        col_mask = cols < M
        g = tl.load(
            g_base + rows[:, None] * stride_gn + cols[None, :] * stride_gm,
            mask=row_mask[:, None] & col_mask[None, :],
            other=0.0,
        ).to(ACC_DTYPE)
        s = tl.load(s_ptr + b.to(tl.int64) * M + cols, mask=col_mask, other=0.0)
        y = tl.load(
            y_base + cols[:, None] * stride_ym + d[None, :] * stride_yd,
            mask=col_mask[:, None] & d_mask[None, :],
            other=0.0,
        ).to(ACC_DTYPE)
        acc = tl.dot(g * s[None, :], y, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    out = out_ptr + (b.to(tl.int64) * N + rows[:, None]) * D + d[None, :]
    tl.store(out, acc, mask=row_mask[:, None] & d_mask[None, :])


# ---------------------------------------------------------------- launchers
def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(f"expected x (B, N, D) and y (B, M, D), got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64) or y.dtype != x.dtype:
        raise TypeError(
            f"expected floating inputs of one dtype (fp16, bf16, fp32, fp64), got {x.dtype}, {y.dtype}"
        )


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: "ieee" (exact fp32 / fp64 products) unless torch allows tf32 matmuls;
    fp16 / bf16 run on tensor cores either way."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _tiles(dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_M, BLOCK_D, num_warps) of the score tiles: 128 x 128 on tensor cores, 64 x 64 for
    exact fp32 (FMA products) and fp64."""
    if dtype in (torch.float16, torch.bfloat16) or _precision(dtype) == "tf32":
        return 128, 128, 32, 8
    return 64, 64, 32 if dtype == torch.float32 else 16, 4


def _launch_scores(
    x, y, out, *, metric: int, scale: float, exclude_self: bool, centre=None, row_offset: int = 0
) -> None:
    """out (B, N, M) = scores of x (B, N, D) against y (B, M, D) (similarity_kernel; centre (B, D) for l2)."""
    B, N, D = x.shape
    M = y.shape[1]
    if out.numel() == 0:
        return
    block_n, block_m, block_d, num_warps = _tiles(x.dtype)
    grid = (triton.cdiv(N, block_n), triton.cdiv(M, block_m), B)
    similarity_kernel[grid](
        x, y, x if centre is None else centre, out, N, M, D, float_bits(scale), row_offset,
        *x.stride(), *y.stride(), *out.stride(),
        METRIC=metric, EXCLUDE_SELF=exclude_self, ACC_DTYPE=_acc_dtype(x.dtype),
        PRECISION=_precision(x.dtype),
        BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip


def cosine_similarity(x: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    """S (B, N, M) = normalize(x) @ normalize(y)^T / temperature in x's dtype; x (B, N, D), y (B, M, D) of
    one dtype, any strides. One launch, the norms fused in (no normalised copies)."""
    _check_pair(x, y)
    out = x.new_empty(x.shape[0], x.shape[1], y.shape[1])
    _launch_scores(x, y, out, metric=METRIC_COSINE, scale=1.0 / temperature, exclude_self=False)
    return out


def _inverse_norms(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row norms, 1 / max(norm, 1e-12)), (B, N, 1) each, in the accumulation dtype."""
    acc = torch.float64 if rows.dtype == torch.float64 else torch.float32
    norm = torch.linalg.vector_norm(rows, dim=-1, keepdim=True, dtype=acc)
    return norm, 1.0 / norm.clamp_min(NORM_EPS)


def _scaled_matmul(g: torch.Tensor, scale: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, N, D) = g (B, N, M) @ diag(scale (B, M)) @ y (B, M, D) in scale's dtype (scaled_matmul_kernel)."""
    B, N, M = g.shape
    D = y.shape[2]
    out = torch.zeros(B, N, D, dtype=scale.dtype, device=g.device)
    if out.numel() == 0 or M == 0:
        return out
    # Operands in fp32 (fp64 for fp64): exact unless torch allows tf32 or the inputs are fp16 / bf16.
    exact = y.dtype == torch.float64 or _precision(y.dtype) == "ieee" and y.dtype == torch.float32
    block_n, block_m, block_d = (64, 32, 64) if scale.dtype == torch.float32 else (32, 16, 32)
    grid = (triton.cdiv(N, block_n), triton.cdiv(D, block_d), B)
    scaled_matmul_kernel[grid](
        g, scale.contiguous(), y, out, N, M, D, *g.stride(), *y.stride(),
        ACC_DTYPE=_acc_dtype(scale.dtype), PRECISION="ieee" if exact else "tf32",
        BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    return out


def _normalize_backward(rows: torch.Tensor, grad_unit: torch.Tensor) -> torch.Tensor:
    """d/d rows of <grad_unit, rows / max(|rows|, eps)>: (P - u (u.P)) / |x| above the clamp, P / eps below;
    grad_unit (B, N, D) in the accumulation dtype is overwritten."""
    norm, inverse = _inverse_norms(rows)
    radial = (rows.to(grad_unit.dtype).unsqueeze(-2) @ grad_unit.unsqueeze(-1)).squeeze(-1)  # (B, N, 1)
    radial = torch.where(norm > NORM_EPS, radial * inverse**3, 0.0)
    return grad_unit.mul_(inverse).addcmul_(rows.to(grad_unit.dtype), radial, value=-1.0)


def cosine_similarity_backward(
    grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dx, dL/dy) of S = cosine_similarity(x, y, temperature) given grad = dL/dS (B, N, M).

    P = grad diag(b / t) y and Q = grad^T diag(a / t) x by scaled_matmul_kernel (the scales applied to the
    grad tiles in registers), then each is projected by the normalisation's Jacobian. Extra memory: the
    (B, N, D), (B, M, D) results in fp32 / fp64 and the (B, N), (B, M) norms.
    """
    _check_pair(x, y)
    _, inv_x = _inverse_norms(x)
    _, inv_y = _inverse_norms(y)
    grad_unit_x = _scaled_matmul(grad, inv_y.squeeze(-1) / temperature, y)
    grad_unit_y = _scaled_matmul(grad.transpose(1, 2), inv_x.squeeze(-1) / temperature, x)
    return _normalize_backward(x, grad_unit_x).to(x.dtype), _normalize_backward(y, grad_unit_y).to(y.dtype)


def _knn_chunked(x, y, centre, k: int, metric: int, exclude_self: bool, values, indices) -> None:
    """Exact k-NN for any k: similarity_kernel scores of row blocks against all of y in a scratch of at most
    CHUNK_SCRATCH_BYTES (one row at least), reduced by torch.topk into values / indices (B, N, k)."""
    B, N, _ = x.shape
    M = y.shape[1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    entries = max(1, CHUNK_SCRATCH_BYTES // (M * acc.itemsize))
    batches = min(B, max(1, entries // N))
    rows = min(N, max(1, entries // batches))
    scratch = torch.empty(batches * rows * M, dtype=acc, device=x.device)
    for b0 in range(0, B, batches):
        b1 = min(B, b0 + batches)
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            scores = scratch[: (b1 - b0) * (r1 - r0) * M].view(b1 - b0, r1 - r0, M)
            _launch_scores(
                x[b0:b1, r0:r1],
                y[b0:b1],
                scores,
                metric=metric,
                scale=1.0,
                exclude_self=exclude_self,
                centre=None if centre is None else centre[b0:b1],
                row_offset=r0,
            )
            best = scores.topk(k, dim=-1)
            values[b0:b1, r0:r1] = best.values
            indices[b0:b1, r0:r1] = best.indices


def knn(
    x: torch.Tensor, y: torch.Tensor, k: int, metric: int, exclude_self: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, int64 indices), (B, N, k) each, best first, of the k best rows of y (B, M, D) for each row
    of x (B, N, D) by metric 0 cosine / 1 dot / 2 l2; exclude_self drops the pairs (i, i). On chip for
    k <= ON_CHIP_MAX_K and fp16 / bf16 / fp32 (knn_topk_kernel), else chunked (see the module docstring).

    l2 ranks by 2 x'.y' - |y'|^2 of the rows centred on y's mean row c (x' = x - c, y' = y - c, subtracted
    as the tiles are loaded: distances are translation invariant and centring keeps the expansion's digits
    for data far from 0); the values are then the exact |x_i - y_j| of the chosen pairs
    (knn_l2_values_kernel) and each list is re-sorted by them. Memory: the outputs, the (B, D) centre (plus
    the chunked strategy's scratch)."""
    _check_pair(x, y)
    B, N, D = x.shape
    M = y.shape[1]
    values = x.new_empty(B, N, k)
    indices = torch.empty(B, N, k, dtype=torch.int64, device=x.device)
    if values.numel() == 0:
        return values, indices
    centre = y.mean(dim=1).contiguous() if metric == METRIC_L2 else None
    padded_k = max(2, triton.next_power_of_2(k))
    if padded_k > ON_CHIP_MAX_K or x.dtype == torch.float64:
        _knn_chunked(x, y, centre, k, metric, exclude_self, values, indices)
    else:
        # 32 x 128 tiles, 16 warps, any K <= 128 (ptxas of Triton 3.9, sm_90): 128 registers, at most 32
        # bytes of spills for exact fp32 (none for fp16, up to 160 for tf32); 64-row tiles or 4-8 warps
        # spill hundreds of bytes in the hypercube merges.
        knn_topk_kernel[(triton.cdiv(N, KNN_BLOCK_N), B)](
            x, y, x if centre is None else centre, values, indices, N, M, D, k, *x.stride(), *y.stride(),
            METRIC=metric, EXCLUDE_SELF=exclude_self, PRECISION=_precision(x.dtype),
            LOG_K=padded_k.bit_length() - 1, LOG_N=KNN_BLOCK_N.bit_length() - 1,
            LOG_M=KNN_BLOCK_M.bit_length() - 1, BLOCK_D=32, num_warps=16,
        )  # fmt: skip
    if metric == METRIC_L2:
        n_pairs, block_p = values.numel(), 64
        knn_l2_values_kernel[(triton.cdiv(n_pairs, block_p),)](
            x, y, indices, values, n_pairs, N, D, k, *x.stride(), *y.stride(),
            ACC_DTYPE=_acc_dtype(x.dtype), BLOCK_P=block_p, BLOCK_D=32, num_warps=4,
        )  # fmt: skip
        values, order = values.sort(dim=-1, stable=True)
        indices = indices.gather(-1, order)
    return values, indices
