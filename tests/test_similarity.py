"""Similarity ops (cosine similarity, k-NN, neighbourhood consistency) against independent float64 formulas.

The public functions and the pure-PyTorch references are both checked against NumPy formulas and
explicit loops (k-NN: the reference and the public knn on each of its backends, "torch", "cpp" and
"triton"); gradients by finite differences (gradcheck); every bad input for the error it raises. The
Triton backend (CPU tensors under the interpreter, CUDA tensors on a GPU) has its own section: odd shapes
that cut its tiles, both k-NN strategies, gradients against the reference, custom ops under torch.compile.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import backend_params, require_backend
from torch.testing import assert_close

import s2dc_kernels.reference.similarity as reference
import s2dc_kernels.similarity as public
from s2dc_kernels._utils import resolve_backend

np = pytest.importorskip("numpy")  # the independent formulas; a bare GPU machine may lack numpy

IMPLEMENTATIONS = [pytest.param(public, id="public"), pytest.param(reference, id="reference")]
METRICS = ("cosine", "dot", "l2")
# (x shape, y shape): odd sizes, a single-problem batch, an unbatched pair.
PAIR_SHAPES = [((5, 7, 13), (5, 9, 13)), ((1, 9, 3), (1, 9, 3)), ((11, 6), (8, 6))]
TOLERANCES = {torch.float64: {"atol": 1e-12, "rtol": 1e-10}, torch.float32: {"atol": 1e-5, "rtol": 1e-5}}


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------- independent NumPy formulas (float64)
def np_unit(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)


def np_scores(x: torch.Tensor, y: torch.Tensor, metric: str) -> torch.Tensor:
    """(…, N, M) cosine similarity, dot product or Euclidean distance, computed in float64 NumPy."""
    xa, ya = x.detach().double().numpy(), y.detach().double().numpy()
    if metric == "cosine":
        out = np_unit(xa) @ np.swapaxes(np_unit(ya), -1, -2)
    elif metric == "dot":
        out = xa @ np.swapaxes(ya, -1, -2)
    else:
        out = np.sqrt(((xa[..., :, None, :] - ya[..., None, :, :]) ** 2).sum(-1))
    return torch.from_numpy(out)


def naive_neighborhood_consistency(student, teacher, k, tau_s, tau_t, mask=None) -> float:
    """L_nc by explicit loops over problems, anchors and candidate neighbours."""
    s, t = student.detach().double().numpy(), teacher.detach().double().numpy()
    m = np.ones(s.shape[:-1], dtype=bool) if mask is None else mask.numpy()
    if s.ndim == 2:
        s, t, m = s[None], t[None], m[None]

    def cos(a, b):
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    def log_softmax(v):
        v = np.asarray(v) - max(v)
        return v - np.log(np.exp(v).sum())

    kls = []
    for b in range(s.shape[0]):
        valid = [int(i) for i in np.flatnonzero(m[b])]
        for i in valid:
            others = [j for j in valid if j != i]
            others.sort(key=lambda j: -cos(t[b, i], t[b, j]))
            neighbours = others[:k]
            log_p = log_softmax([cos(t[b, i], t[b, j]) / tau_t for j in neighbours])
            log_q = log_softmax([cos(s[b, i], s[b, j]) / tau_s for j in neighbours])
            kls.append(float((np.exp(log_p) * (log_p - log_q)).sum()))
    return float(np.mean(kls)) if kls else 0.0


def random_mask(shape: tuple[int, ...], min_valid: int, seed: int) -> torch.Tensor:
    """Random bool mask with about 70% True and at least ``min_valid`` True per problem (last dim)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=g) < 0.7
    mask[..., :min_valid] = True
    perm = torch.randperm(shape[-1], generator=g)
    return mask[..., perm]


# ---------------------------------------------------------------- cosine similarity
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("shapes", PAIR_SHAPES)
@pytest.mark.parametrize("self_similarity", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.07])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cosine_similarity_matches_numpy(impl, shapes, self_similarity, temperature, dtype):
    x = randn(*shapes[0], seed=1, dtype=dtype)
    y = None if self_similarity else randn(*shapes[1], seed=2, dtype=dtype)
    out = impl.cosine_similarity(x, y, temperature=temperature)
    expected = np_scores(x, x if y is None else y, "cosine") / temperature
    assert out.dtype == dtype
    assert_close(out.double(), expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_cosine_similarity_zero_row_scores_zero(impl):
    x = randn(2, 4, 5, seed=3)
    x[1, 2] = 0.0
    out = impl.cosine_similarity(x)
    assert torch.isfinite(out).all()
    assert (out[1, 2] == 0).all() and (out[1, :, 2] == 0).all()
    assert (out[0].diagonal() - 1).abs().max() < 1e-12


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_cosine_similarity_tiny_rows_are_normalised(impl):
    x = randn(4, 6, seed=33)
    tiny = torch.cat([x[:2] * 1e-9, x[2:]])  # norms ~1e-9, far above the 1e-12 clamp
    assert_close(impl.cosine_similarity(tiny), impl.cosine_similarity(x))


# ---------------------------------------------------------------- k-NN
def knn_implementation(name: str):
    """reference.knn, or the public knn on one backend on CPU tensors (skipped where it cannot run)."""
    if name == "reference":
        return reference.knn
    require_backend(name, "cpu")
    return functools.partial(public.knn, backend=name)


@pytest.fixture(params=["reference", *public.KNN_BACKENDS])
def knn(request):
    return knn_implementation(request.param)


@pytest.fixture(params=["reference", *(b for b in public.KNN_BACKENDS if b != "triton")])
def knn_compiled(request):
    """Like knn without the interpreted Triton backend: for gradcheck's hundreds of calls (the Triton
    gradients are compared with the reference's in test_triton_knn_gradients_match_reference)."""
    return knn_implementation(request.param)


def check_knn(values, indices, scores, k, metric, exclude_self, tol):
    """values equal torch.topk of the full float64 score matrix; indices point to entries of equal score."""
    n, m = scores.shape[-2:]
    largest = metric != "l2"
    if exclude_self:
        diagonal = torch.eye(n, m, dtype=torch.bool)
        scores = scores.masked_fill(diagonal, float("-inf") if largest else float("inf"))
    assert values.shape == indices.shape == scores.shape[:-1] + (k,)
    assert indices.dtype == torch.int64
    assert ((indices >= 0) & (indices < m)).all()
    assert_close(values.double(), scores.topk(k, dim=-1, largest=largest).values, **tol)
    assert_close(scores.gather(-1, indices), values.double(), **tol)
    sorted_indices = indices.sort(dim=-1).values
    assert (sorted_indices[..., 1:] != sorted_indices[..., :-1]).all(), "a neighbour is returned twice"
    if exclude_self:
        assert (indices != torch.arange(n)[:, None]).all()


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shapes", PAIR_SHAPES)
@pytest.mark.parametrize("k", [1, 4, "all"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_knn_against_full_matrix(knn, metric, shapes, k, dtype):
    x, y = randn(*shapes[0], seed=4, dtype=dtype), randn(*shapes[1], seed=5, dtype=dtype)
    k = shapes[1][-2] if k == "all" else k
    values, indices = knn(x, y, k=k, metric=metric)
    assert values.dtype == dtype
    check_knn(values, indices, np_scores(x, y, metric), k, metric, False, TOLERANCES[dtype])


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape", [(5, 7, 13), (1, 9, 3), (11, 6)])
@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("pass_y", [False, True])
def test_knn_self_search(knn, metric, shape, exclude_self, pass_y):
    x = randn(*shape, seed=6)
    k = shape[-2] - 1 if exclude_self else 3
    values, indices = knn(x, x.clone() if pass_y else None, k=k, metric=metric, exclude_self=exclude_self)
    check_knn(values, indices, np_scores(x, x, metric), k, metric, exclude_self, TOLERANCES[torch.float64])
    if not exclude_self and metric != "dot":  # each row is its own nearest neighbour
        assert (indices[..., 0] == torch.arange(shape[-2])).all()


@pytest.mark.parametrize("metric", METRICS)
def test_knn_ties_point_to_equal_scores(knn, metric):
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]], dtype=torch.float64)
    y = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 2.0], [3.0, 3.0]]], dtype=torch.float64)
    values, indices = knn(x, y, k=4, metric=metric)
    check_knn(values, indices, np_scores(x, y, metric), 4, metric, False, TOLERANCES[torch.float64])


def test_knn_l2_exact_far_from_origin(knn):
    # A tight cluster far from 0: |x|^2 + |y|^2 - 2 x.y would cancel away the fp32 digits of the distances.
    x = 100 + 0.01 * randn(2, 40, 8, seed=34, dtype=torch.float32)
    values, indices = knn(x, k=5, metric="l2", exclude_self=True)
    check_knn(values, indices, np_scores(x, x, "l2"), 5, "l2", True, {"atol": 1e-5, "rtol": 1e-4})


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("batched", [True, False])
def test_cosine_similarity_gradcheck(impl, batched):
    lead = (2,) if batched else ()
    x = randn(*lead, 4, 3, seed=7).requires_grad_()
    y = randn(*lead, 5, 3, seed=8).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: impl.cosine_similarity(a, b, temperature=0.5), (x, y))
    assert torch.autograd.gradcheck(lambda a: impl.cosine_similarity(a, temperature=0.5), (x,))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("batched", [True, False])
def test_knn_gradcheck(knn_compiled, metric, batched):
    knn = knn_compiled
    lead = (2,) if batched else ()
    x = randn(*lead, 4, 3, seed=9).requires_grad_()
    y = randn(*lead, 6, 3, seed=10).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: knn(a, b, k=3, metric=metric)[0], (x, y))
    # Self search: with the self pair (l2 distance 0) and without it.
    assert torch.autograd.gradcheck(lambda a: knn(a, k=2, metric=metric)[0], (x,))
    assert torch.autograd.gradcheck(lambda a: knn(a, k=2, metric=metric, exclude_self=True)[0], (x,))


def test_knn_l2_gradient_at_zero_distance(knn):
    x = randn(2, 3, 4, seed=11).requires_grad_()
    y = randn(2, 5, 4, seed=12)
    y[0, 2] = x[0, 1].detach()  # distance exactly 0 for the pair (x[0, 1], y[0, 2])
    y.requires_grad_()
    values, indices = knn(x, y, k=2, metric="l2")
    assert values[0, 1, 0] == 0 and indices[0, 1, 0] == 2
    values.sum().backward()
    # d|x_i - y_j| / dx_i = (x_i - y_j) / |x_i - y_j| summed over the chosen pairs, 0 at distance 0.
    xa, ya = x.detach().numpy(), y.detach().numpy()
    grad_x, grad_y = np.zeros_like(xa), np.zeros_like(ya)
    for b, i, slot in np.ndindex(*indices.shape):
        j = int(indices[b, i, slot])
        diff = xa[b, i] - ya[b, j]
        dist = np.linalg.norm(diff)
        if dist > 0:
            grad_x[b, i] += diff / dist
            grad_y[b, j] -= diff / dist
    assert_close(x.grad, torch.from_numpy(grad_x))
    assert_close(y.grad, torch.from_numpy(grad_y))


def test_knn_empty_batch_and_non_contiguous_inputs(knn):
    for metric in METRICS:
        values, indices = knn(randn(0, 4, 3).requires_grad_(), randn(0, 5, 3), k=5, metric=metric)
        assert values.shape == indices.shape == (0, 4, 5) and indices.dtype == torch.int64
        x = randn(3, 13, 7, seed=26).transpose(1, 2)  # (3, 7, 13), strided
        y = randn(3, 18, 13, seed=27)[:, ::2]  # (3, 9, 13), strided
        values, indices = knn(x, y, k=4, metric=metric)
        check_knn(values, indices, np_scores(x, y, metric), 4, metric, False, TOLERANCES[torch.float64])
        values, indices = knn(x[1], k=6, metric=metric, exclude_self=True)  # strided self search
        check_knn(values, indices, np_scores(x[1], x[1], metric), 6, metric, True, TOLERANCES[torch.float64])


@pytest.mark.parametrize("backend", public.KNN_BACKENDS)
def test_knn_values_differentiable_only_when_asked(backend):
    require_backend(backend, "cpu")
    x = randn(2, 6, 3, seed=35)
    assert public.knn(x, k=2, backend=backend)[0].grad_fn is None
    values = public.knn(x.requires_grad_(), k=2, backend=backend)[0]
    assert values.grad_fn is not None
    with torch.no_grad():
        assert public.knn(x, k=2, backend=backend)[0].grad_fn is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_knn_l2_takes_half_inputs_on_cpu(dtype):
    """The reference ranks CPU half rows by float32 distances (CPU cdist has no half kernel): the neighbours
    of the float32 upcast, values in the input dtype (computed in it: D = 6 differences, squares, 5 additions
    and a square root, at most 8 roundings of relative size u each)."""
    x, y = torch.randn(2, 11, 6).to(dtype), torch.randn(2, 9, 6).to(dtype)
    values, indices = reference.knn(x, y, k=3, metric="l2")
    expected, expected_indices = reference.knn(x.float(), y.float(), k=3, metric="l2")
    assert values.dtype == dtype and torch.equal(indices, expected_indices)
    assert_close(values.float(), expected, rtol=8 * UNIT_ROUNDOFF[dtype], atol=1e-5)


# Unit roundoff of the half formats (11 and 8 significant bits): rounding a value v to them moves it by at
# most UNIT_ROUNDOFF |v|.
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


@pytest.mark.parametrize(
    "backend, device",
    [pytest.param("auto", "cpu", id="auto-cpu")]
    + [p for p in backend_params(public.KNN_BACKENDS) if p.id != "torch-cuda"],  # CUDA: half reference
)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_knn_half_inputs(backend, device, metric, dtype):
    """fp16 / bf16 inputs: scores of the (exactly representable) half rows in float32 (CPU backends upcast,
    Triton accumulates in fp32), values returned in the input dtype. Against the reference on the float32
    upcast: the values within their rounding to the half dtype (rtol = unit roundoff) plus the float32 error
    of scores of size <~ 10 (atol 1e-5); the indices agree up to ties (the float64 scores of the chosen
    pairs are the float64 top-k; Triton's l2 ranking swaps pairs closer than the half rounding). The
    gradients are float32 ones (at the returned pairs) rounded once to the half dtype."""
    if backend != "auto":
        require_backend(backend, device)
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter computes bf16 tl.dot wrongly (this case runs on the GPU)")
    tol = {"rtol": UNIT_ROUNDOFF[dtype], "atol": 1e-5}
    x = on(device, 2, 13, 7, seed=60, dtype=dtype).requires_grad_()
    y = on(device, 2, 10, 7, seed=61, dtype=dtype).requires_grad_()
    for other, exclude_self, k in [(y, False, 4), (None, True, 5)]:
        values, indices = public.knn(x, other, k=k, metric=metric, exclude_self=exclude_self, backend=backend)
        assert values.dtype == dtype and indices.dtype == torch.int64
        inputs = (x, y) if other is not None else (x,)
        upcast = [t.detach().float().cpu().requires_grad_() for t in inputs]
        x32, y32 = upcast[0], upcast[1] if other is not None else None
        expected, _ = reference.knn(x32, y32, k=k, metric=metric, exclude_self=exclude_self)
        assert_close(values.float().cpu(), expected.detach(), **tol)
        with torch.no_grad():  # the kernels' own values (with grad: recomputed from the chosen pairs)
            kernel_values, _ = public.knn(
                x, other, k=k, metric=metric, exclude_self=exclude_self, backend=backend
            )
        assert_close(kernel_values.float().cpu(), expected.detach(), **tol)
        x64, y64 = x32.detach().double(), None if y32 is None else y32.detach().double()
        chosen = reference.knn_values(x64, y64, indices.cpu(), metric)
        best, _ = reference.knn(x64, y64, k=k, metric=metric, exclude_self=exclude_self)
        if backend == "triton" and metric == "l2":
            # Ranked by 2 x'.y' - |y'|^2 of the rows centred on y's mean c and rounded to the half dtype
            # (relative error <= u each): the scores move by at most e_i = (2u + u^2) max_j (2 |x'_i| |y'_j|
            # + |y'_j|^2) (+ the float32 error), so a swapped pair's squared distances differ by <= 2 e_i.
            u = UNIT_ROUNDOFF[dtype]
            rows = x64 if y64 is None else y64
            centre = rows.mean(dim=-2, keepdim=True)
            x_norm, y_norm = (x64 - centre).norm(dim=-1), (rows - centre).norm(dim=-1)
            moved = (2 * x_norm[..., :, None] * y_norm[..., None, :] + y_norm[..., None, :] ** 2).amax(-1)
            bound = 2 * ((2 * u + u * u) * moved + 1e-5)
            assert ((chosen.square() - best.square()).abs() <= bound[..., None]).all()
        else:
            assert_close(chosen, best, atol=1e-5, rtol=1e-5)
        if exclude_self:
            assert (indices.cpu() != torch.arange(13)[:, None]).all()
        grad = torch.randn(values.shape, generator=torch.Generator().manual_seed(62)).to(dtype)
        got = torch.autograd.grad(values, inputs, grad.to(device))
        at_indices = reference.knn_values(x32, y32, indices.cpu(), metric)  # a tie may swap pairs
        want = torch.autograd.grad(at_indices, upcast, grad.float())
        for g, w in zip(got, want, strict=True):
            assert g.dtype == dtype
            scale = max(1.0, float(w.abs().max()))
            assert_close(g.float().cpu(), w, rtol=UNIT_ROUNDOFF[dtype], atol=1e-5 * scale)


def test_auto_backend_on_cpu_is_cpp_when_built():
    require_backend("cpp", "cpu")
    cpu = torch.device("cpu")
    assert resolve_backend("auto", op="knn", device=cpu, supported=public.KNN_BACKENDS) == "cpp"
    assert resolve_backend("auto", op="nc", device=cpu, supported=public.NC_BACKENDS) == "cpp"
    cosine = resolve_backend("auto", op="cosine_similarity", device=cpu, supported=public.COSINE_BACKENDS)
    assert cosine == "cpp"


# Tile sizes (block_rows, block_cols) of the cpp kernel that cut odd shapes everywhere: tiles of one row or
# column, tiles that straddle the diagonal of a self search, a row block wider than N.
TILES = [(1, 1), (2, 3), (4, 5), (7, 16), (64, 64)]


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("tiles", TILES, ids=[f"{r}x{c}" for r, c in TILES])
@pytest.mark.parametrize("search", ["pair", "self", "self-excluded", "copy-excluded"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_knn_cpp_any_tiling(metric, tiles, search, dtype):
    """The cpp kernel directly, with tiles much smaller than the problem: the score tiles and their merges."""
    require_backend("cpp", "cpu")
    x = randn(3, 23, 5, seed=36, dtype=dtype)
    y = randn(3, 17, 5, seed=37, dtype=dtype) if search == "pair" else x
    exclude_self = search.endswith("excluded")
    k = 6 if search == "pair" else 22 if exclude_self else 9
    candidates = y.clone() if search == "copy-excluded" else y  # not y itself: no symmetric search
    values, indices = torch.ops.s2dc_C.knn_forward(
        x, candidates, k, METRICS.index(metric), exclude_self, *tiles
    )
    check_knn(values, indices, np_scores(x, y, metric), k, metric, exclude_self, TOLERANCES[dtype])


@pytest.mark.parametrize("metric", METRICS)
def test_knn_cpp_large_search_in_tiles(metric):
    """1 x 3000 x 3000, k = 8: more candidates than one column block (2048), and small tiles; the reference in
    float64 is the truth (its score matrix is 72 MB, the kernel keeps O(N k) plus its tiles)."""
    require_backend("cpp", "cpu")
    x = randn(1, 3000, 8, seed=38, dtype=torch.float32)
    truths = {e: reference.knn(x.double(), k=8, metric=metric, exclude_self=e)[0] for e in (False, True)}
    for tiles in [(128, 2048), (37, 301)]:
        # y is x (the symmetric self search) or a copy of it (the general search), with and without (i, i).
        for y, exclude in [(x, False), (x.clone(), False), (x, True), (x.clone(), True)]:
            values, indices = torch.ops.s2dc_C.knn_forward(x, y, 8, METRICS.index(metric), exclude, *tiles)
            assert_close(values.double(), truths[exclude], atol=1e-5, rtol=1e-5)
            # The exact scores of the pairs the indices point to.
            chosen = reference.knn_values(x.double(), None, indices, metric)
            assert_close(chosen, truths[exclude], atol=1e-5, rtol=1e-5)
            if exclude:
                assert (indices != torch.arange(3000)[:, None]).all()
    values, indices = public.knn(x[0], k=8, metric=metric, backend="cpp", exclude_self=True)
    assert_close(values.double(), truths[True][0], atol=1e-5, rtol=1e-5)
    assert (indices != torch.arange(3000)[:, None]).all()


# ---------------------------------------------------------------- Triton backend (interpreter on CPU, GPU)
TRITON = backend_params(("triton",))
# The fused cosine-similarity backends: the Triton kernels and the C++ CPU kernels (csrc/cpu/cosine*.cpp).
COSINE_FUSED = backend_params(("cpp", "triton"))
# Pairs that also cut the Triton tiles: 70 rows and 67 columns span two 64-blocks, D = 40 two 32-slices.
TRITON_PAIR_SHAPES = [*PAIR_SHAPES, ((2, 70, 40), (2, 67, 40))]


def on(device: str, *shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return randn(*shape, seed=seed, dtype=dtype).to(device)


def grad_tolerance(expected: torch.Tensor, dtype: torch.dtype) -> dict:
    """TOLERANCES relative to the largest entry of a gradient (sums of many terms of both signs)."""
    tol = TOLERANCES[dtype]
    return {"rtol": tol["rtol"], "atol": tol["atol"] * max(1.0, float(expected.abs().max()))}


@pytest.mark.parametrize("backend, device", COSINE_FUSED)
@pytest.mark.parametrize("shapes", TRITON_PAIR_SHAPES)
@pytest.mark.parametrize("self_similarity", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_cosine_similarity_forward_and_gradients(backend, device, shapes, self_similarity, dtype):
    require_backend(backend, device)
    x = on(device, *shapes[0], seed=40, dtype=dtype).requires_grad_()
    y = None if self_similarity else on(device, *shapes[1], seed=41, dtype=dtype).requires_grad_()
    out = public.cosine_similarity(x, y, temperature=0.07, backend=backend)
    assert out.dtype == dtype and out.device.type == device
    assert_close(
        out.double().cpu(),
        np_scores(x.cpu(), (x if y is None else y).cpu(), "cosine") / 0.07,
        **TOLERANCES[dtype],
    )
    grad = on(device, *out.shape, seed=42, dtype=dtype)
    inputs = (x,) if y is None else (x, y)
    grads = torch.autograd.grad(out, inputs, grad)
    exact = [t.detach().double().requires_grad_() for t in inputs]
    expected = reference.cosine_similarity(exact[0], None if y is None else exact[1], temperature=0.07)
    for got, want in zip(grads, torch.autograd.grad(expected, exact, grad.double()), strict=True):
        assert got.dtype == dtype
        assert_close(got.double(), want, **grad_tolerance(want, dtype))


@pytest.mark.parametrize("backend, device", COSINE_FUSED)
def test_fused_cosine_similarity_gradcheck(backend, device):
    """Finite differences, unbatched (batches: test_fused_cosine_similarity_forward_and_gradients)."""
    require_backend(backend, device)
    x = on(device, 4, 3, seed=43, dtype=torch.float64).requires_grad_()
    y = on(device, 5, 3, seed=44, dtype=torch.float64).requires_grad_()
    cos = functools.partial(public.cosine_similarity, temperature=0.5, backend=backend)
    assert torch.autograd.gradcheck(lambda a, b: cos(a, b), (x, y))
    assert torch.autograd.gradcheck(lambda a: cos(a), (x,))


@pytest.mark.parametrize("backend, device", COSINE_FUSED)
def test_fused_cosine_similarity_zero_and_tiny_rows(backend, device):
    require_backend(backend, device)
    x = on(device, 2, 4, 5, seed=45, dtype=torch.float64)
    x[1, 2] = 0.0
    x[0, 1] *= 1e-9  # far above the 1e-12 clamp: normalised like any row
    out = public.cosine_similarity(x, backend=backend)
    assert (out[1, 2] == 0).all() and (out[1, :, 2] == 0).all()
    assert_close(out, reference.cosine_similarity(x), **TOLERANCES[torch.float64])
    x.requires_grad_()
    grad = torch.autograd.grad(public.cosine_similarity(x, backend=backend).sum(), x)[0]
    assert_close(grad, torch.autograd.grad(reference.cosine_similarity(x).sum(), x)[0], rtol=1e-9, atol=1e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tf32", [False, True])
def test_triton_cosine_similarity_precision_on_gpu(dtype, tf32, monkeypatch):
    """fp32 products are exact unless torch allows tf32 (10-bit mantissas: |error| <~ 1e-3 relative to the
    products, so 5e-3 on unit cosines); fp16 / bf16 inputs (rounded outputs, 2^-8 relative for bf16).

    The tf32 opt-in must be honoured both ways: the randn rows carry full 24-bit mantissas, so rounding them
    to tf32's 11 bits (relative error up to 2^-11 per entry) moves these cosines of 768-dim rows by ~1e-5 on
    average and ~5e-5 at most (rounding; ~1.3e-4 truncating; simulated in float64 on the CPU), while the
    exact fp32 products stay within ~1e-7: with tf32 the largest error must exceed the fp32 tolerance 1e-5.
    """
    require_backend("triton", "cuda")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    x, y = on("cuda", 8, 300, 768, seed=46), on("cuda", 8, 259, 768, seed=47)
    expected = np_scores(x.cpu(), y.cpu(), "cosine").cuda()
    out = public.cosine_similarity(x.to(dtype), y.to(dtype), backend="triton")
    assert out.dtype == dtype
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2}.get(dtype, 5e-3 if tf32 else 1e-5)
    assert_close(out.double(), expected, atol=tol, rtol=tol)
    if dtype == torch.float32 and tf32:
        assert float((out.double() - expected).abs().max()) > 1e-5, "tf32 was allowed but not used"


def check_triton_knn(x, y, k, metric, exclude_self):
    values, indices = public.knn(x, y, k=k, metric=metric, exclude_self=exclude_self, backend="triton")
    assert values.dtype == x.dtype and values.device == x.device
    scores = np_scores(x.cpu(), (x if y is None else y).cpu(), metric)
    check_knn(values.cpu(), indices.cpu(), scores, k, metric, exclude_self, TOLERANCES[x.dtype])


@pytest.fixture(params=["on-chip", "chunked"])
def knn_strategy(request, monkeypatch):
    """The Triton k-NN strategy: running top-k lists on chip, or row blocks scored into a scratch (forced
    by an on-chip limit below every k, with a scratch of 40 rows of 300 columns: several chunks)."""
    from s2dc_kernels.triton_kernels import similarity as triton_similarity

    if request.param == "chunked":
        monkeypatch.setattr(triton_similarity, "ON_CHIP_MAX_K", 1)
        monkeypatch.setattr(triton_similarity, "CHUNK_SCRATCH_BYTES", 40 * 300 * 4)
    return request.param


@pytest.mark.parametrize("backend, device", TRITON)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("search", ["pair", "self", "self-excluded"])
def test_triton_knn_across_tiles(backend, device, metric, search, knn_strategy):
    """Several row blocks (70 queries) and column tiles (300 candidates, duplicated rows: ties across
    tiles), batched; k = 16 and k = 5."""
    require_backend(backend, device)
    x = on(device, 2, 70, 9, seed=48)
    y = on(device, 2, 300, 9, seed=49)
    y[:, 250:] = y[:, :50]  # ties between the first and the last tile
    if search == "pair":
        check_triton_knn(x, y, 16, metric, False)
    else:
        check_triton_knn(y[:, :150], None, 5, metric, search == "self-excluded")


@pytest.mark.parametrize("backend, device", TRITON)
@pytest.mark.parametrize("metric", METRICS)
def test_triton_knn_large_k(backend, device, metric):
    """k = M - 1 = 69 (padded to 128: the largest on-chip list) and k = M = 150 > 128 (chunked strategy)."""
    require_backend(backend, device)
    x = on(device, 70, 6, seed=50)
    check_triton_knn(x, None, 69, metric, True)
    check_triton_knn(on(device, 1, 33, 6, seed=51), on(device, 1, 150, 6, seed=52), 150, metric, False)


def full_scores(x: torch.Tensor, y: torch.Tensor, metric: str) -> torch.Tensor:
    """The (..., N, M) score matrix by autograd-friendly formulas (no knn code): normalised products, raw
    products or norms of all differences (gradient 0 at distance 0)."""
    if metric == "cosine":
        return torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(y, dim=-1).mT
    if metric == "dot":
        return x @ y.mT
    return torch.linalg.vector_norm(x.unsqueeze(-2) - y.unsqueeze(-3), dim=-1)


@pytest.mark.parametrize("backend, device", backend_params(public.KNN_BACKENDS))
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("batched", [True, False])
def test_knn_gradients_match_full_matrix(backend, device, metric, batched):
    """float64 gradients of the k-NN values against autograd through the full score matrix gathered at
    torch.topk's indices: independent of knn's own value recomputation, so a gradient sent to the wrong
    input, dropped for y or with x and y swapped fails (x and y have different rows and sizes)."""
    require_backend(backend, device)
    lead = (2,) if batched else ()
    x = on(device, *lead, 13, 5, seed=53, dtype=torch.float64).requires_grad_()
    y = on(device, *lead, 11, 5, seed=54, dtype=torch.float64).requires_grad_()
    for exclude_self, other in [(False, y), (True, None)]:
        values, indices = public.knn(x, other, k=4, metric=metric, exclude_self=exclude_self, backend=backend)
        scores = full_scores(x, x if other is None else other, metric)
        largest = metric != "l2"
        with torch.no_grad():
            ranked = scores
            if exclude_self:
                diagonal = torch.eye(13, dtype=torch.bool, device=device)
                ranked = scores.masked_fill(diagonal, float("-inf") if largest else float("inf"))
            expected_indices = ranked.topk(4, dim=-1, largest=largest).indices
        assert torch.equal(indices, expected_indices)  # no ties in random float64 rows
        expected = scores.gather(-1, expected_indices)
        assert_close(values, expected, **TOLERANCES[torch.float64])
        grad = torch.randn_like(values)
        inputs = (x, y) if other is not None else (x,)
        got = torch.autograd.grad(values, inputs, grad)
        for g, want in zip(got, torch.autograd.grad(expected, inputs, grad), strict=True):
            assert_close(g, want, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("backend, device", TRITON)
def test_triton_empty_and_strided_inputs(backend, device):
    require_backend(backend, device)
    x = on(device, 0, 4, 3, seed=55).requires_grad_()
    assert public.cosine_similarity(x, on(device, 0, 5, 3, seed=56), backend=backend).shape == (0, 4, 5)
    values, indices = public.knn(x, k=3, backend=backend)
    assert values.shape == indices.shape == (0, 4, 3)
    strided = on(device, 3, 13, 7, seed=57).transpose(1, 2)  # (3, 7, 13), no unit stride on D
    contiguous = strided.contiguous()
    assert_close(
        public.cosine_similarity(strided, backend=backend),
        public.cosine_similarity(contiguous, backend=backend),
    )
    for metric in METRICS:
        assert_close(
            public.knn(strided, k=4, metric=metric, backend=backend),
            public.knn(contiguous, k=4, metric=metric, backend=backend),
        )


@pytest.mark.parametrize("backend, device", TRITON)
def test_triton_ops_are_custom_ops_that_compile(backend, device):
    require_backend(backend, device)
    from s2dc_kernels.similarity import cosine_similarity_triton, knn_select_triton

    x = on(device, 2, 9, 5, seed=58, dtype=torch.float64).requires_grad_()
    y = on(device, 2, 7, 5, seed=59, dtype=torch.float64)
    torch.library.opcheck(cosine_similarity_triton, (x, y.requires_grad_(), 0.5))
    torch.library.opcheck(knn_select_triton, (x.detach(), y.detach(), 3, 0, False))
    torch.library.opcheck(knn_select_triton, (x.detach(), None, 3, 2, True))

    def loss(x):
        sim = public.cosine_similarity(x, y, temperature=0.5, backend=backend).square().sum()
        sim = sim + public.cosine_similarity(x, backend=backend).square().sum()  # y is x: two inputs alias
        return sim + public.knn(x, k=3, metric="l2", exclude_self=True, backend=backend)[0].sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x), loss(x))
    assert_close(torch.autograd.grad(compiled(x), x)[0], torch.autograd.grad(loss(x), x)[0])


@pytest.mark.cuda
def test_triton_is_auto_on_cuda_and_knn_never_builds_the_matrix():
    """ "auto" takes Triton on CUDA tensors; a 16384 x 16384 search (1 GiB of fp32 scores) allocates less
    than 64 MiB besides its inputs, and its k = 32 lists match the reference's (fp32)."""
    require_backend("triton", "cuda")
    cuda = torch.device("cuda")
    for op, supported in [("cosine_similarity", public.COSINE_BACKENDS), ("knn", public.KNN_BACKENDS)]:
        assert resolve_backend("auto", op=op, device=cuda, supported=supported) == "triton"
    x = on("cuda", 1, 16384, 128, seed=60)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    values, indices = public.knn(x, k=32, exclude_self=True)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < 64 * 2**20
    truth = reference.knn(x[:, :2000].double(), x.double(), k=33)[0][..., 1:]  # the first 2000 queries
    assert_close(values[:, :2000].double(), truth, **TOLERANCES[torch.float32])
    for metric in ("dot", "l2"):
        values = public.knn(x[:, :4099], k=1024, metric=metric)[0]  # chunked strategy
        truth = reference.knn(x[:, :4099].double(), k=1024, metric=metric)[0]
        assert_close(values.double(), truth, **TOLERANCES[torch.float32])


# ---------------------------------------------------------------- neighbourhood consistency
NC_CASES = [((5, 12, 13), 3), ((1, 9, 3), 8), ((11, 6), 4)]  # (shape, k); k = N - 1 for (1, 9, 3)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape, k", NC_CASES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_neighborhood_consistency_matches_loop(impl, shape, k, masked, dtype):
    student, teacher = randn(*shape, seed=13, dtype=dtype), randn(*shape, seed=14, dtype=dtype)
    mask = random_mask(shape[:-1], k + 1, seed=15) if masked else None
    if masked:
        k = min(k, int(mask.sum(-1).min()) - 1)
    loss = impl.neighborhood_consistency(student, teacher, k=k, tau_s=0.1, tau_t=0.04, mask=mask)
    expected = naive_neighborhood_consistency(student, teacher, k, 0.1, 0.04, mask)
    assert loss.dim() == 0 and loss.dtype == dtype
    assert expected > 1e-3
    assert_close(loss.double(), torch.tensor(expected, dtype=torch.float64), **TOLERANCES[dtype])


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_neighborhood_consistency_ignores_masked_patches(impl):
    student, teacher = randn(3, 10, 5, seed=16), randn(3, 10, 5, seed=17)
    mask = random_mask((3, 10), 6, seed=18)
    loss = impl.neighborhood_consistency(student, teacher, k=4, mask=mask)
    student2, teacher2 = student.clone(), teacher.clone()
    student2[~mask] = randn(int((~mask).sum()), 5, seed=19)
    teacher2[~mask] = randn(int((~mask).sum()), 5, seed=20)
    assert_close(impl.neighborhood_consistency(student2, teacher2, k=4, mask=mask), loss)
    assert not torch.allclose(impl.neighborhood_consistency(student2, teacher2, k=4), loss)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("masked", [False, True])
def test_neighborhood_consistency_gradient_reaches_student_only(impl, masked):
    student = randn(2, 9, 4, seed=21).requires_grad_()
    teacher = randn(2, 9, 4, seed=22).requires_grad_()
    mask = random_mask((2, 9), 5, seed=23) if masked else torch.ones(2, 9, dtype=torch.bool)
    impl.neighborhood_consistency(student, teacher, k=3, mask=mask if masked else None).backward()
    assert teacher.grad is None
    assert torch.isfinite(student.grad).all()
    assert (student.grad[mask].norm(dim=-1) > 0).all()
    assert (student.grad[~mask] == 0).all()  # invalid patches are neither anchors nor neighbours
    assert torch.autograd.gradcheck(
        lambda s: impl.neighborhood_consistency(s, teacher, k=3, mask=mask if masked else None),
        (student.detach().requires_grad_(),),
    )


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("masked", [False, True])
def test_neighborhood_consistency_zero_when_student_is_teacher(impl, masked):
    features = randn(3, 10, 6, seed=24)
    mask = random_mask((3, 10), 5, seed=25) if masked else None
    same = impl.neighborhood_consistency(features, features.clone(), k=4, tau_s=0.07, tau_t=0.07, mask=mask)
    assert abs(float(same)) < 1e-12
    sharper_teacher = impl.neighborhood_consistency(features, features, k=4, tau_s=0.1, tau_t=0.04, mask=mask)
    assert float(sharper_teacher) > 1e-3


# ---------------------------------------------------------------- empty batches, non-contiguous inputs
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_empty_batch(impl):
    x = randn(0, 4, 3).requires_grad_()
    y = randn(0, 5, 3)
    assert impl.cosine_similarity(x, y).shape == (0, 4, 5)
    for metric in METRICS:
        values, indices = impl.knn(x, y, k=2, metric=metric)
        assert values.shape == indices.shape == (0, 4, 2) and indices.dtype == torch.int64
    loss = impl.neighborhood_consistency(x, x.detach(), k=3)
    assert loss.dim() == 0 and float(loss.detach()) == 0.0
    loss.backward()
    assert x.grad.shape == x.shape
    masked = impl.neighborhood_consistency(x, x.detach(), k=3, mask=torch.zeros(0, 4, dtype=torch.bool))
    assert float(masked.detach()) == 0.0


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_non_contiguous_inputs(impl):
    x = randn(3, 13, 7, seed=26).transpose(1, 2)  # (3, 7, 13), strided
    y = randn(3, 18, 13, seed=27)[:, ::2]  # (3, 9, 13), strided
    mask = random_mask((3, 14), 6, seed=28)[:, ::2]  # (3, 7), strided
    assert not (x.is_contiguous() or y.is_contiguous() or mask.is_contiguous())
    xc, yc, maskc = x.contiguous(), y.contiguous(), mask.contiguous()
    assert_close(impl.cosine_similarity(x, y), impl.cosine_similarity(xc, yc))
    for metric in METRICS:
        values, indices = impl.knn(x, y, k=4, metric=metric)
        expected_values, expected_indices = impl.knn(xc, yc, k=4, metric=metric)
        assert_close(values, expected_values)
        assert torch.equal(indices, expected_indices)
    k = int(mask.sum(-1).min()) - 1
    assert_close(
        impl.neighborhood_consistency(x, y[:, :7], k=k, mask=mask),
        impl.neighborhood_consistency(xc, yc[:, :7].contiguous(), k=k, mask=maskc),
    )
    assert_close(
        impl.neighborhood_consistency(x, y[:, :7], k=k, mask=mask),
        torch.tensor(naive_neighborhood_consistency(x, y[:, :7], k, 0.1, 0.04, mask), dtype=torch.float64),
    )


# ---------------------------------------------------------------- input validation (public functions)
X, Y = randn(2, 5, 3, seed=29), randn(2, 6, 3, seed=30)
S, T = randn(2, 6, 4, seed=31), randn(2, 6, 4, seed=32)
NAN_X, INF_T = X.clone(), T.clone()
NAN_X[1, 2, 0] = float("nan")
INF_T[0, 0, 1] = float("inf")
MASK = torch.ones(2, 6, dtype=torch.bool)
SPARSE_MASK = MASK.clone()
SPARSE_MASK[1, :3] = False  # 3 valid patches in problem 1: k <= 2

BAD_INPUTS = {
    # cosine_similarity
    "cos x list": (lambda: public.cosine_similarity([[1.0]]), TypeError, "x must be a torch.Tensor"),
    "cos x int": (lambda: public.cosine_similarity(X.long()), TypeError, "x must be a floating"),
    "cos y int": (lambda: public.cosine_similarity(X, Y.int()), TypeError, "y must be a floating"),
    "cos x rank 1": (lambda: public.cosine_similarity(X[0, 0]), ValueError, "x must have 2 or 3 dimensions"),
    "cos x rank 4": (lambda: public.cosine_similarity(X[None]), ValueError, "x must have 2 or 3 dimensions"),
    "cos y rank": (lambda: public.cosine_similarity(X, Y[0]), ValueError, "y must have 3 dimensions"),
    "cos feature dim": (lambda: public.cosine_similarity(X, Y[..., :2]), ValueError, "feature dimension"),
    "cos batch": (lambda: public.cosine_similarity(X, Y[:1]), ValueError, "y must have the batch size of x"),
    "cos dtype": (lambda: public.cosine_similarity(X, Y.float()), ValueError, "same dtype"),
    "cos x nan": (lambda: public.cosine_similarity(NAN_X, Y), ValueError, "x contains NaN or inf"),
    "cos y inf": (lambda: public.cosine_similarity(X, INF_T[..., :3]), ValueError, "y contains NaN or inf"),
    "cos temperature 0": (lambda: public.cosine_similarity(X, temperature=0.0), ValueError, "temperature"),
    "cos temperature <0": (lambda: public.cosine_similarity(X, temperature=-1.0), ValueError, "temperature"),
    "cos temperature str": (lambda: public.cosine_similarity(X, temperature="1"), TypeError, "temperature"),
    # knn
    "knn x int": (lambda: public.knn(X.int(), k=1), TypeError, "x must be a floating"),
    "knn x rank": (lambda: public.knn(X[0, 0], k=1), ValueError, "x must have 2 or 3 dimensions"),
    "knn y rank": (lambda: public.knn(X, Y[0], k=1), ValueError, "y must have 3 dimensions"),
    "knn feature dim": (lambda: public.knn(X, Y[..., :2], k=1), ValueError, "feature dimension"),
    "knn batch": (lambda: public.knn(X, Y[:1], k=1), ValueError, "batch size"),
    "knn x nan": (lambda: public.knn(NAN_X, k=1), ValueError, "x contains NaN"),
    "knn k 0": (lambda: public.knn(X, Y, k=0), ValueError, "k must be >= 1"),
    "knn k > M": (lambda: public.knn(X, Y, k=7), ValueError, r"k must be at most .*M = 6"),
    "knn k = N with exclude_self": (
        lambda: public.knn(X, k=5, exclude_self=True),
        ValueError,
        r"k must be at most .*M - 1 = 4",
    ),
    "knn k float": (lambda: public.knn(X, k=2.0), TypeError, "k must be an int"),
    "knn k bool": (lambda: public.knn(X, k=True), TypeError, "k must be an int"),
    "knn metric": (lambda: public.knn(X, k=1, metric="euclid"), ValueError, "metric must be one of"),
    "knn exclude_self rows": (
        lambda: public.knn(X, Y, k=1, exclude_self=True),
        ValueError,
        "exclude_self=True needs y with as many rows as x",
    ),
    "knn exclude_self type": (lambda: public.knn(X, k=1, exclude_self=1), TypeError, "exclude_self"),
    # neighborhood_consistency
    "nc student list": (lambda: public.neighborhood_consistency([1.0], T), TypeError, "student must be"),
    "nc student int": (lambda: public.neighborhood_consistency(S.long(), T), TypeError, "student must be"),
    "nc teacher int": (lambda: public.neighborhood_consistency(S, T.long()), TypeError, "teacher must be"),
    "nc student rank": (lambda: public.neighborhood_consistency(S[0, 0], T[0, 0]), ValueError, "student"),
    "nc teacher rank": (lambda: public.neighborhood_consistency(S, T[None]), ValueError, "teacher must have"),
    "nc shape": (
        lambda: public.neighborhood_consistency(S, T[:, :5], k=2),
        ValueError,
        "student and teacher must have the same shape",
    ),
    "nc teacher inf": (
        lambda: public.neighborhood_consistency(S, INF_T, k=2),
        ValueError,
        "teacher contains",
    ),
    "nc tau_s 0": (lambda: public.neighborhood_consistency(S, T, k=2, tau_s=0.0), ValueError, "tau_s"),
    "nc tau_t <0": (lambda: public.neighborhood_consistency(S, T, k=2, tau_t=-0.1), ValueError, "tau_t"),
    "nc k 0": (lambda: public.neighborhood_consistency(S, T, k=0), ValueError, "k must be >= 1"),
    "nc k float": (lambda: public.neighborhood_consistency(S, T, k=2.5), TypeError, "k must be an int"),
    "nc k = N": (
        lambda: public.neighborhood_consistency(S, T, k=6),
        ValueError,
        r"k must be at most .*6 - 1",
    ),
    "nc k default > N - 1": (lambda: public.neighborhood_consistency(S, T), ValueError, "k must be at most"),
    "nc k > valid - 1": (
        lambda: public.neighborhood_consistency(S, T, k=3, mask=SPARSE_MASK),
        ValueError,
        r"k must be at most .*3 - 1",
    ),
    "nc mask dtype": (
        lambda: public.neighborhood_consistency(S, T, k=2, mask=MASK.float()),
        ValueError,
        "mask must be a bool tensor",
    ),
    "nc mask shape": (
        lambda: public.neighborhood_consistency(S, T, k=2, mask=MASK[0]),
        ValueError,
        r"mask must have shape \(2, 6\)",
    ),
    "nc mask list": (lambda: public.neighborhood_consistency(S, T, k=2, mask=[True]), TypeError, "mask"),
    # backends
    "cos backend cuda": (
        lambda: public.cosine_similarity(X, backend="cuda"),
        ValueError,
        "does not implement cosine_similarity",
    ),
    "knn backend cuda": (lambda: public.knn(X, k=1, backend="cuda"), ValueError, "not implement knn"),
    "nc backend cuda": (
        lambda: public.neighborhood_consistency(S, T, k=2, backend="cuda"),
        ValueError,
        "does not implement neighborhood_consistency",
    ),
    "knn backend unknown": (
        lambda: public.knn(X, k=1, backend="numpy"),
        ValueError,
        "backend must be one of",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs_raise(case):
    call, error, match = case
    with pytest.raises(error, match=match):
        call()


def test_the_bad_inputs_differ_from_good_ones_only_in_the_bad_part():
    # The fixtures above are valid apart from the broken argument.
    public.cosine_similarity(X, Y, temperature=0.5)
    public.knn(X, Y, k=6)
    public.knn(X, k=4, exclude_self=True)
    public.neighborhood_consistency(S, T, k=5)
    public.neighborhood_consistency(S, T, k=2, mask=SPARSE_MASK)


@pytest.mark.parametrize(
    "call",
    [
        lambda a, b: public.cosine_similarity(a, b),
        lambda a, b: public.knn(a, b, k=1),
        lambda a, b: public.neighborhood_consistency(a, b, k=1),
    ],
    ids=["cosine_similarity", "knn", "neighborhood_consistency"],
)
def test_different_devices_raise(monkeypatch, call):
    monkeypatch.setenv("S2DC_CHECK_VALUES", "0")  # meta tensors have no values to scan
    x = randn(2, 4, 3)
    with pytest.raises(ValueError, match="one device.*on meta"):
        call(x, torch.empty(2, 4, 3, dtype=torch.float64, device="meta"))


def test_mask_on_other_device_raises(monkeypatch):
    monkeypatch.setenv("S2DC_CHECK_VALUES", "0")
    with pytest.raises(ValueError, match="mask on meta"):
        public.neighborhood_consistency(S, T, k=2, mask=torch.ones(2, 6, dtype=torch.bool, device="meta"))


def test_knn_cpp_is_a_custom_op_that_compiles():
    require_backend("cpp", "cpu")
    from s2dc_kernels.similarity import knn_select

    x = torch.randn(2, 9, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 7, 5, dtype=torch.float64)
    torch.library.opcheck(knn_select, (x.detach(), y, 3, 0, False))
    torch.library.opcheck(knn_select, (x.detach(), None, 3, 2, True))

    def loss(x):
        first = public.knn(x, k=3, exclude_self=True, backend="cpp")[0].sum()
        return first + public.knn(x, y, k=2, metric="l2", backend="cpp")[0].sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), loss(x))
    torch.testing.assert_close(torch.autograd.grad(compiled(x), x)[0], torch.autograd.grad(loss(x), x)[0])


# ---------------------------------------------------------------- cpp backend of cosine_similarity
# (forward, gradients and gradcheck on odd shapes: test_fused_cosine_similarity_*)
def test_cosine_cpp_clamped_rows_and_any_gradient_layout():
    """Rows whose norm is clamped at 1e-12 (zero, and 1e-14: a constant 1e12 scale, no Jacobian term) get
    autograd-through-F.normalize's gradients; dL/dS may be broadcast (stride 0) or transposed."""
    require_backend("cpp", "cpu")
    x = randn(2, 6, 5, seed=70)
    x[0, 1] = 0.0
    x[1, 3] *= 1e-14 / float(x[1, 3].norm())
    y = randn(2, 4, 5, seed=71)
    y[1, 2] *= 1e-14 / float(y[1, 2].norm())
    x.requires_grad_(), y.requires_grad_()
    out = public.cosine_similarity(x, y, temperature=0.2, backend="cpp")
    expected = reference.cosine_similarity(x, y, temperature=0.2)
    assert_close(out, expected, **TOLERANCES[torch.float64])
    transposed = randn(2, 4, 6, seed=72).transpose(1, 2)
    for grad in (torch.ones(()).expand(2, 6, 4), transposed):
        got = torch.autograd.grad(out, (x, y), grad, retain_graph=True)
        want = torch.autograd.grad(expected, (x, y), grad, retain_graph=True)
        for g, w in zip(got, want, strict=True):
            assert_close(g, w, **grad_tolerance(w, torch.float64))
    assert float(torch.autograd.grad(out, x, transposed, retain_graph=True)[0][1, 3].abs().max()) > 1e9


def test_cosine_cpp_empty_problems_and_half_inputs():
    """Empty batches, N = 0 and M = 0 (forward and backward); float16 / bfloat16 computed in float32."""
    require_backend("cpp", "cpu")
    for x_shape, y_shape in [((0, 4, 3), (0, 5, 3)), ((2, 0, 3), (2, 5, 3)), ((2, 4, 3), (2, 0, 3))]:
        x = randn(*x_shape, seed=73).requires_grad_()
        y = randn(*y_shape, seed=74).requires_grad_()
        out = public.cosine_similarity(x, y, backend="cpp")
        assert out.shape == (x_shape[0], x_shape[1], y_shape[1])
        grad_x, grad_y = torch.autograd.grad(out.sum(), (x, y))
        assert grad_x.shape == x.shape and grad_y.shape == y.shape
        assert not grad_x.any() and not grad_y.any()
    x = randn(3, 7, 9, seed=75)
    for dtype in (torch.float16, torch.bfloat16):
        out = public.cosine_similarity(x.to(dtype), temperature=0.5, backend="cpp")
        assert out.dtype == dtype
        expected = reference.cosine_similarity(x.to(dtype).float(), temperature=0.5).to(dtype)
        assert_close(out, expected, rtol=0, atol=0)


def test_cosine_cpp_is_a_custom_op_that_compiles():
    require_backend("cpp", "cpu")
    from s2dc_kernels.similarity import cosine_similarity_cpp, cosine_similarity_cpp_backward

    x = randn(2, 9, 5, seed=76).requires_grad_()
    y = randn(2, 7, 5, seed=77).requires_grad_()
    torch.library.opcheck(cosine_similarity_cpp, (x, y, 0.5))
    torch.library.opcheck(cosine_similarity_cpp, (x, x, 0.5))
    grad = randn(2, 9, 7, seed=78)
    torch.library.opcheck(cosine_similarity_cpp_backward, (grad, x.detach(), y.detach(), 0.5))

    def loss(x, y):
        sim = public.cosine_similarity(x, y, temperature=0.5, backend="cpp").square().sum()
        return sim + public.cosine_similarity(x[0], backend="cpp").square().sum()  # y is x, unbatched

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x, y), loss(x, y))
    got = torch.autograd.grad(compiled(x, y), (x, y))
    for g, w in zip(got, torch.autograd.grad(loss(x, y), (x, y)), strict=True):
        assert_close(g, w)


@pytest.mark.parametrize("backend,device", backend_params(public.KNN_BACKENDS))
@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
def test_knn_agrees_with_faiss(backend, device, metric):
    """Exact search by FAISS (the peer) on random rows: same neighbours and values (random data: no ties)."""
    faiss = pytest.importorskip("faiss")
    require_backend(backend, device)
    torch.manual_seed(3)
    x, y = torch.randn(37, 19), torch.randn(53, 19)
    values, indices = public.knn(x.to(device), y.to(device), k=6, metric=metric, backend=backend)
    if metric == "cosine":
        x, y = torch.nn.functional.normalize(x, dim=-1), torch.nn.functional.normalize(y, dim=-1)
    faiss_metric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    expected_values, expected_indices = faiss.knn(x.numpy(), y.numpy(), 6, metric=faiss_metric)
    if metric == "l2":
        expected_values = np.sqrt(expected_values)  # FAISS returns squared distances
    assert torch.equal(indices.cpu(), torch.from_numpy(expected_indices))
    assert_close(values.cpu(), torch.from_numpy(expected_values), rtol=1e-5, atol=1e-5)
