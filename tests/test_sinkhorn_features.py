"""sinkhorn_features: every backend against ``sinkhorn`` on the explicitly built cost (potentials, value,
envelope gradients), per-problem stops, the split-column path of the Triton kernels, layouts and errors."""

import math
import sys

import pytest
import torch
from conftest import backend_params, require_backend

import s2dc_kernels as sk
from s2dc_kernels.sinkhorn import FEATURE_BACKENDS, sinkhorn_solve

BACKENDS = backend_params(FEATURE_BACKENDS)
COSTS = ("cosine", "sqeuclidean", "dot")
EPS = {"cosine": 0.1, "sqeuclidean": 1.0, "dot": 0.5}  # a few percent of each cost's spread
# (B, N, M, d): odd sides; the second shape has d past one feature chunk of fp64 tiles (64) and more
# columns than one fp32 column block (64), so forced splits really split.
SHAPES = {"triton": [(2, 7, 5, 3), (1, 19, 70, 67)], "torch": [(3, 7, 5, 3), (2, 37, 70, 67)]}
SHAPES["cpp"] = SHAPES["torch"]


def explicit_cost(x, y, cost):
    """cost(x, y) (B, N, M) straight from its definition (no expansion of the square)."""
    if cost == "cosine":
        return 1 - (x @ y.mT) / (x.norm(dim=-1)[..., :, None] * y.norm(dim=-1)[..., None, :])
    if cost == "sqeuclidean":
        return ((x[..., :, None, :] - y[..., None, :, :]) ** 2).sum(-1)
    return -(x @ y.mT)


def random_marginals(B, n, dtype, device="cpu", zero=False):
    w = torch.rand(B, n, dtype=dtype, device=device) + 0.1
    if zero:
        w[0, n // 2] = 0.0  # a point that takes no mass
    return w / w.sum(-1, keepdim=True)


def assert_close(actual, expected, rtol, atol=0.0):
    """allclose (inf where the other is the same inf) that reports the worst entry."""
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    bad = ~torch.isclose(actual, expected, rtol=rtol, atol=atol)
    if bad.any():
        i = torch.where(bad.flatten())[0][0]
        raise AssertionError(
            f"{int(bad.sum())}/{bad.numel()} entries differ; first at {i.item()}: "
            f"{actual.flatten()[i].item()} vs {expected.flatten()[i].item()}"
        )


def assert_close_scaled(actual, expected, rtol):
    """Within rtol of the largest finite |expected| (cancelling entries carry its rounding), inf alike."""
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual).cpu(), finite.cpu())
    scale = expected[finite].abs().max().item() if finite.any() else 1.0
    assert_close(actual[finite], expected[finite], rtol=rtol, atol=rtol * scale)


def reference(x, y, a, b, cost, **kw):
    """f, g, value and the value's gradient to (x, y, a, b) by ``sinkhorn`` on the explicit cost, in fp64."""
    leaves = [t.detach().double().requires_grad_() for t in (x, y, a, b)]
    C = explicit_cost(leaves[0], leaves[1], cost)
    _, f, g, value = sk.sinkhorn(
        C,
        leaves[2],
        leaves[3],
        backend="torch",
        grad="envelope",
        return_potentials=True,
        return_value=True,
        **kw,
    )
    weights = torch.arange(1, value.shape[0] + 1, dtype=value.dtype)  # a different weight per problem
    return f, g, value, torch.autograd.grad((weights * value).sum(), leaves)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cost", COSTS)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_matches_sinkhorn_on_explicit_cost(backend, device, cost, dtype):
    require_backend(backend, device)
    for B, N, M, d in SHAPES[backend]:
        x = torch.randn(B, N, d, dtype=dtype, device=device, requires_grad=True)
        y = torch.randn(B, M, d, dtype=dtype, device=device, requires_grad=True)
        a = random_marginals(B, N, dtype, device, zero=True).requires_grad_()
        b = random_marginals(B, M, dtype, device, zero=True).requires_grad_()
        kw = dict(eps=EPS[cost], n_iters=12)
        f, g, value = sk.sinkhorn_features(x, y, a, b, cost=cost, backend=backend, return_value=True, **kw)
        assert f.dtype == g.dtype == value.dtype == dtype and f.shape == (B, N) and value.shape == (B,)
        ref_f, ref_g, ref_value, ref_grads = reference(x, y, a, b, cost, **kw)
        weights = torch.arange(1, B + 1, dtype=dtype, device=device)
        grads = torch.autograd.grad((weights * value).sum(), (x, y, a, b))
        rtol = 1e-9 if dtype == torch.float64 else 1e-5
        for ours, theirs in zip((f, g, value), (ref_f, ref_g, ref_value), strict=True):
            assert_close_scaled(ours, theirs, rtol)
        # the plan amplifies the rounding of the fp32 cost by |C| / eps in its exponent
        grad_rtol = 1e-9 if dtype == torch.float64 else 1e-4
        for ours, theirs in zip(grads, ref_grads, strict=True):
            assert torch.isfinite(ours).all()
            assert_close_scaled(ours, theirs, grad_rtol)


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] == "triton"])
def test_triton_split_columns(backend, device, monkeypatch):
    """Column splits with partial LSEs and the finish kernel (forced: tiny problems never split on their own),
    with and without the per-problem stop."""
    require_backend(backend, device)
    monkeypatch.setenv("S2DC_FEATURES_SPLITS", "3")  # fp64 tiles: 3 x 2 column blocks, 2 x 1 row blocks
    x = torch.randn(2, 40, 6, dtype=torch.float64, device=device)
    y = torch.randn(2, 70, 6, dtype=torch.float64, device=device)
    a = random_marginals(2, 40, torch.float64, device, zero=True)
    for tol in (None, 1e-3):
        kw = dict(eps=0.5, n_iters=8, cost="sqeuclidean", tol=tol)
        f, g, value = sk.sinkhorn_features(x, y, a, backend=backend, return_value=True, **kw)
        ref_f, ref_g, ref_value = sk.sinkhorn_features(
            x.cpu(), y.cpu(), a.cpu(), backend="torch", return_value=True, **kw
        )
        for ours, theirs in zip((f, g, value), (ref_f, ref_g, ref_value), strict=True):
            assert_close_scaled(ours, theirs, 1e-9)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_tol_stops_each_problem(backend, device):
    require_backend(backend, device)
    x, y = torch.randn(3, 9, 4, dtype=torch.float64), torch.randn(3, 6, 4, dtype=torch.float64)
    x[1] *= 1.2  # a harder problem converges later
    x, y = x.to(device), y.to(device)
    kw = dict(eps=1.0, n_iters=60, tol=1e-6)
    f, g = sk.sinkhorn_features(x, y, cost="sqeuclidean", backend=backend, **kw)
    C = explicit_cost(x.cpu(), y.cpu(), "sqeuclidean")
    ref_f, ref_g = sk.sinkhorn(C, backend="torch", return_potentials=True, **kw)[1:]
    assert_close_scaled(f, ref_f, 1e-9)
    assert_close_scaled(g, ref_g, 1e-9)
    log_a = torch.full((3, 9), -math.log(9), dtype=torch.float64)
    log_b = torch.full((3, 6), -math.log(6), dtype=torch.float64)
    n_done = sinkhorn_solve(C, log_a, log_b, 1.0, 60, 1e-6, "torch")[4]
    assert (n_done < 60).all() and len(set(n_done.tolist())) > 1  # the stops are per problem
    # without the stop the potentials move on: the comparison above can tell them apart
    f_all = sk.sinkhorn(C, backend="torch", return_potentials=True, eps=1.0, n_iters=60)[1]
    assert (f_all - ref_f).abs().max() > 1e-8


def test_envelope_gradient_matches_finite_differences():
    """At a converged solve the envelope gradient of the value is the gradient of the value."""
    x = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)

    def value(x, y):
        kw = dict(eps=0.3, n_iters=3000, tol=1e-13, cost="cosine", backend="torch", return_value=True)
        return sk.sinkhorn_features(x, y, **kw)[2].sum()

    grads = torch.autograd.grad(value(x, y), (x, y))
    for i, (leaf, grad) in enumerate(zip((x, y), grads, strict=True)):
        direction = torch.randn_like(leaf)
        args = [x.detach(), y.detach()]
        h = 1e-6
        shifted = [[t + s * h * direction if j == i else t for j, t in enumerate(args)] for s in (1, -1)]
        fd = (value(*shifted[0]) - value(*shifted[1])) / (2 * h)
        assert_close((grad * direction).sum(), fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_detach_unbatched_and_no_value(backend, device):
    require_backend(backend, device)
    x = torch.randn(7, 3, device=device, requires_grad=True)
    y = torch.randn(5, 3, device=device, requires_grad=True)
    a = random_marginals(1, 7, torch.float32, device)[0]
    f, g, value = sk.sinkhorn_features(x, y, a, n_iters=8, grad="detach", backend=backend, return_value=True)
    assert f.shape == (7,) and g.shape == (5,) and value.shape == ()
    assert not (f.requires_grad or g.requires_grad or value.requires_grad)
    ref_f, ref_g, ref_value = sk.sinkhorn_features(
        x[None], y[None], a, n_iters=8, backend=backend, return_value=True
    )
    for ours, theirs in zip((f, g, value), (ref_f[0], ref_g[0], ref_value[0]), strict=True):
        assert_close_scaled(ours, theirs, 1e-6)
    f2, g2 = sk.sinkhorn_features(
        x, y, a, n_iters=8, backend=backend
    )  # envelope: the potentials are constants
    assert not (f2.requires_grad or g2.requires_grad)
    assert_close_scaled(f2, f, 1e-6)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_batch(backend, device):
    require_backend(backend, device)
    x = torch.randn(0, 4, 3, device=device, requires_grad=True)
    y = torch.randn(0, 5, 3, device=device, requires_grad=True)
    f, g, value = sk.sinkhorn_features(x, y, n_iters=3, backend=backend, return_value=True)
    assert f.shape == (0, 4) and g.shape == (0, 5) and value.shape == (0,)
    grads = torch.autograd.grad(value.sum(), (x, y), allow_unused=True)
    assert all(gr is None or gr.shape == t.shape for gr, t in zip(grads, (x, y), strict=True))


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] == "triton"])
def test_torch_compile_fullgraph(backend, device):
    require_backend(backend, device)
    x = torch.randn(2, 5, 3, dtype=torch.float64, device=device, requires_grad=True)
    y = torch.randn(2, 4, 3, dtype=torch.float64, device=device)

    def loss(x):
        f, g, value = sk.sinkhorn_features(x, y, eps=0.2, n_iters=4, backend=backend, return_value=True)
        return value.sum() + f.sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x), loss(x), rtol=1e-12)
    assert_close(torch.autograd.grad(compiled(x), x)[0], torch.autograd.grad(loss(x), x)[0], rtol=1e-12)


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] == "triton"])
def test_opcheck(backend, device):
    require_backend(backend, device)
    dev = dict(dtype=torch.float64, device=device)
    X, Y = torch.randn(2, 5, 3, **dev), torch.randn(2, 4, 3, **dev)
    alpha, beta = (X * X).sum(-1), (Y * Y).sum(-1)
    log_a, log_b = torch.full((2, 5), -math.log(5), **dev), torch.full((2, 4), -math.log(4), **dev)
    solve = torch.ops.s2dc.sinkhorn_features_solve
    torch.library.opcheck(solve, (X, Y, alpha, beta, log_a, log_b, 2.0, 0.5, 3, 0.0, False))
    f, g = solve(X, Y, alpha, beta, log_a, log_b, 2.0, 0.5, 3, 0.0, False)
    leaves = [t.clone().requires_grad_() for t in (X, Y, alpha, beta)]
    args = (*leaves, f, g, f - 0.5 * log_a, g - 0.5 * log_b, 2.0, 0.5, False)
    torch.library.opcheck(torch.ops.s2dc.sinkhorn_features_value, args)


def test_half_features_torch_backend():
    x, y = torch.randn(2, 7, 4), torch.randn(2, 5, 4)
    f, g, value = sk.sinkhorn_features(
        x.bfloat16(), y.bfloat16(), n_iters=6, backend="torch", return_value=True
    )
    assert f.dtype == g.dtype == value.dtype == torch.bfloat16
    ref = sk.sinkhorn_features(x.bfloat16().float(), y.bfloat16().float(), n_iters=6, return_value=True)
    for ours, theirs in zip((f, g, value), ref, strict=True):
        assert_close_scaled(ours.float(), theirs, 1e-2)  # the bf16 rounding of the outputs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.cuda
def test_half_features_cuda(dtype):
    """fp16/bf16 features go into the tensor cores with fp32 accumulation: the same as fp32 on the features
    rounded to that dtype (cosine: normalised in fp32, then rounded), up to fp32 summation order."""
    require_backend("triton", "cuda")
    x = torch.randn(2, 300, 64, device="cuda").to(dtype)
    y = torch.randn(2, 257, 64, device="cuda").to(dtype)
    for cost in COSTS:
        kw = dict(eps=EPS[cost], n_iters=20, cost=cost, return_value=True)
        f, g, value = sk.sinkhorn_features(x, y, backend="triton", **kw)
        assert f.dtype == dtype
        xs, ys = x.float(), y.float()
        if cost == "cosine":
            xs = torch.nn.functional.normalize(xs, dim=-1).to(dtype).float()
            ys = torch.nn.functional.normalize(ys, dim=-1).to(dtype).float()
            kw["cost"] = "dot"  # 1 - x.y on the rounded unit rows: the constant 1 shifts f by 1
        ref_f, _, ref_value = sk.sinkhorn_features(xs.double(), ys.double(), backend="torch", **kw)
        shift = 1.0 if cost == "cosine" else 0.0  # C + 1 shifts f and the value by 1, g not at all
        # bf16 / fp16 rounding of the returned potentials (8 / 11 bits)
        rtol = 1e-2 if dtype == torch.bfloat16 else 2e-3
        assert_close_scaled(f.double(), ref_f + shift, rtol)
        assert_close_scaled(value.double(), ref_value + shift, rtol)


@pytest.mark.cuda
def test_tf32_features_cuda(monkeypatch):
    """With allow_tf32 the fp32 scores are tf32 products (10-bit mantissas): the potentials stay within
    the cost's tf32 rounding of the exact ones."""
    require_backend("triton", "cuda")
    x = torch.randn(2, 300, 128, device="cuda")
    y = torch.randn(2, 257, 128, device="cuda")
    kw = dict(eps=0.1, n_iters=20, cost="cosine", return_value=True)
    exact = sk.sinkhorn_features(x, y, backend="triton", **kw)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    fast = sk.sinkhorn_features(x, y, backend="triton", **kw)
    for ours, theirs in zip(fast, exact, strict=True):
        assert_close_scaled(ours, theirs, 5e-3)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(x=torch.rand(4, 3).int()), TypeError, "x must be a floating-point"),
        (dict(x=torch.rand(4)), ValueError, "x must have"),
        (dict(y=torch.rand(2, 5, 3)), ValueError, "y must have 2"),
        (dict(y=torch.rand(5, 2)), ValueError, "y must have shape"),
        (dict(y=torch.rand(5, 3).double()), TypeError, "y must have the dtype"),
        (dict(x=torch.full((4, 3), math.nan)), ValueError, "x contains NaN"),
        (dict(x=torch.rand(0, 3)), ValueError, "at least one point"),
        (dict(a=torch.rand(5)), ValueError, "a must have shape"),
        (dict(b=-torch.rand(5)), ValueError, "b has negative"),
        (dict(a=torch.full((4,), 0.5)), ValueError, "same total mass"),
        (dict(eps=0.0), ValueError, "eps must be"),
        (dict(n_iters=0), ValueError, "n_iters must be"),
        (dict(tol=-1.0), ValueError, "tol must be"),
        (dict(cost="l1"), ValueError, "cost must be one of"),
        (dict(grad="unroll"), ValueError, "grad must be one of"),
        (dict(grad="implicit"), ValueError, "grad must be one of"),
        (dict(backend="cuda"), ValueError, "does not implement sinkhorn_features"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = {"x": torch.rand(4, 3), "y": torch.rand(5, 3), **kwargs}
    with pytest.raises(error, match=match):
        sk.sinkhorn_features(args.pop("x"), args.pop("y"), **args)


def test_auto_is_cpp_on_cpu(monkeypatch):
    """ "auto" on CPU tensors is the cpp backend (the interpreter is not a backend to pick by default)."""
    require_backend("cpp", "cpu")
    sinkhorn_module = sys.modules[sk.sinkhorn_features.__module__]  # the module, shadowed by the function

    def no_triton(*args):
        raise AssertionError("the Triton path ran")

    x, y = torch.randn(6, 3), torch.randn(4, 3)
    expected = sk.sinkhorn_features(x, y, n_iters=5, backend="cpp")
    monkeypatch.setattr(sinkhorn_module, "_triton_features", no_triton)
    for ours, theirs in zip(sk.sinkhorn_features(x, y, n_iters=5), expected, strict=True):
        assert torch.equal(ours, theirs)
