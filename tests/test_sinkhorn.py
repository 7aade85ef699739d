"""Sinkhorn and dustbin OT: references against POT and independent formulas, every backend against them."""

import math

import pytest
import torch
from conftest import backend_params, cuda_marks, require_backend

import s2dc_kernels as sk
from s2dc_kernels import reference as ref
from s2dc_kernels.sinkhorn import SOLVER_BACKENDS, sinkhorn_solve

# Every backend, plus Triton's split regime (one launch per half-step) beside its one-program regime.
BACKENDS = backend_params(SOLVER_BACKENDS) + [
    pytest.param("triton", d, id=f"triton-split-{d}", marks=[pytest.mark.split_regime, *cuda_marks(d)])
    for d in ("cpu", "cuda")
]
# The Triton interpreter costs ~1 ms per program step: small shapes for it, odd non-powers of two for all.
SHAPES = {"triton": [(2, 7, 5), (1, 37, 70)], "default": [(3, 7, 5), (2, 37, 70), (5, 123, 61)]}
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}


@pytest.fixture(autouse=True)
def _triton_regime(request, monkeypatch):
    """Triton tests run the regime their id names, whatever the shape (`split_regime` marker)."""
    split = request.node.get_closest_marker("split_regime") is not None
    monkeypatch.setenv("S2DC_TRITON_SINKHORN_REGIME", "split" if split else "program")


def shapes_for(backend):
    return SHAPES.get(backend, SHAPES["default"])


def random_marginals(B, n, dtype, device="cpu", zero=False):
    w = torch.rand(B, n, dtype=dtype, device=device) + 0.1
    if zero:
        w[0, n // 2] = 0.0  # a row/column that takes no mass
    return w / w.sum(-1, keepdim=True)


def assert_close(actual, expected, **tol):
    """allclose that reports how many entries differ and the worst one."""
    if not tol:
        tol = TOL[expected.dtype]
    actual, expected = actual.cpu(), expected.cpu()
    bad = ~torch.isclose(actual, expected, **tol)
    if bad.any():
        i = (actual - expected).abs().argmax()
        raise AssertionError(
            f"{int(bad.sum())}/{bad.numel()} entries differ; worst at {i.item()}: "
            f"{actual.flatten()[i].item()} vs {expected.flatten()[i].item()}"
        )


# ---------------------------------------------------------------- the reference is right
@pytest.mark.parametrize("B,N,M", [(3, 7, 5), (1, 16, 9)])
@pytest.mark.parametrize("uniform", [True, False])
def test_reference_equals_pot(B, N, M, uniform):
    ot_batch = pytest.importorskip("ot.batch")  # a test dependency; the GPU machine may lack it
    C = torch.rand(B, N, M, dtype=torch.float64)
    a = b = None
    if not uniform:
        a, b = random_marginals(B, N, torch.float64), random_marginals(B, M, torch.float64)
    pot = ot_batch.solve_batch(C, reg=0.05, a=a, b=b, method="log_sinkhorn", max_iter=40, tol=0)
    assert_close(ref.sinkhorn(C, a, b, eps=0.05, n_iters=40), pot.plan)


def test_reference_equals_scaling_sinkhorn():
    """Independent formula: u = a / (K v), v = b / (K^T u), P = diag(u) K diag(v) with K = exp(-C / eps)."""
    C = torch.rand(6, 4, dtype=torch.float64)
    a, b = random_marginals(1, 6, torch.float64)[0], random_marginals(1, 4, torch.float64)[0]
    K = torch.exp(-C / 0.3)
    v = torch.ones(4, dtype=torch.float64)
    for _ in range(25):
        u = a / (K @ v)
        v = b / (K.T @ u)
    assert_close(ref.sinkhorn(C, a, b, eps=0.3, n_iters=25), u[:, None] * K * v[None, :])


def test_reference_dustbin_is_sinkhorn_on_augmented_matrix():
    scores, alpha = torch.randn(2, 5, 3, dtype=torch.float64), 0.7
    N, M = 5, 3
    Z = torch.full((2, N + 1, M + 1), alpha, dtype=torch.float64)
    Z[:, :N, :M] = scores
    mu = torch.cat([torch.full((N,), 1.0), torch.tensor([M])]).double() / (N + M)
    nu = torch.cat([torch.full((M,), 1.0), torch.tensor([N])]).double() / (N + M)
    P = ref.sinkhorn(-Z, mu, nu, eps=1.0, n_iters=30)
    assert_close(ref.log_optimal_transport(scores, alpha, 30).exp(), P * (N + M))


# ---------------------------------------------------------------- every backend equals the reference
def _dot(w, x):
    return (w * torch.where(w != 0, x, 0.0)).sum()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_sinkhorn_forward_backward(backend, device, dtype):
    require_backend(backend, device)
    for B, N, M in shapes_for(backend):
        C = torch.rand(B, N, M, dtype=dtype, device=device).requires_grad_()
        a = random_marginals(B, N, dtype, device, zero=True).requires_grad_()
        b = random_marginals(B, M, dtype, device).requires_grad_()
        kw = dict(eps=0.1, n_iters=15, return_potentials=True, return_value=True)
        ours = sk.sinkhorn(C, a, b, backend=backend, **kw)
        theirs = ref.sinkhorn(C, a, b, **kw)
        # zero-mass rows have f = -inf: no loss can use them, so they get no weight
        weights = [torch.randn_like(o) * torch.isfinite(o) for o in theirs]
        for o, t in zip(ours, theirs, strict=True):
            assert_close(o, t)
        grads = torch.autograd.grad(sum(_dot(w, o) for w, o in zip(weights, ours, strict=True)), (C, a, b))
        expected = torch.autograd.grad(
            sum(_dot(w, t) for w, t in zip(weights, theirs, strict=True)), (C, a, b)
        )
        for g, e in zip(grads, expected, strict=True):
            assert torch.isfinite(g).all()
            # relative to the gradient's scale: entries that cancel to ~0 carry the scale's rounding
            rtol = 1e-5 if dtype == torch.float32 else 1e-9
            assert_close(g, e, rtol=rtol, atol=rtol * e.abs().max().item())


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_sinkhorn_tol_stops_each_problem(backend, device):
    require_backend(backend, device)
    C = torch.rand(3, 9, 6, dtype=torch.float64, device=device)
    C[1] *= 20  # a harder problem converges later
    C.requires_grad_()
    kw = dict(eps=1.0, n_iters=60, tol=1e-6, return_potentials=True)
    ours, theirs = sk.sinkhorn(C, backend=backend, **kw), ref.sinkhorn(C, **kw)
    for o, t in zip(ours, theirs, strict=True):
        assert_close(o, t)
    assert ((ours[0].sum(-1) - 1 / 9).abs().sum(-1) < 1e-6).all()
    log_a = torch.full((3, 9), -math.log(9), dtype=torch.float64, device=device)
    log_b = torch.full((3, 6), -math.log(6), dtype=torch.float64, device=device)
    n_done = sinkhorn_solve(C.detach(), log_a, log_b, 1.0, 60, 1e-6, backend)[4]
    assert n_done.dtype == torch.int64 and (n_done < 60).all() and len(set(n_done.tolist())) > 1
    w = torch.randn_like(theirs[0])
    assert_close(
        *[torch.autograd.grad((w * p[0]).sum(), C)[0] for p in (ours, theirs)], rtol=1e-8, atol=1e-10
    )


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_sinkhorn_gradcheck(backend, device):
    require_backend(backend, device)
    C = torch.rand(2, 4, 3, dtype=torch.float64, device=device, requires_grad=True)
    a = random_marginals(2, 4, torch.float64, device).requires_grad_()
    b = random_marginals(2, 3, torch.float64, device).requires_grad_()

    def fn(C, a, b):
        return sk.sinkhorn(C, a, b, eps=0.2, n_iters=6, backend=backend, return_potentials=True)

    assert torch.autograd.gradcheck(fn, (C, a, b))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_log_optimal_transport(backend, device):
    require_backend(backend, device)
    for B, N, M in shapes_for(backend):
        scores = torch.randn(B, N, M, dtype=torch.float64, device=device, requires_grad=True)
        alpha = torch.tensor(1.0, dtype=torch.float64, device=device, requires_grad=True)
        ours = sk.log_optimal_transport(scores, alpha, 20, backend=backend)
        theirs = ref.log_optimal_transport(scores, alpha, 20)
        assert ours.shape == (B, N + 1, M + 1)
        assert_close(ours, theirs)
        w = torch.randn_like(theirs)
        grads = torch.autograd.grad((w * ours).sum(), (scores, alpha))
        expected = torch.autograd.grad((w * theirs).sum(), (scores, alpha))
        for g, e in zip(grads, expected, strict=True):
            assert_close(g, e, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    require_backend(backend, device)
    C = torch.rand(2, 5, 3, dtype=torch.float64, device=device, requires_grad=True)
    log_a = torch.full((2, 5), -math.log(5), dtype=torch.float64, device=device)
    log_b = torch.full((2, 3), -math.log(3), dtype=torch.float64, device=device)
    torch.library.opcheck(sinkhorn_solve, (C, log_a, log_b, 0.1, 4, 0.0, backend))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    require_backend(backend, device)
    C = torch.rand(2, 5, 3, dtype=torch.float64, device=device, requires_grad=True)

    def loss(C):
        P, f, g = sk.sinkhorn(C, eps=0.1, n_iters=5, backend=backend, return_potentials=True)
        return (P * C).sum() + f.sum() + sk.log_optimal_transport(C, 1.0, 3, backend=backend).exp().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    assert_close(compiled(C), loss(C))
    assert_close(torch.autograd.grad(compiled(C), C)[0], torch.autograd.grad(loss(C), C)[0])


# ---------------------------------------------------------------- gradient modes
def _fd(fn, x, direction, h=1e-6):
    return (fn(x + h * direction) - fn(x - h * direction)) / (2 * h)


def test_implicit_gradient_matches_finite_differences_of_converged_plan():
    for N, M in ((6, 4), (3, 5)):
        C = torch.rand(2, N, M, dtype=torch.float64, requires_grad=True)
        w = torch.randn(2, N, M, dtype=torch.float64)

        def loss(C, w=w):
            return (sk.sinkhorn(C, eps=0.3, n_iters=3000, tol=1e-13, grad="implicit") * w).sum()

        (grad,) = torch.autograd.grad(loss(C), C)
        direction = torch.randn_like(C)
        assert_close((grad * direction).sum(), _fd(loss, C.detach(), direction), rtol=1e-6, atol=1e-9)


def test_envelope_gradient_is_value_gradient():
    C = torch.rand(2, 6, 4, dtype=torch.float64, requires_grad=True)
    a = random_marginals(2, 6, torch.float64).requires_grad_()
    b = random_marginals(2, 4, torch.float64).requires_grad_()

    def value(C, a, b):
        return sk.sinkhorn(C, a, b, eps=0.3, n_iters=3000, grad="envelope", return_value=True)[1].sum()

    grads = torch.autograd.grad(value(C, a, b), (C, a, b))
    d_c = torch.randn_like(C)
    d_a = torch.zeros_like(a)
    d_a[:, 1], d_a[:, 4] = 1.0, -1.0  # mass-preserving directions
    d_b = torch.zeros_like(b)
    d_b[:, 0], d_b[:, 3] = 1.0, -1.0
    C0, a0, b0 = C.detach(), a.detach(), b.detach()
    assert_close((grads[0] * d_c).sum(), _fd(lambda x: value(x, a0, b0), C0, d_c), rtol=1e-6, atol=1e-9)
    assert_close((grads[1] * d_a).sum(), _fd(lambda x: value(C0, x, b0), a0, d_a), rtol=1e-6, atol=1e-9)
    assert_close((grads[2] * d_b).sum(), _fd(lambda x: value(C0, a0, x), b0, d_b), rtol=1e-6, atol=1e-9)
    assert not sk.sinkhorn(C, grad="envelope").requires_grad


def test_detach_has_no_gradient_and_same_plan():
    C = torch.rand(2, 5, 3, requires_grad=True)
    P = sk.sinkhorn(C, grad="detach", n_iters=10)
    assert not P.requires_grad
    assert_close(P, ref.sinkhorn(C, n_iters=10).detach())


# ---------------------------------------------------------------- numerics and layouts
def test_small_eps_and_unnormalised_costs_stay_finite():
    C = torch.rand(2, 33, 17)
    P = sk.sinkhorn(C, eps=1e-3, n_iters=50)
    assert torch.isfinite(P).all()
    assert_close(P.sum(-2), torch.full((2, 17), 1 / 17), rtol=1e-4, atol=1e-6)
    P = sk.sinkhorn(C * 1e4, eps=1e-3, n_iters=10)
    assert torch.isfinite(P).all()


def test_unbatched_noncontiguous_half_and_empty():
    C = torch.rand(11, 6, dtype=torch.float64).T  # non-contiguous, unbatched
    assert_close(sk.sinkhorn(C, n_iters=9), ref.sinkhorn(C.contiguous(), n_iters=9))
    half = sk.sinkhorn(C.to(torch.bfloat16), n_iters=9)
    assert half.dtype == torch.bfloat16
    assert_close(half.double(), ref.sinkhorn(C.contiguous(), n_iters=9), rtol=2e-2, atol=1e-3)
    empty = sk.sinkhorn(torch.rand(0, 4, 3, requires_grad=True), n_iters=3)
    assert empty.shape == (0, 4, 3)
    assert sk.log_optimal_transport(torch.rand(0, 4, 3), 1.0, 3).shape == (0, 5, 4)


# ---------------------------------------------------------------- bad input
BAD_SINKHORN = [
    (dict(cost=[[1.0]]), TypeError, "cost"),
    (dict(cost=torch.ones(2, 3, dtype=torch.int64)), TypeError, "cost"),
    (dict(cost=torch.rand(2, 2, 3, 3)), ValueError, "cost"),
    (dict(cost=torch.rand(2, 0, 3)), ValueError, "cost"),
    (dict(cost=torch.tensor([[0.0, float("nan")]])), ValueError, "cost"),
    (dict(cost=torch.tensor([[0.0, float("inf")]])), ValueError, "cost"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(eps="0.1"), TypeError, "eps"),
    (dict(n_iters=0), ValueError, "n_iters"),
    (dict(n_iters=2.5), TypeError, "n_iters"),
    (dict(tol=-1.0), ValueError, "tol"),
    (dict(grad="autodiff"), ValueError, "grad"),
    (dict(backend="gpu"), ValueError, "backend"),
    (dict(a=torch.ones(2, 4) / 4), ValueError, "a"),
    (dict(a=torch.ones(3, 5) / 5), ValueError, "a"),
    (dict(a=torch.tensor([0.5, 0.7, -0.2, 0.0, 0.0])), ValueError, "negative"),
    (dict(a=torch.ones(5, dtype=torch.int64)), TypeError, "a"),
    (dict(b=torch.ones(3) / 2), ValueError, "total mass"),
    (dict(a=torch.zeros(5)), ValueError, "a"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD_SINKHORN)
def test_sinkhorn_bad_input(kwargs, error, match):
    args = dict(cost=torch.rand(2, 5, 3))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        sk.sinkhorn(args.pop("cost"), **args)


def test_value_checks_context_turns_the_nan_scans_off_inside_only():
    C = torch.rand(2, 5, 3)
    C[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="cost contains NaN"):
        sk.sinkhorn(C)
    with sk.value_checks(False):
        assert torch.isnan(sk.sinkhorn(C, backend="torch")[1]).any()  # not scanned: NaN in, NaN out
        with sk.value_checks(True), pytest.raises(ValueError, match="cost contains NaN"):
            sk.sinkhorn(C)
        with pytest.raises(ValueError, match="eps"):  # arguments are still checked
            sk.sinkhorn(C, eps=0.0)
    with pytest.raises(ValueError, match="cost contains NaN"):
        sk.sinkhorn(C)


def test_bad_device_and_unavailable_backend():
    with pytest.raises(ValueError, match="device"):
        sk.sinkhorn(torch.rand(2, 5, 3), torch.ones(5, device="meta") / 5)
    with pytest.raises(RuntimeError, match="cuda"):
        sk.sinkhorn(torch.rand(2, 5, 3), backend="cuda")
    with pytest.raises(ValueError, match="cuda.* does not implement sinkhorn_knopp"):
        sk.sinkhorn_knopp(torch.rand(4, 3), backend="cuda")


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(scores=torch.rand(5)), ValueError, "scores"),
        (dict(alpha=torch.ones(2)), ValueError, "alpha"),
        (dict(alpha="one"), TypeError, "alpha"),
        (dict(alpha=float("nan")), TypeError, "alpha"),
        (dict(n_iters=0), ValueError, "n_iters"),
    ],
)
def test_log_optimal_transport_bad_input(kwargs, error, match):
    args = dict(scores=torch.rand(2, 4, 3), alpha=1.0, n_iters=5)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        sk.log_optimal_transport(**args)


def test_s2dc_backend_environment_overrides_auto(monkeypatch):
    C = torch.rand(2, 5, 3, dtype=torch.float64)
    assert set(sk.available_backends()) == {"torch", "cpp", "triton", "cuda"}
    monkeypatch.setenv("S2DC_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cuda"):
        sk.sinkhorn(C)
    assert sk.sinkhorn_knopp(torch.rand(4, 3)).shape == (4, 3)  # an op without that backend keeps "auto"
    monkeypatch.setenv("S2DC_BACKEND", "torch")
    assert_close(sk.sinkhorn(C, n_iters=5), ref.sinkhorn(C, n_iters=5))
    monkeypatch.setenv("S2DC_BACKEND", "fastest")
    with pytest.raises(ValueError, match="S2DC_BACKEND"):
        sk.sinkhorn(C)


def test_auto_passes_over_a_backend_that_cannot_take_the_inputs(monkeypatch):
    """resolve_backend's cannot_take: "auto" and S2DC_BACKEND pass over the backend it names a reason for (the
    next of the order runs), naming that backend explicitly is a ValueError with the reason."""
    from s2dc_kernels._utils import resolve_backend

    cpu = torch.device("cpu")
    cannot_take = {"cpp": "too big for it", "torch": None}.get
    kwargs = dict(op="op", device=cpu, supported=("torch", "cpp"))
    require_backend("cpp", "cpu")
    assert resolve_backend("auto", **kwargs) == "cpp"
    assert resolve_backend("auto", cannot_take=cannot_take, **kwargs) == "torch"
    monkeypatch.setenv("S2DC_BACKEND", "cpp")
    assert resolve_backend("auto", cannot_take=cannot_take, **kwargs) == "torch"
    with pytest.raises(ValueError, match="backend='cpp' for op: too big for it"):
        resolve_backend("cpp", cannot_take=cannot_take, **kwargs)
    assert resolve_backend("torch", cannot_take=cannot_take, **kwargs) == "torch"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_batch_forward_backward(backend, device):
    require_backend(backend, device)
    C = torch.rand(0, 4, 3, device=device, requires_grad=True)
    P, f, g = sk.sinkhorn(C, n_iters=3, backend=backend, return_potentials=True)
    assert P.shape == (0, 4, 3) and f.shape == (0, 4) and g.shape == (0, 3)
    (grad,) = torch.autograd.grad(P.sum() + f.sum() + g.sum(), C)
    assert grad.shape == (0, 4, 3)
    log_plan = sk.log_optimal_transport(torch.rand(0, 4, 3, device=device), 1.0, 3, backend=backend)
    assert log_plan.shape == (0, 5, 4)


def test_triton_regime_choice(monkeypatch):
    from s2dc_kernels.triton_kernels.sinkhorn import SPLIT_MIN_ENTRIES, use_split_regime

    monkeypatch.setenv("S2DC_TRITON_SINKHORN_REGIME", "auto")
    assert not use_split_regime(48, 1, SPLIT_MIN_ENTRIES - 1)
    assert use_split_regime(1, 1, SPLIT_MIN_ENTRIES)
    assert use_split_regime(1, 2048, 2048)
    monkeypatch.setenv("S2DC_TRITON_SINKHORN_REGIME", "split")
    assert use_split_regime(2, 3, 3)
    monkeypatch.setenv("S2DC_TRITON_SINKHORN_REGIME", "fast")
    with pytest.raises(ValueError, match="S2DC_TRITON_SINKHORN_REGIME"):
        use_split_regime(2, 3, 3)


@pytest.mark.cuda
@pytest.mark.parametrize("graphs", ["1", "0"])
def test_triton_split_regime_repeated_calls(monkeypatch, graphs):
    """Repeated calls of one shape (the split regime replays them as CUDA graphs): each gets its own
    inputs' numbers, forward and backward, with and without tol."""
    require_backend("triton", "cuda")
    monkeypatch.setenv("S2DC_TRITON_SINKHORN_REGIME", "split")
    monkeypatch.setenv("S2DC_CUDA_GRAPHS", graphs)
    for tol in (None, 1e-4, None, 1e-4, None, 1e-4):
        C = torch.rand(3, 45, 29, device="cuda", requires_grad=True)
        kw = dict(eps=0.1, n_iters=30, tol=tol, return_potentials=True)
        ours, theirs = sk.sinkhorn(C, backend="triton", **kw), ref.sinkhorn(C, **kw)
        for o, t in zip(ours, theirs, strict=True):
            assert_close(o, t)
        w = torch.randn_like(theirs[0])
        grads = [torch.autograd.grad((w * p[0]).sum(), C)[0] for p in (ours, theirs)]
        assert_close(*grads, rtol=1e-5, atol=1e-5 * grads[1].abs().max().item())


@pytest.mark.cuda
@pytest.mark.parametrize("backend,regime", [("triton", "program"), ("triton", "split"), ("cuda", "program")])
def test_fixed_iteration_solve_captures_and_replays_as_a_cuda_graph(monkeypatch, backend, regime):
    """No host synchronisation inside a solve: a fixed-iteration forward captures into a CUDA graph (the input
    checks' value scans are skipped during capture) and replays on new inputs."""
    require_backend(backend, "cuda")
    monkeypatch.setenv("S2DC_TRITON_SINKHORN_REGIME", regime)
    static_cost = torch.rand(3, 37, 29, device="cuda")

    def solve():
        return sk.sinkhorn(static_cost, eps=0.1, n_iters=20, backend=backend, return_potentials=True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        solve()  # compiles / loads the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_out = solve()
    for _ in range(2):
        cost = torch.rand(3, 37, 29, device="cuda")
        static_cost.copy_(cost)
        graph.replay()
        expected = ref.sinkhorn(cost, eps=0.1, n_iters=20, return_potentials=True)
        for o, e in zip(static_out, expected, strict=True):
            assert_close(o, e)


@pytest.mark.cuda
def test_launch_graphs_replay_and_stay_bounded():
    """The CUDA-graph cache of the split regime: the first call of a key launches, the second captures, later
    ones replay, each with its own inputs; distinct keys (e.g. sizes that vary from step to step) keep at most
    _GRAPH_CACHE_SIZE graphs and 4 times as many keys seen once."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from s2dc_kernels._utils import _GRAPH_CACHE_SIZE, LaunchGraphs

    graphs = LaunchGraphs()

    def launch(x, out):
        out.copy_(2 * x + 1)

    for call in range(4):
        x, out = torch.randn(7, device="cuda"), torch.empty(7, device="cuda")
        graphs.run(("double",), launch, (x,), (out,))
        torch.testing.assert_close(out, 2 * x + 1)
        assert len(graphs.graphs) == (call >= 1)
    for size in range(1, 200):  # captured (second call): at most _GRAPH_CACHE_SIZE graphs kept
        for _ in range(2):
            x, out = torch.randn(size, device="cuda"), torch.empty(size, device="cuda")
            graphs.run(("double",), launch, (x,), (out,))
            torch.testing.assert_close(out, 2 * x + 1)
    assert len(graphs.graphs) == _GRAPH_CACHE_SIZE and not graphs.seen
    for size in range(200, 400):  # seen once each: at most 4 * _GRAPH_CACHE_SIZE remembered
        x, out = torch.randn(size, device="cuda"), torch.empty(size, device="cuda")
        graphs.run(("double",), launch, (x,), (out,))
        torch.testing.assert_close(out, 2 * x + 1)
    assert len(graphs.seen) == 4 * _GRAPH_CACHE_SIZE and len(graphs.graphs) == _GRAPH_CACHE_SIZE
