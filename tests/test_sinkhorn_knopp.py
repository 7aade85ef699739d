"""SwAV / DINOv2 Sinkhorn-Knopp: equal to their code where it is finite, finite where theirs overflows."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import backend_params, require_backend

import s2dc_kernels as sk
from s2dc_kernels import reference as ref


def swav_distributed_sinkhorn(out, eps, n_iters, world_size):
    """SwAV's distributed_sinkhorn, written out (its all-reduces replaced by sums over the given shards)."""
    Q = [torch.exp(o / eps).t() for o in out]
    B = Q[0].shape[1] * world_size
    K = Q[0].shape[0]
    sum_Q = sum(q.sum() for q in Q)
    Q = [q / sum_Q for q in Q]
    for _ in range(n_iters):
        sum_of_rows = sum(q.sum(dim=1, keepdim=True) for q in Q)
        Q = [q / sum_of_rows / K for q in Q]
        Q = [q / q.sum(dim=0, keepdim=True) / B for q in Q]
    return [(q * B).t() for q in Q]


@pytest.mark.parametrize("B,K,n_iters", [(7, 13, 3), (64, 5, 1), (3, 100, 10)])
def test_equals_swav_in_float64(B, K, n_iters):
    logits = torch.randn(B, K, dtype=torch.float64)
    expected = swav_distributed_sinkhorn([logits], 0.5, n_iters, 1)[0]
    torch.testing.assert_close(ref.sinkhorn_knopp(logits, eps=0.5, n_iters=n_iters), expected)
    torch.testing.assert_close(sk.sinkhorn_knopp(logits, eps=0.5, n_iters=n_iters), expected)


def test_teacher_temperature_matches_swav_where_float64_holds():
    logits = (torch.rand(32, 257, dtype=torch.float64) * 2 - 1) * 20  # exp(500): finite in float64
    expected = swav_distributed_sinkhorn([logits], 0.04, 3, 1)[0]
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(sk.sinkhorn_knopp(logits, eps=0.04), expected)
    torch.testing.assert_close(
        sk.sinkhorn_knopp(logits.float(), eps=0.04).double(), expected, rtol=1e-3, atol=1e-5
    )


def test_large_logits_at_teacher_temperature_stay_finite():
    logits = (torch.rand(32, 257) * 2 - 1) * 400
    with torch.no_grad():
        assert not torch.isfinite(ref.sinkhorn_knopp(logits, eps=0.04)).all()  # the peers' overflow
    Q = sk.sinkhorn_knopp(logits, eps=0.04)
    assert torch.isfinite(Q).all()
    torch.testing.assert_close(Q.sum(1), torch.ones(32))  # the last step normalises samples
    torch.testing.assert_close(Q.double(), sk.sinkhorn_knopp(logits.double(), eps=0.04), rtol=1e-3, atol=1e-4)


def test_gradient_flows_and_bad_input():
    logits = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: sk.sinkhorn_knopp(x, eps=0.3), (logits,))
    with pytest.raises(ValueError, match="logits"):
        sk.sinkhorn_knopp(torch.rand(2, 3, 4))
    with pytest.raises(TypeError, match="logits"):
        sk.sinkhorn_knopp(torch.ones(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="eps"):
        sk.sinkhorn_knopp(torch.rand(2, 3), eps=0)
    with pytest.raises(ValueError, match="n_iters"):
        sk.sinkhorn_knopp(torch.rand(2, 3), n_iters=0)
    with pytest.raises(ValueError, match="logits"):
        sk.sinkhorn_knopp(torch.tensor([[1.0, float("nan")]]))
    assert sk.sinkhorn_knopp(torch.rand(0, 3)).shape == (0, 3)


def _worker(rank, world, port, logits, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        shard = logits.chunk(world)[rank].clone().requires_grad_()
        Q = sk.sinkhorn_knopp(shard, eps=0.05, n_iters=3, process_group=dist.group.WORLD)
        (grad,) = torch.autograd.grad((Q * torch.arange(Q.numel()).view_as(Q)).sum(), shard)
        results[rank] = (Q.detach(), grad)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_on_gloo_equal_swav_distributed():
    world = 2
    logits = torch.randn(2 * 6, 11, dtype=torch.float64)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(world, _free_port(), logits, results), nprocs=world, join=True)
        results = dict(results)
    expected = swav_distributed_sinkhorn(list(logits.chunk(world)), 0.05, 3, world)
    for rank in range(world):
        torch.testing.assert_close(results[rank][0], expected[rank])
        assert torch.isfinite(results[rank][1]).all() and results[rank][1].abs().sum() > 0


# ---------------------------------------------------------------- the fused paths (C++, Triton)
TRITON = backend_params(["triton"])
FUSED = backend_params(["cpp", "triton"])


@pytest.mark.parametrize("backend,device", FUSED)
@pytest.mark.parametrize("B,K,eps,n_iters", [(37, 70, 0.5, 3), (19, 200, 0.05, 1), (65, 33, 0.1, 4)])
def test_fused_equals_swav(backend, device, B, K, eps, n_iters):
    require_backend(backend, device)
    logits = torch.randn(B, K, device=device)
    ours = sk.sinkhorn_knopp(logits, eps=eps, n_iters=n_iters, backend=backend)
    expected = swav_distributed_sinkhorn([logits.double()], eps, n_iters, 1)[0]
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    # bfloat16 logits: computed in float32, returned as bfloat16
    half = sk.sinkhorn_knopp(logits.bfloat16(), eps=eps, n_iters=n_iters, backend=backend)
    reference = sk.sinkhorn_knopp(logits.bfloat16().double(), eps=eps, n_iters=n_iters, backend="torch")
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), reference, rtol=1e-2, atol=1e-2 * reference.abs().max().item())


@pytest.mark.parametrize("backend,device", TRITON)
@pytest.mark.parametrize("B,K,chunks", [(21, 1000, 3), (7, 300, 2)])
def test_triton_row_half_step_in_chunks(backend, device, B, K, chunks, monkeypatch):
    """Few samples: the row half-step splits the prototypes into chunks (here 384 + 384 + 232 and 256 + 44
    columns) whose partial LSEs a merge launch combines."""
    require_backend(backend, device)
    from s2dc_kernels.triton_kernels.sinkhorn import knopp_row_chunks

    monkeypatch.setenv("S2DC_KNOPP_ROW_CHUNKS", str(chunks))
    assert -(-K // knopp_row_chunks(B, K, torch.device(device))) == chunks
    logits = 3 * torch.randn(B, K, device=device)
    ours = sk.sinkhorn_knopp(logits, eps=0.1, n_iters=3, backend=backend)
    expected = swav_distributed_sinkhorn([logits.double()], 0.1, 3, 1)[0]
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("backend,device", FUSED)
def test_fused_finite_at_teacher_temperature(backend, device):
    require_backend(backend, device)
    logits = 400 * torch.rand(9, 31, device=device) - 200
    Q = sk.sinkhorn_knopp(logits, eps=0.04, backend=backend)
    assert torch.isfinite(Q).all()
    expected = sk.sinkhorn_knopp(logits.double(), eps=0.04, backend="torch")
    # fp32 exponent arguments of ~1e4 carry ~1e-3 absolute error: Q within 1e-3 of the float64 solve
    torch.testing.assert_close(Q.double(), expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("backend,device", FUSED)
def test_fused_rejects_what_it_cannot_do(backend, device):
    require_backend(backend, device)
    logits = torch.randn(4, 6, device=device)
    if backend == "triton":
        with pytest.raises(ValueError, match="float64"):
            sk.sinkhorn_knopp(logits.double(), backend=backend)
    with pytest.raises(ValueError, match="process_group"):  # rejected before the group is used: a stand-in
        sk.sinkhorn_knopp(logits, backend=backend, process_group=object())
    with pytest.raises(ValueError, match="require grad"):
        sk.sinkhorn_knopp(logits.requires_grad_(), backend=backend)
    with torch.no_grad():  # targets are computed without gradient: then the fused path takes them
        assert torch.isfinite(sk.sinkhorn_knopp(logits, backend=backend)).all()


# ---------------------------------------------------------------- the C++ path on larger odd shapes
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize(
    "B,K,eps,n_iters",
    [(37, 1100, 0.1, 3), (1, 3000, 0.05, 2), (130, 1, 0.5, 3), (300, 517, 0.05, 5)],
)
def test_cpp_equals_swav_on_column_chunks(dtype, B, K, eps, n_iters):
    """Several and ragged column chunks (512 float / 256 double columns), a single sample, a single
    prototype, rows longer than a row block (1024 columns); float64 to rounding, float32 within 1e-5."""
    require_backend("cpp", "cpu")
    logits = 2 * torch.randn(B, K, dtype=dtype)
    ours = sk.sinkhorn_knopp(logits, eps=eps, n_iters=n_iters, backend="cpp")
    expected = swav_distributed_sinkhorn([logits.double()], eps, n_iters, 1)[0]
    assert ours.dtype == dtype
    if dtype == torch.float64:
        torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    else:
        torch.testing.assert_close(
            ours.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item()
        )


def test_cpp_is_auto_on_cpu_and_checks_its_arguments():
    require_backend("cpp", "cpu")
    logits = torch.randn(9, 40)
    # bitwise equal to the explicit cpp call (the torch path differs in the last bits)
    assert torch.equal(sk.sinkhorn_knopp(logits), sk.sinkhorn_knopp(logits, backend="cpp"))
    op = torch.ops.s2dc_C.sinkhorn_knopp
    with pytest.raises(RuntimeError, match="logits must be"):
        op(logits[None], 0.05, 3)
    with pytest.raises(RuntimeError, match="eps"):
        op(logits, 0.0, 3)
    with pytest.raises(RuntimeError, match="n_iters"):
        op(logits, 0.05, 0)
    torch.testing.assert_close(op(logits.t(), 0.05, 3), op(logits.t().contiguous(), 0.05, 3), rtol=0, atol=0)
