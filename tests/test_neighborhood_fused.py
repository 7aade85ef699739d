"""Fused neighbourhood-consistency kernels ("cpp", "triton") against the reference: loss and gradient."""

import pytest
import torch
from conftest import backend_params, require_backend

import s2dc_kernels.similarity as public
from s2dc_kernels import _utils
from s2dc_kernels._utils import resolve_backend
from s2dc_kernels.reference.similarity import neighborhood_consistency as reference
from s2dc_kernels.similarity import neighborhood_consistency_fused, neighborhood_fused

BACKENDS = backend_params(("cpp", "triton"))
TAU_S, TAU_T = 0.1, 0.04


def _tolerances(dtype: torch.dtype) -> dict:
    # float32: the kernels compute the cosines as <x_i, x_j> / (|x_i| |x_j|) instead of the dot of normalised
    # rows, a few ulp apart, amplified by 1 / tau_t = 25 in the logits: 1e-5 relative holds with margin.
    return dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)


def _check_against_reference(student, teacher, k, mask, backend, *, dtype):
    """Loss and student gradient of the fused backend against the reference (same inputs, same dtype)."""
    student = student.detach().requires_grad_()
    expected = reference(student, teacher, k=k, tau_s=TAU_S, tau_t=TAU_T, mask=mask)
    (expected_grad,) = torch.autograd.grad(expected, student)
    loss = neighborhood_consistency_fused(
        student, teacher, k=k, tau_s=TAU_S, tau_t=TAU_T, mask=mask, backend=backend
    )
    (grad,) = torch.autograd.grad(loss, student)
    tol = _tolerances(dtype)
    assert loss.shape == () and loss.dtype == dtype
    torch.testing.assert_close(loss, expected, **tol)
    scale = expected_grad.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(grad / scale, expected_grad / scale, **tol)
    return loss, grad


# (B, N, D, k): odd sizes, k = 1, k = N - 1, D below and above the kernels' D chunk, N above a row block;
# B = 1 with N = 50 makes the C++ forward split the problem into row blocks (whole problems otherwise).
SHAPES = [(2, 13, 7, 3), (3, 9, 5, 1), (1, 8, 33, 7), (2, 21, 40, 5), (1, 50, 20, 6)]
CPP_ONLY_SHAPES = [(5, 37, 50, 8), (7, 144, 64, 8)]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape", SHAPES + CPP_ONLY_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(backend, device, dtype, masked, shape):
    require_backend(backend, device)
    if backend == "triton" and device == "cpu" and shape in CPP_ONLY_SHAPES:
        pytest.skip("interpreter: small shapes only")
    B, N, D, k = shape
    student = torch.randn(B, N, D, dtype=dtype, device=device)
    teacher = torch.randn(B, N, D, dtype=dtype, device=device)
    mask = None
    if masked:  # drop patches at random, keeping k + 1 valid ones per problem (k = N - 1 keeps all)
        mask = torch.rand(B, N, device=device) > 0.3
        mask[:, : k + 1] = True
    _check_against_reference(student, teacher, k, mask, backend, dtype=dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_k_is_fewest_valid_minus_one(backend, device):
    """k = (fewest valid patches) - 1: the sparsest problem's patches each take all other valid ones."""
    require_backend(backend, device)
    B, N, D, k = 3, 11, 9, 4
    mask = torch.rand(B, N, device=device) > 0.2
    mask[:, : k + 1] = True
    mask[1] = False
    mask[1, torch.tensor([0, 3, 5, 8, 10])] = True  # exactly k + 1 valid
    student = torch.randn(B, N, D, dtype=torch.float64, device=device)
    teacher = torch.randn(B, N, D, dtype=torch.float64, device=device)
    _, grad = _check_against_reference(student, teacher, k, mask, backend, dtype=torch.float64)
    assert (grad[~mask] == 0).all()  # invalid patches are neither anchors nor neighbours


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_student_equal_to_teacher(backend, device, dtype):
    require_backend(backend, device)
    teacher = torch.randn(2, 15, 12, dtype=dtype, device=device)
    _check_against_reference(teacher.clone(), teacher, 4, None, backend, dtype=dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ties(backend, device):
    """Duplicated patches (equal in teacher and student) tie; which one is taken must not change the loss nor
    the gradient summed over each group of duplicates."""
    require_backend(backend, device)
    B, D, k = 2, 6, 5  # N = 12
    base = torch.randn(B, 6, D, dtype=torch.float64, device=device)
    teacher = base.repeat(1, 2, 1)  # rows i and i + 6 equal
    student = teacher + 0.5 * torch.randn(B, 6, D, dtype=torch.float64, device=device).repeat(1, 2, 1)
    student.requires_grad_()
    expected = reference(student, teacher, k=k, tau_s=TAU_S, tau_t=TAU_T)
    (expected_grad,) = torch.autograd.grad(expected, student)
    loss = neighborhood_consistency_fused(
        student, teacher, k=k, tau_s=TAU_S, tau_t=TAU_T, mask=None, backend=backend
    )
    (grad,) = torch.autograd.grad(loss, student)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    group_sum = lambda g: g[:, :6] + g[:, 6:]  # noqa: E731
    torch.testing.assert_close(group_sum(grad), group_sum(expected_grad), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_batch(backend, device):
    require_backend(backend, device)
    student = torch.randn(0, 7, 5, device=device, requires_grad=True)
    loss = neighborhood_consistency_fused(
        student,
        torch.randn(0, 7, 5, device=device),
        k=3,
        tau_s=TAU_S,
        tau_t=TAU_T,
        mask=None,
        backend=backend,
    )
    assert loss.shape == () and loss.item() == 0
    loss.backward()
    assert student.grad.shape == student.shape


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_too_few_valid_is_nan_like_reference(backend, device):
    """k above (valid patches - 1) of a problem (unchecked here): NaN, as the reference gives."""
    require_backend(backend, device)
    student = torch.randn(2, 8, 5, dtype=torch.float64, device=device)
    teacher = torch.randn(2, 8, 5, dtype=torch.float64, device=device)
    mask = torch.ones(2, 8, dtype=torch.bool, device=device)
    mask[1, 3:] = False  # 3 valid patches, k = 4
    expected = reference(student, teacher, k=4, tau_s=TAU_S, tau_t=TAU_T, mask=mask)
    loss = neighborhood_consistency_fused(
        student, teacher, k=4, tau_s=TAU_S, tau_t=TAU_T, mask=mask, backend=backend
    )
    assert expected.isnan() and loss.isnan()


def test_gradcheck_cpp():
    require_backend("cpp", "cpu")
    student = torch.randn(2, 9, 6, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 9, 6, dtype=torch.float64)
    mask = torch.tensor([[True] * 9, [True, False] * 4 + [True]])

    def loss(s):
        return neighborhood_consistency_fused(
            s, teacher, k=3, tau_s=TAU_S, tau_t=TAU_T, mask=mask, backend="cpp"
        )

    assert torch.autograd.gradcheck(loss, (student,))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck_and_compile(backend, device):
    """The custom op's fake kernel and autograd registration, and torch.compile(fullgraph=True) through it."""
    require_backend(backend, device)
    student = torch.randn(3, 10, 7, device=device, requires_grad=True)
    teacher = torch.randn(3, 10, 7, device=device)
    mask = torch.rand(3, 10, device=device) > 0.2
    mask[:, :4] = True
    torch.library.opcheck(neighborhood_fused, (student, teacher, mask, 3, TAU_S, TAU_T, backend))

    def loss(s, t, m):
        return neighborhood_consistency_fused(s, t, k=3, tau_s=TAU_S, tau_t=TAU_T, mask=m, backend=backend)

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    (expected,) = torch.autograd.grad(loss(student, teacher, mask), student)
    value = compiled(student, teacher, mask)
    (grad,) = torch.autograd.grad(value, student)
    torch.testing.assert_close(value, loss(student, teacher, mask))
    torch.testing.assert_close(grad, expected)


def test_half_precision_computed_in_float32_cpp():
    require_backend("cpp", "cpu")
    student = torch.randn(2, 11, 16)
    teacher = torch.randn(2, 11, 16)
    s_bf16 = student.bfloat16().requires_grad_()
    loss = neighborhood_consistency_fused(
        s_bf16, teacher.bfloat16(), k=4, tau_s=TAU_S, tau_t=TAU_T, mask=None, backend="cpp"
    )
    loss.backward()
    assert loss.dtype == torch.bfloat16 and s_bf16.grad.dtype == torch.bfloat16
    expected = reference(
        student.bfloat16().float(), teacher.bfloat16().float(), k=4, tau_s=TAU_S, tau_t=TAU_T
    )
    torch.testing.assert_close(loss.float(), expected, rtol=1e-2, atol=0)


def test_reference_breaks_exact_teacher_ties_towards_the_smaller_index():
    """Identical teacher rows tie exactly; the reference then takes the smaller indices, like the kernels."""
    torch.manual_seed(0)
    teacher = torch.randn(1, 23, 6, dtype=torch.float64)
    teacher[0, 3:17] = teacher[0, 2]  # patches 2..16 identical: every anchor sees 15-way ties
    student = torch.randn(1, 23, 6, dtype=torch.float64)
    loss = reference(student, teacher, k=4, tau_s=TAU_S, tau_t=TAU_T)
    # the same loss with the neighbours spelled out: the 4 best teacher similarities, ties by smaller index
    unit_t, unit_s = (torch.nn.functional.normalize(t[0], dim=-1) for t in (teacher, student))
    sim_t, sim_s = unit_t @ unit_t.T, unit_s @ unit_s.T
    total = 0.0
    for i in range(23):
        order = sorted((j for j in range(23) if j != i), key=lambda j: (-sim_t[i, j].item(), j))[:4]
        log_p = torch.log_softmax(sim_t[i, order] / TAU_T, 0)
        log_q = torch.log_softmax(sim_s[i, order] / TAU_S, 0)
        total += (log_p.exp() * (log_p - log_q)).sum()
    torch.testing.assert_close(loss, total / 23)


def test_auto_leaves_triton_for_problems_above_its_max_n(monkeypatch):
    """Where "auto" picks Triton (CUDA tensors; here CPU tensors under the interpreter, with "auto" resolving
    as on CUDA): N <= MAX_N runs Triton, N > MAX_N the next backend of the auto order (that of the other
    backends: "torch" on CUDA, "cpp" or "torch" here) with the reference's loss; an explicit "triton" with
    N > MAX_N is a ValueError naming the limit."""
    require_backend("triton", "cpu")
    from s2dc_kernels.triton_kernels.neighborhood import MAX_N

    ran = []
    fused = public.neighborhood_consistency_fused

    def recording_fused(*args, backend, **kwargs):
        ran.append(backend)
        return fused(*args, backend=backend, **kwargs)

    def recording_reference(*args, **kwargs):
        ran.append("torch")
        return reference(*args, **kwargs)

    # "auto" resolving as on CUDA: Triton first in the order.
    monkeypatch.setitem(_utils._AUTO_ORDER, "cpu", ("triton", *_utils._AUTO_ORDER["cpu"]))
    monkeypatch.setattr(public, "neighborhood_consistency_fused", recording_fused)
    monkeypatch.setattr(public.reference, "neighborhood_consistency", recording_reference)
    others = tuple(b for b in public.NC_BACKENDS if b != "triton")
    next_backend = resolve_backend("auto", op="nc", device=torch.device("cpu"), supported=others)
    for n, expected_backend in [(20, "triton"), (MAX_N, None), (MAX_N + 1, next_backend)]:
        if expected_backend is None:  # MAX_N itself: checked without running the interpreter on it
            assert public._nc_triton_unsupported(torch.empty(1, n, 5)) is None
            continue
        student, teacher = torch.randn(1, n, 5), torch.randn(1, n, 5)
        ran.clear()
        loss = public.neighborhood_consistency(student, teacher, k=3, tau_s=TAU_S, tau_t=TAU_T)
        assert ran == [expected_backend]
        torch.testing.assert_close(loss, reference(student, teacher, k=3, tau_s=TAU_S, tau_t=TAU_T))
    with pytest.raises(ValueError, match=f"N <= {MAX_N}, got N = {MAX_N + 1}"):
        public.neighborhood_consistency(student, teacher, k=3, backend="triton")


@pytest.mark.cuda
def test_auto_on_cuda_above_triton_max_n_runs_the_reference():
    """The real thing on a GPU: "auto" is Triton there, and N = MAX_N + 1 falls back to the reference
    (float64: the same numbers), while backend="triton" raises."""
    require_backend("triton", "cuda")
    from s2dc_kernels.triton_kernels.neighborhood import MAX_N

    cuda = torch.device("cuda")
    assert resolve_backend("auto", op="nc", device=cuda, supported=public.NC_BACKENDS) == "triton"
    student = torch.randn(2, MAX_N + 1, 24, dtype=torch.float64, device="cuda", requires_grad=True)
    teacher = torch.randn(2, MAX_N + 1, 24, dtype=torch.float64, device="cuda")
    loss = public.neighborhood_consistency(student, teacher, k=8, tau_s=TAU_S, tau_t=TAU_T)
    expected = reference(student, teacher, k=8, tau_s=TAU_S, tau_t=TAU_T)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(*(torch.autograd.grad(v, student)[0] for v in (loss, expected)))
    with pytest.raises(ValueError, match=f"N <= {MAX_N}"):
        public.neighborhood_consistency(student, teacher, k=8, backend="triton")
