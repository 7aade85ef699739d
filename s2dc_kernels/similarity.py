"""Public similarity ops: cosine similarity, k-nearest neighbours, neighbourhood consistency (L_nc).

Each function checks its inputs, resolves the backend and runs the reference in
``s2dc_kernels.reference.similarity`` ("torch") or a fused kernel: the compiled extension's ("cpp": for
cosine_similarity ``torch.ops.s2dc_C.cosine_forward`` / ``cosine_backward``, BLAS products scaled by the
inverse row norms; for knn ``torch.ops.s2dc_C.knn_forward``, score tiles merged into running top-k lists,
no N x M matrix), and for cosine_similarity and knn the Triton kernels of
``s2dc_kernels.triton_kernels.similarity`` ("triton": the normalisation fused into the GEMM; k-NN with
running top-k lists on chip). The kernels sit behind torch.library custom ops with fake kernels
(torch.compile traces through them). Inputs are (B, N, D) batches of row vectors or single (N, D)
problems; outputs keep the rank. Empty batches and non-contiguous inputs are fine.
"""

from __future__ import annotations

import torch
from torch import Tensor

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
NC_BACKENDS = ("torch", "cpp", "triton")  # neighborhood_consistency
COSINE_BACKENDS = ("torch", "cpp", "triton")
KNN_BACKENDS = ("torch", "cpp", "triton")


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
        backend: "auto", "torch" (the reference), "cpp" (CPU tensors: the raw products x y^T by BLAS, then
            one pass scaling them by the inverse row norms, no normalised copies; backward by BLAS on one
            scaled copy of dL/dS, see csrc/cpu/cosine.h; float16 / bfloat16 are computed in float32) or
            "triton" (one fused kernel: inverse row norms from the GEMM's own tiles, scaled in its epilogue,
            no normalised copies; fp32 products exact unless torch.backends.cuda.matmul.allow_tf32, fp16 /
            bf16 on tensor cores with fp32 accumulation; Triton backward, see
            ``s2dc_kernels.triton_kernels.similarity``). "auto" is "triton" on CUDA and "cpp" on CPU
            when the extension is built.

    Returns:
        (B, N, M) or (N, M) tensor in x's dtype.
    """
    x, y, device = _check_pair(x, y)
    temperature = check_positive("temperature", temperature)
    backend = resolve_backend(backend, op="cosine_similarity", device=device, supported=COSINE_BACKENDS)
    if backend == "torch":
        return reference.cosine_similarity(x, y, temperature=temperature)
    dtype = x.dtype
    if backend == "cpp" and dtype not in (torch.float32, torch.float64):
        x, y = x.float(), None if y is None else y.float()
    batched = x.dim() == 3
    x3 = x if batched else x.unsqueeze(0)
    y3 = x3 if y is None else (y if batched else y.unsqueeze(0))
    fused = cosine_similarity_cpp if backend == "cpp" else cosine_similarity_triton
    out = fused(x3, y3, temperature)
    return (out if batched else out.squeeze(0)).to(dtype)


@torch.library.custom_op("s2dc::cosine_similarity_cpp", mutates_args=())
def cosine_similarity_cpp(x: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    """The C++ forward: S (B, N, M) of x (B, N, D), y (B, M, D) (y may be x itself), float32 / float64."""
    extension()  # registers torch.ops.s2dc_C
    return torch.ops.s2dc_C.cosine_forward(x, y, temperature)


@torch.library.custom_op("s2dc::cosine_similarity_triton", mutates_args=())
def cosine_similarity_triton(x: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    """The Triton forward: S (B, N, M) of x (B, N, D), y (B, M, D) (y may be x itself)."""
    from .triton_kernels import similarity as triton_similarity

    return triton_similarity.cosine_similarity(x, y, temperature)


def _cosine_fake(x, y, temperature):
    return x.new_empty(x.shape[0], x.shape[1], y.shape[1])


cosine_similarity_cpp.register_fake(_cosine_fake)
cosine_similarity_triton.register_fake(_cosine_fake)


@torch.library.custom_op("s2dc::cosine_similarity_cpp_backward", mutates_args=())
def cosine_similarity_cpp_backward(
    grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dx, dL/dy) given dL/dS (B, N, M): BLAS products of one scaled copy of dL/dS with y and x, then
    the normalisation's Jacobian projected out of each row (csrc/cpu/cosine.h)."""
    extension()  # registers torch.ops.s2dc_C
    return tuple(torch.ops.s2dc_C.cosine_backward(grad, x, y, temperature))


@torch.library.custom_op("s2dc::cosine_similarity_triton_backward", mutates_args=())
def cosine_similarity_triton_backward(
    grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dx, dL/dy) given dL/dS (B, N, M): Triton matmuls with the norm scales fused (no normalised
    copies), then the normalisation's Jacobian per row."""
    from .triton_kernels import similarity as triton_similarity

    return tuple(triton_similarity.cosine_similarity_backward(grad, x, y, temperature))


def _cosine_backward_fake(grad, x, y, temperature):
    return torch.empty_like(x), torch.empty_like(y)


cosine_similarity_cpp_backward.register_fake(_cosine_backward_fake)
cosine_similarity_triton_backward.register_fake(_cosine_backward_fake)


def _cosine_setup_context(ctx, inputs, output):
    x, y, temperature = inputs
    ctx.save_for_backward(x, y)
    ctx.temperature = temperature


def _cosine_backward_with(backward_op):
    """The autograd formula of a fused cosine forward whose gradients come from backward_op."""

    def cosine_backward(ctx, grad):
        x, y = ctx.saved_tensors
        grad_x, grad_y = backward_op(grad, x, y, ctx.temperature)
        return grad_x, grad_y, None

    return cosine_backward


cosine_similarity_cpp.register_autograd(
    _cosine_backward_with(cosine_similarity_cpp_backward), setup_context=_cosine_setup_context
)
cosine_similarity_triton.register_autograd(
    _cosine_backward_with(cosine_similarity_triton_backward), setup_context=_cosine_setup_context
)


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
        backend: "auto", "torch" (the reference: the (B, N, M) score matrix), "cpp" (CPU tensors, the
            compiled extension: memory O(B N k) plus a bounded tile per thread) or "triton" (score tiles by
            tl.dot reduced to running top-k lists on chip for k <= 128 in fp16 / bf16 / fp32, memory
            O(B N k); larger k and fp64: row blocks scored against all of y in a 64 MB scratch and
            torch.topk). In "cpp" and "triton", l2 neighbours are ranked by the GEMM expansion of the
            distance, so pairs whose distances differ by rounding may swap; the values are exact.
            float16 / bfloat16 are computed in float32 (the Triton kernels load them as they are and
            accumulate in fp32; "torch" on CUDA tensors runs the reference in the input dtype).

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
    dtype = x.dtype
    if device.type == "cpu" and backend != "triton" and dtype in (torch.float16, torch.bfloat16):
        # No half kernels on CPU (knn_forward, cdist): float32 scores and values (differentiable casts),
        # the values rounded to the input dtype at the end. Triton takes fp16 / bf16 itself.
        x, y = x.float(), None if y is None else y.float()
    if backend == "torch":
        values, indices = reference.knn(x, y, k=k, metric=metric, exclude_self=exclude_self)
    else:
        select = knn_select if backend == "cpp" else knn_select_triton
        values, indices = _knn_fused(select, x, y, k=k, metric=metric, exclude_self=exclude_self)
    return values.to(dtype), indices


@torch.library.custom_op("s2dc::knn_select", mutates_args=())
def knn_select(
    x: torch.Tensor, y: torch.Tensor | None, k: int, metric: int, exclude_self: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused CPU kernel: (values, int64 indices), (B, N, k) each, best first; y None searches x itself
    (the kernel then computes only the upper triangle of the symmetric score matrix). No autograd: the
    differentiable values are recomputed from the chosen pairs by the caller."""
    extension()  # registers torch.ops.s2dc_C
    return tuple(torch.ops.s2dc_C.knn_forward(x, x if y is None else y, k, metric, exclude_self))


@torch.library.custom_op("s2dc::knn_select_triton", mutates_args=())
def knn_select_triton(
    x: torch.Tensor, y: torch.Tensor | None, k: int, metric: int, exclude_self: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernels: (values, int64 indices), (B, N, k) each, best first; y None searches x itself.
    No autograd: the differentiable values are recomputed from the chosen pairs by the caller."""
    from .triton_kernels import similarity as triton_similarity

    return tuple(triton_similarity.knn(x, x if y is None else y, k, metric, exclude_self))


def _knn_select_fake(x, y, k, metric, exclude_self):
    return x.new_empty(*x.shape[:2], k), x.new_empty(*x.shape[:2], k, dtype=torch.int64)


knn_select.register_fake(_knn_select_fake)
knn_select_triton.register_fake(_knn_select_fake)


def _knn_fused(
    select, x: torch.Tensor, y: torch.Tensor | None, *, k: int, metric: str, exclude_self: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """knn on a fused backend ("cpp": knn_select, "triton": knn_select_triton): indices (and values) from the
    kernel; differentiable values recomputed from the chosen pairs (reference.knn_values, in float32 for
    float16 / bfloat16 inputs) when x or y requires grad. The caller casts the values to the input dtype."""
    batched = x.dim() == 3
    x3 = (x if batched else x.unsqueeze(0)).detach()
    y3 = None if y is None else (y if batched else y.unsqueeze(0)).detach()
    values, indices = select(x3, y3, k, METRICS.index(metric), exclude_self)
    if not batched:
        values, indices = values.squeeze(0), indices.squeeze(0)
    if torch.is_grad_enabled() and (x.requires_grad or (y is not None and y.requires_grad)):
        if x.dtype in (torch.float16, torch.bfloat16):  # float32 like the kernels (differentiable casts)
            x, y = x.float(), None if y is None else y.float()
        values = reference.knn_values(x, y, indices, metric)
    return values, indices


# ---------------------------------------------------------------- fused neighbourhood consistency
# neighborhood_consistency -> neighborhood_consistency_fused -> s2dc::neighborhood_fused (forward: loss,
# neighbours, weights; autograd registered, its backward s2dc::neighborhood_fused_backward) -> the
# backend's kernels: torch.ops.s2dc_C.neighborhood_forward / neighborhood_backward for "cpp"
# (csrc/cpu/neighborhood*.cpp), s2dc_kernels.triton_kernels.neighborhood for "triton". The forward keeps, per
# patch, its k teacher neighbours and the weights q - p of those slots ((B, N, k) each): all the backward
# needs besides the student rows, so no N x N matrix is kept.
NC_FUSED_BACKENDS = ("cpp", "triton")


def _nc_kernels(backend: str):
    """(forward, backward) of a fused backend."""
    if backend == "triton":
        from s2dc_kernels.triton_kernels import neighborhood as triton_neighborhood

        return triton_neighborhood.neighborhood_forward, triton_neighborhood.neighborhood_backward
    if backend == "cpp":
        extension()  # registers torch.ops.s2dc_C
        return torch.ops.s2dc_C.neighborhood_forward, torch.ops.s2dc_C.neighborhood_backward
    raise ValueError(f"backend must be one of {NC_FUSED_BACKENDS}, got {backend!r}")


@torch.library.custom_op("s2dc::neighborhood_fused", mutates_args=())
def neighborhood_fused(
    student: Tensor, teacher: Tensor, mask: Tensor | None, k: int, tau_s: float, tau_t: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """L_nc (0-dim), neighbours (B, N, k) int64 (best first; -1: invalid patch), weights q - p (B, N, k)."""
    return tuple(_nc_kernels(backend)[0](student, teacher, mask, k, tau_s, tau_t))


@neighborhood_fused.register_fake
def _(student, teacher, mask, k, tau_s, tau_t, backend):
    B, N, _ = student.shape
    return (
        student.new_empty(()),
        student.new_empty(B, N, k, dtype=torch.int64),
        student.new_empty(B, N, k),
    )


@torch.library.custom_op("s2dc::neighborhood_fused_backward", mutates_args=())
def neighborhood_fused_backward(
    student: Tensor,
    mask: Tensor | None,
    neighbours: Tensor,
    weights: Tensor,
    grad_loss: Tensor,
    tau_s: float,
    backend: str,
) -> Tensor:
    """dL/dstudent (B, N, D) from the forward's neighbours and weights and dL/dloss (0-dim)."""
    return _nc_kernels(backend)[1](student, mask, neighbours, weights, grad_loss, tau_s)


@neighborhood_fused_backward.register_fake
def _(student, mask, neighbours, weights, grad_loss, tau_s, backend):
    return torch.empty_like(student)


def _nc_setup_context(ctx, inputs, output):
    student, _, mask, _, tau_s, _, backend = inputs
    _, neighbours, weights = output
    ctx.mark_non_differentiable(neighbours, weights)
    ctx.save_for_backward(student, mask, neighbours, weights)
    ctx.tau_s, ctx.backend = tau_s, backend


def _nc_backward(ctx, grad_loss, *_):
    student, mask, neighbours, weights = ctx.saved_tensors
    grad_student = None
    if ctx.needs_input_grad[0]:
        grad_student = neighborhood_fused_backward(
            student, mask, neighbours, weights, grad_loss.contiguous(), ctx.tau_s, ctx.backend
        )
    return grad_student, None, None, None, None, None, None


neighborhood_fused.register_autograd(_nc_backward, setup_context=_nc_setup_context)


def neighborhood_consistency_fused(
    student: Tensor,
    teacher: Tensor,
    *,
    k: int,
    tau_s: float,
    tau_t: float,
    mask: Tensor | None,
    backend: str,
) -> Tensor:
    """L_nc on a fused backend (semantics of ``s2dc_kernels.reference.similarity.neighborhood_consistency``).

    For each problem b and valid patch i: J_i = the k valid teacher patches j != i of largest cos(T_i, T_j);
    p_i = softmax_{J_i} cos(T_i, T_j) / tau_t (teacher detached), q_i = softmax_{J_i} cos(S_i, S_j) / tau_s;
    the loss is the mean of KL(p_i || q_i) over the valid patches of all problems (0 when there is none).
    Ties of teacher similarity take the smaller index.

    Args:
        student: (B, N, D) floating tensor (checked by the caller); receives the gradient. float16 / bfloat16
            are computed in float32 (the loss is returned in the input dtype).
        teacher: (B, N, D), same dtype and device; no gradient.
        k: neighbours per patch, 1 <= k <= (fewest valid patches of a problem) - 1 (a patch with fewer valid
            candidates gives NaN, as the reference does).
        tau_s, tau_t: positive temperatures.
        mask: None or (B, N) bool, True = valid patch.
        backend: "cpp" (CPU tensors, float32 / float64) or "triton" (CUDA, or CPU under TRITON_INTERPRET=1).

    Returns:
        0-dim tensor in student's dtype.
    """
    if backend not in NC_FUSED_BACKENDS:
        raise ValueError(f"backend must be one of {NC_FUSED_BACKENDS}, got {backend!r}")
    dtype = student.dtype
    compute_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    loss, _, _ = neighborhood_fused(
        student.to(compute_dtype),
        teacher.detach().to(compute_dtype),
        mask,
        int(k),
        float(tau_s),
        float(tau_t),
        backend,
    )
    return loss.to(dtype)


def _nc_triton_unsupported(student: Tensor) -> str | None:
    """Why the fused Triton L_nc cannot take student (B, N, D) / (N, D), or None."""
    from s2dc_kernels.triton_kernels.neighborhood import MAX_N

    n = student.shape[-2]
    if n > MAX_N:
        return f"its kernels hold a problem's rows in registers: N <= {MAX_N}, got N = {n} (use 'torch')"
    return None


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
        backend: "auto", "torch" (the reference), "cpp" (CPU tensors: fused C++ forward and backward,
            multi-threaded, at most one N x N tile per thread) or "triton" (one program per problem and
            16-row block; N <= 512: "auto" takes the next backend of its order beyond that, an explicit
            "triton" is a ValueError). The fused backends break exact ties of teacher similarity towards the
            smaller index; float16 / bfloat16 are computed in float32.

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
    backend = resolve_backend(
        backend,
        op="neighborhood_consistency",
        device=device,
        supported=NC_BACKENDS,
        cannot_take=lambda b: _nc_triton_unsupported(student) if b == "triton" else None,
    )
    if backend == "torch":
        return reference.neighborhood_consistency(student, teacher, k=k, tau_s=tau_s, tau_t=tau_t, mask=mask)
    if student.dim() == 2:
        student, teacher = student.unsqueeze(0), teacher.unsqueeze(0)
        mask = None if mask is None else mask.unsqueeze(0)
    return neighborhood_consistency_fused(
        student, teacher, k=k, tau_s=tau_s, tau_t=tau_t, mask=mask, backend=backend
    )
