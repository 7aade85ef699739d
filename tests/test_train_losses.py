"""S2DC model and losses: each loss against a naive per-problem computation (the official code's loops),
fused vs reference ops, the sanity values of docs/method.md section 7, the EMA teacher, the queue and the
model's layout."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import s2dc_kernels
from s2dc_kernels.train.data import Geometry
from s2dc_kernels.train.losses import GlobalLoss, NCLoss, P2PLoss, P2SLoss, token_scores
from s2dc_kernels.train.model import EMATeacher, Encoder3d, S2DCModel, projection_head


def unit(*shape, dtype=torch.float64):
    return F.normalize(torch.randn(*shape, dtype=dtype), dim=-1)


def partial_permutation(B, N, matched):
    """(B, N, N) 0/1 ground truth: `matched` rows of each volume matched one-to-one to random columns."""
    truth = torch.zeros(B, N, N)
    for b in range(B):
        rows, cols = torch.randperm(N)[:matched], torch.randperm(N)[:matched]
        truth[b, rows, cols] = 1
    return truth


def inputs(B=2, Z=2, N=9, d=5, matched=6, dtype=torch.float64):
    q = unit(B, Z, N, d, dtype=dtype).requires_grad_()
    k = unit(B, Z, N, d, dtype=dtype)
    return q, k, partial_permutation(B, N, matched).to(dtype)


# ---- naive per-problem computations, written as the official code loops -----------------------------------


def naive_log_optimal_transport(scores, alpha, iters):
    m, n = scores.shape
    alpha = scores.new_tensor(alpha)
    Z = torch.cat([torch.cat([scores, alpha.expand(m, 1)], 1), alpha.expand(1, n + 1)], 0)
    norm = -math.log(m + n)
    log_mu = torch.cat([scores.new_full((m,), norm), scores.new_tensor([math.log(n) + norm])])
    log_nu = torch.cat([scores.new_full((n,), norm), scores.new_tensor([math.log(m) + norm])])
    u, v = torch.zeros_like(log_mu), torch.zeros_like(log_nu)
    for _ in range(iters):
        u = log_mu - torch.logsumexp(Z + v[None, :], 1)
        v = log_nu - torch.logsumexp(Z + u[:, None], 0)
    return Z + u[:, None] + v[None, :] - norm


def naive_p2p(q, k, truth, iters, alpha):
    losses = []
    for b in range(q.shape[0]):
        for z in range(q.shape[1]):
            plan = naive_log_optimal_transport(q[b, z] @ k[b, z].T, alpha, iters).exp()[:-1, :-1]
            plan = plan.clamp(1e-6, 1 - 1e-6)
            pos = truth[b] == 1
            losses.append(-torch.log(plan[pos]).mean() - torch.log(1 - plan[~pos]).mean())
    return torch.stack(losses).mean()


def naive_p2s(q, k, truth):
    losses = []
    for b in range(q.shape[0]):
        for z in range(q.shape[1]):
            sim = (1 + q[b, z] @ k[b, z].T) / 2
            sharpe1 = F.softmax((sim.max(0)[0] - sim.mean(0)) / sim.std(0), 0)
            sharpe2 = F.softmax((sim.max(1)[0] - sim.mean(1)) / sim.std(1), 0)
            pos, neg = truth[b] == 1, truth[b] == 0
            sim = sim.clamp(1e-6, 1 - 1e-6)
            loss = -torch.log(sim)
            loss1 = (loss * sharpe1[None, :])[pos].sum()
            loss2 = (loss * sharpe2[:, None])[pos].sum()
            losses.append((loss1 + loss2) / 2 + (-torch.log(1 - sim[neg])).mean())
    return torch.stack(losses).mean()


def naive_nc(q, k, truth, n_neighbours, tau_s, tau_t):
    kls = []
    for b in range(q.shape[0]):
        rows, cols = truth[b].nonzero(as_tuple=True)
        for z in range(q.shape[1]):
            S, T = F.normalize(q[b, z, rows], dim=-1), F.normalize(k[b, z, cols], dim=-1).detach()
            for i in range(len(rows)):
                others = [j for j in range(len(rows)) if j != i]
                teacher_sim = T[others] @ T[i]
                top = teacher_sim.topk(n_neighbours).indices
                neighbours = torch.tensor(others)[top]
                log_p = F.log_softmax(T[neighbours] @ T[i] / tau_t, 0)
                log_q = F.log_softmax(S[neighbours] @ S[i] / tau_s, 0)
                kls.append((log_p.exp() * (log_p - log_q)).sum())
    return torch.stack(kls).mean()


def naive_global(query, keys, queue, crop, temperature):
    B = query.shape[0]
    q = torch.stack([query[b, crop[b]] for b in range(B)])
    positives = [keys[b, crop[b]][None] for b in range(B)]
    others = [keys[b, c][None] for b in range(B) for c in range(keys.shape[1]) if c != crop[b]]
    all_k = torch.cat(positives + others + [queue])
    sim = q @ all_k.T
    logits = torch.cat([torch.diag(sim[:, :B])[:, None], sim[:, B:]], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(B, dtype=torch.long))


# ---- each loss vs the naive computation ------------------------------------------------------------------


@pytest.mark.parametrize("ops", ["fused", "reference"])
def test_p2p_matches_naive(ops):
    """Autograd through the formulation ("reference") and the fused Sinkhorn with the closed-form gradient of
    the loss to log P ("fused")."""
    q, k, truth = inputs()
    loss = P2PLoss(ops, n_iters=20, alpha=0.7)(q, k, truth)
    (grad,) = torch.autograd.grad(loss, q)
    q_naive = q.detach().clone().requires_grad_()
    expected = naive_p2p(q_naive, k, truth, 20, 0.7)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, q_naive.grad, rtol=1e-8, atol=1e-10)


def test_p2p_closed_form_gradient_where_the_clamp_cuts():
    """The fused L_p2p's closed-form gradient to log P against autograd through the formulas, on log plans
    whose entries fall below 1e-6 and above 1 - 1e-6 (the clamp passes no gradient there) and a volume
    without negatives."""
    from s2dc_kernels.train.losses import CLAMP, _masked_mean, _P2PClosedForm

    B, Z, N, M = 2, 3, 7, 5
    log_plan = (3 * torch.randn(B * Z, N + 1, M + 1, dtype=torch.float64)).clamp_max(0.5).requires_grad_()
    with torch.no_grad():
        log_plan[0, :2, :3] = -30.0  # P = 1e-13: clamped up
        log_plan[1, 2, :2] = 1e-9  # P > 1 - 1e-6: clamped down
    positive = (torch.rand(B, 1, N, M) < 0.3).double()
    positive[1] = 1.0
    grad_out = torch.randn(B * Z, dtype=torch.float64)
    value = _P2PClosedForm.apply(log_plan, positive)
    (grad,) = torch.autograd.grad(value, log_plan, grad_out)
    plan = log_plan[:, :-1, :-1].exp().clamp(CLAMP, 1 - CLAMP)
    expected = _masked_mean(-torch.log(plan), positive) + _masked_mean(-torch.log(1 - plan), 1 - positive)
    (expected_grad,) = torch.autograd.grad(expected, log_plan, grad_out)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)
    assert (grad[0, :2, :3] == 0).all() and (grad[1, 2, :2] == 0).all() and (grad[:, -1] == 0).all()


@pytest.mark.parametrize("ops", ["fused", "reference"])
def test_p2s_matches_naive(ops):
    """Autograd through the formulation ("reference") and the closed-form gradient ("fused"), with clamped
    entries (A = 1 where q = k) and rows without matches."""
    q, k, truth = inputs()
    k[0, 1, :3] = q[0, 1, :3].detach()
    truth[1, 4] = 0
    loss = P2SLoss(ops)(q, k, truth)
    (grad,) = torch.autograd.grad(loss, q)
    q_naive = q.detach().clone().requires_grad_()
    expected = naive_p2s(q_naive, k, truth)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, q_naive.grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("loss_class", [P2PLoss, P2SLoss])
def test_shared_scores_change_nothing(loss_class):
    """L_p2p and L_p2s on token_scores(q, k) computed once (as the training loop does) equal the losses that
    compute q k^T themselves, value and gradient; a scores tensor of the wrong shape is refused."""
    q, k, truth = inputs()
    loss = loss_class("fused")
    (expected,) = torch.autograd.grad(loss(q, k, truth), q)
    scores = token_scores(q, k)
    assert scores.shape == (4, 9, 9)
    torch.testing.assert_close(scores[3], q[1, 1] @ k[1, 1].T, rtol=1e-14, atol=1e-14)
    value = loss(q, k, truth, scores)
    (grad,) = torch.autograd.grad(value, q)
    torch.testing.assert_close(value, loss(q, k, truth), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="scores must be token_scores"):
        loss(q, k, truth, scores[:, :-1])


@pytest.mark.parametrize("ops", ["fused", "reference"])
def test_nc_matches_naive(ops):
    q, k, truth = inputs(N=10, matched=7)
    loss = NCLoss(ops, k=4, tau_s=0.2, tau_t=0.05)(q, k, truth)
    (grad,) = torch.autograd.grad(loss, q)
    q_naive = q.detach().clone().requires_grad_()
    expected = naive_nc(q_naive, k, truth, 4, 0.2, 0.05)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, q_naive.grad, rtol=1e-8, atol=1e-10)


def test_nc_clamps_k_and_leaves_out_volumes_without_matches():
    q, k, _ = inputs(B=3, N=10)
    truth = torch.cat([partial_permutation(1, 10, 4), partial_permutation(1, 10, 7), torch.zeros(1, 10, 10)])
    truth[2, 3, 5] = 1  # one match: the volume is left out
    loss = NCLoss("fused", k=8)(q, k, truth)  # k clamped to 4 - 1 = 3
    torch.testing.assert_close(loss, naive_nc(q[:2], k[:2], truth[:2], 3, 0.1, 0.04))
    empty = NCLoss("fused")(q, k, torch.zeros(3, 10, 10))
    assert empty.item() == 0.0 and empty.requires_grad


@pytest.mark.parametrize("ops", ["fused", "reference"])
def test_global_matches_naive_and_updates_queue(ops):
    """Value and gradient (autograd through the formulas, or the closed form of "fused") against the naive
    loop; the queue update."""
    B, n_crops, d = 3, 5, 6
    loss_module = GlobalLoss(ops, d, temperature=0.9, queue_size=5)
    queue_before = loss_module.queue.clone()
    query = torch.randn(B, n_crops, d, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(B, n_crops, d, dtype=torch.float64)
    loss = loss_module(query, keys, torch.Generator().manual_seed(3))
    (grad,) = torch.autograd.grad(3 * loss, query)
    crop = torch.randint(n_crops, (B,), generator=torch.Generator().manual_seed(3))
    expected = naive_global(query, keys, queue_before.double(), crop, 0.9)
    (expected_grad,) = torch.autograd.grad(3 * expected, query)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)
    assert (grad.abs().sum(-1) > 0).sum() == B  # only the chosen crops' rows
    positives = keys[torch.arange(B), crop].float()
    torch.testing.assert_close(loss_module.queue[:B], positives)  # FIFO: the positives enter at the pointer
    torch.testing.assert_close(loss_module.queue[B:], queue_before[B:])
    assert int(loss_module.queue_ptr) == B


def test_queue_is_fifo_and_in_state_dict():
    loss_module = GlobalLoss("reference", dim=2, queue_size=5)
    for step in range(4):  # 12 keys through 5 slots: the last five remain, written in order around the ring
        loss_module.update_queue(
            torch.arange(3 * step, 3 * step + 3, dtype=torch.float32)[:, None].expand(3, 2)
        )
    assert loss_module.queue[:, 0].tolist() == [10.0, 11.0, 7.0, 8.0, 9.0]
    assert int(loss_module.queue_ptr) == 12 % 5
    state = loss_module.state_dict()
    assert set(state) == {"queue", "queue_ptr"}
    restored = GlobalLoss("reference", dim=2, queue_size=5)
    restored.load_state_dict(state)
    assert torch.equal(restored.queue, loss_module.queue) and int(restored.queue_ptr) == 2


# ---- fused vs reference ops ------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_class", [P2PLoss, P2SLoss, NCLoss])
def test_fused_equals_reference(loss_class):
    q, k, truth = inputs(B=2, Z=3, N=12, d=8, matched=9, dtype=torch.float32)
    values, grads = [], []
    for ops in ("fused", "reference"):
        loss = loss_class(ops)(q, k, truth)
        values.append(loss)
        grads.append(torch.autograd.grad(loss, q)[0])
    torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("loss_class", [P2PLoss, P2SLoss])
def test_fused_terms_replayed_as_cuda_graphs_equal_the_direct_run(loss_class, monkeypatch):
    """On GPUs the closed forms run as CUDA graphs (the first call directly, the second captured, later ones
    replayed): every call, on its own inputs, equals the same term with graphs off (S2DC_CUDA_GRAPHS=0)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    loss = loss_class("fused")
    for _ in range(4):
        q, k, truth = (t.detach().cuda() for t in inputs(B=2, Z=3, N=12, d=8, matched=9, dtype=torch.float32))
        q.requires_grad_()
        value = loss(q, k, truth)
        (grad,) = torch.autograd.grad(value, q)
        with monkeypatch.context() as direct:
            direct.setenv("S2DC_CUDA_GRAPHS", "0")
            expected = loss(q, k, truth)
            (expected_grad,) = torch.autograd.grad(expected, q)
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-7)


@pytest.mark.cuda
def test_fused_global_loss_replayed_as_cuda_graphs_equals_the_direct_run(monkeypatch):
    """L_g's closed form as CUDA graphs (direct, captured, replayed calls) against S2DC_CUDA_GRAPHS=0 on the
    same crops and queue."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    loss = GlobalLoss("fused", 8, queue_size=6).cuda()
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        query = torch.randn(3, 4, 8, device="cuda", requires_grad=True)
        keys = torch.randn(3, 4, 8, device="cuda")
        state, generator_state = {k: v.clone() for k, v in loss.state_dict().items()}, generator.get_state()
        with monkeypatch.context() as direct:
            direct.setenv("S2DC_CUDA_GRAPHS", "0")
            expected = loss(query, keys, generator)
            (expected_grad,) = torch.autograd.grad(expected, query)
        loss.load_state_dict(state)
        generator.set_state(generator_state)
        value = loss(query, keys, generator)
        (grad,) = torch.autograd.grad(value, query)
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-7)


class HostSyncs(TorchDispatchMode):
    """Counts the ops that copy a device value to the host (a stall of the GPU's launch queue each), and the
    value scans of check_tensor (an aminmax each, whose bounds reach the host by tolist, which dispatches no
    op on CPU tensors)."""

    SYNCING = ("aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.item")

    def __init__(self):
        super().__init__()
        self.count = self.scans = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += str(func.overloadpacket) in self.SYNCING
        self.scans += str(func.overloadpacket) == "aten.aminmax"
        return func(*args, **(kwargs or {}))


def test_fused_loss_path_syncs_with_the_host_once():
    """All four losses on the fused ops, forward and backward, with the input value scans off (as the training
    loop runs them): one host sync, L_nc's k (it must be an int for the top-k)."""
    q, k, truth = inputs(B=2, Z=2, N=12, d=8, matched=9, dtype=torch.float32)
    query, keys = torch.randn(2, 4, 8, requires_grad=True), torch.randn(2, 4, 8)
    losses = P2PLoss("fused", n_iters=5), P2SLoss("fused"), NCLoss("fused"), GlobalLoss("fused", 8)
    generator = torch.Generator().manual_seed(0)
    with s2dc_kernels.value_checks(False), HostSyncs() as syncs:
        scores = token_scores(q, k)
        total = sum(loss(q, k, truth, scores) for loss in losses[:2]) + losses[2](q, k, truth)
        (total + losses[3](query, keys, generator)).backward()
    assert syncs.count == 1 and syncs.scans == 0


@pytest.mark.cuda
def test_fused_loss_path_syncs_with_the_host_once_on_a_gpu():
    """The same on a GPU, by CUDA's own detection of synchronising calls (which also sees blocking copies
    between host and device), on the calls after the first two (which capture CUDA graphs)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    q, k, truth = (t.detach().cuda() for t in inputs(B=2, Z=2, N=12, d=8, matched=9, dtype=torch.float32))
    query, keys = torch.randn(2, 4, 8, device="cuda", requires_grad=True), torch.randn(2, 4, 8, device="cuda")
    q.requires_grad_()
    losses = P2PLoss("fused", n_iters=5), P2SLoss("fused"), NCLoss("fused"), GlobalLoss("fused", 8).cuda()
    generator = torch.Generator().manual_seed(0)

    def step():
        scores = token_scores(q, k)
        total = sum(loss(q, k, truth, scores) for loss in losses[:2]) + losses[2](q, k, truth)
        (total + losses[3](query, keys, generator)).backward()

    with s2dc_kernels.value_checks(False):
        step(), step()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, syncs


# ---- sanity values of docs/method.md section 7 -------------------------------------------------------------


def test_sanity_values_on_random_features():
    """Random unit 512-d features, N = 144, 3 z-layers: L_p2p about 5.95 (official dustbin semantics); L_p2s
    about ln 2 * (1 + positives / N) (A about 1/2 everywhere), 1.17 at 100 matches."""
    q, k, truth = inputs(B=1, Z=3, N=144, d=512, matched=100, dtype=torch.float32)
    p2p = P2PLoss("fused")(q, k, truth).item()
    p2s = P2SLoss("fused")(q, k, truth).item()
    assert abs(p2p - 5.95) < 0.05, p2p
    assert abs(p2s - 1.17) < 0.02, p2s


# ---- the model ---------------------------------------------------------------------------------------------


def test_model_shapes_on_default_geometry():
    geometry = Geometry()
    model = S2DCModel(geometry)
    crops = torch.randn(2, geometry.n_crops, 1, geometry.crop, geometry.crop, geometry.depth)
    tokens, pooled = model(crops)
    assert tokens.shape == (2, geometry.z_layers, geometry.n_tokens, 64)
    assert pooled.shape == (2, geometry.n_crops, 64)
    torch.testing.assert_close(tokens.norm(dim=-1), torch.ones(tokens.shape[:-1]))
    tokens.sum().backward()
    assert all(p.grad is not None for p in model.encoder.parameters())
    with pytest.raises(ValueError, match="crops must be"):
        model(crops[:, :-1])


class PositionEncoder(nn.Module):
    """Stand-in encoder: token features (X + 1, Y + 1, z + 1, b + 1) from crops filled with b * 100 + crop."""

    def __init__(self, geometry):
        super().__init__()
        self.geometry, self.dim = geometry, 4

    def forward(self, crops):
        geo, t = self.geometry, self.geometry.tokens_per_crop
        code = crops[:, 0, 0, 0, 0].long()
        volume, crop = code // 100, code % 100
        cx, cy = crop // geo.grid[1], crop % geo.grid[1]
        lx, ly, lz = torch.meshgrid(
            torch.arange(t), torch.arange(t), torch.arange(geo.z_layers), indexing="ij"
        )
        X = cx[:, None, None, None] * t + lx
        Y = cy[:, None, None, None] * t + ly
        b = volume[:, None, None, None].expand_as(X)
        return torch.stack([X + 1, Y + 1, lz.expand_as(X) + 1, b + 1], 1).float()


def test_token_order_follows_the_geometry():
    """Token n of layer z is (X, Y) = divmod(n, gy * t) on a non-square grid, crops row-major over (x, y)."""
    geometry = Geometry(grid=(2, 3), crop=8, depth=8, token_stride=4)
    model = S2DCModel(geometry)
    model.encoder, model.geo_head, model.global_head = PositionEncoder(geometry), nn.Identity(), nn.Identity()
    B, n_crops = 2, geometry.n_crops
    fill = (torch.arange(B)[:, None] * 100 + torch.arange(n_crops)).float()
    crops = fill[:, :, None, None, None, None].expand(B, n_crops, 1, 8, 8, 8)
    tokens, _ = model(crops)
    width = geometry.grid[1] * geometry.tokens_per_crop
    n = torch.arange(geometry.n_tokens)
    z = torch.arange(geometry.z_layers)
    expected = torch.stack(
        torch.broadcast_tensors(
            (n // width + 1)[None, None],
            (n % width + 1)[None, None],
            (z + 1)[None, :, None],
            (torch.arange(B) + 1)[:, None, None],
        ),
        -1,
    ).float()
    torch.testing.assert_close(tokens, F.normalize(expected, dim=-1))


def test_bn_quirk_matches_the_official_head():
    """bn_quirk: the official BatchNorm1d(hidden) on (N, Z, hidden) per volume; default: per feature."""
    B, Z, N, dim, hidden, proj = 2, 3, 10, 6, 8, 5
    x = torch.randn(B, Z, N, dim)

    def official(norm_input_of_volume):
        head = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.BatchNorm1d(hidden, affine=False, track_running_stats=False),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden, affine=False, track_running_stats=False),
            nn.ReLU(),
            nn.Linear(hidden, proj),
        )
        return head

    for quirk in (True, False):
        ours = projection_head(dim, hidden, proj, (-2, -1) if quirk else None)
        theirs = official(quirk)
        theirs.load_state_dict(ours.state_dict())
        if quirk:  # official: head(out_geo_re[b]) with out_geo_re[b] of shape (N, Z, dim)
            expected = torch.stack([theirs(x[b].transpose(0, 1)).transpose(0, 1) for b in range(B)])
        else:
            expected = theirs(x.reshape(-1, dim)).view(B, Z, N, proj)
        torch.testing.assert_close(ours(x), expected)


def test_encoder_strides():
    for stride in (1, 2, 3, 4, 6):
        tokens = Encoder3d(stride, dim=16)(torch.randn(2, 1, 12, 12, 24))
        assert tokens.shape == (2, 16, 12 // stride, 12 // stride, 24 // stride)


def test_monai_swin_needs_monai():
    try:
        import monai  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="monai"):
            S2DCModel(Geometry(crop=32, depth=32, token_stride=32), backbone="monai-swin")
    else:
        model = S2DCModel(Geometry(grid=(1, 1), crop=64, depth=64, token_stride=32), backbone="monai-swin")
        tokens, pooled = model(torch.randn(1, 1, 1, 64, 64, 64))
        assert tokens.shape == (1, 2, 4, 64) and pooled.shape == (1, 1, 64)


def test_ema_teacher():
    geometry = Geometry()
    student = S2DCModel(geometry)
    teacher = EMATeacher(student, momentum=0.9)
    assert all(not p.requires_grad for p in teacher.parameters())
    before = [p.clone() for p in teacher.module.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    teacher.update(student)
    for old, new, s in zip(before, teacher.module.parameters(), student.parameters(), strict=True):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * s)
    tokens, pooled = teacher(
        torch.randn(1, geometry.n_crops, 1, geometry.crop, geometry.crop, geometry.depth)
    )
    assert not tokens.requires_grad and not pooled.requires_grad
    with pytest.raises(ValueError, match="momentum"):
        EMATeacher(student, momentum=1.5)


def test_bad_arguments():
    q, k, truth = inputs()
    with pytest.raises(ValueError, match="ops"):
        P2PLoss("fast")
    with pytest.raises(ValueError, match="truth must be"):
        P2PLoss("fused")(q, k, truth[:, :-1])
    with pytest.raises(ValueError, match="q and k"):
        NCLoss("fused")(q, k[:, :1], truth)
    with pytest.raises(ValueError, match="query and keys"):
        GlobalLoss("fused", dim=4)(torch.randn(1, 4, 5), torch.randn(1, 4, 5), torch.Generator())
    with pytest.raises(ValueError, match="backbone"):
        S2DCModel(Geometry(), backbone="resnet")
