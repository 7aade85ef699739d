"""Benchmark the S2DC loss path (L_p2p + L_p2s + L_nc + L_g, forward and backward) with the fused ops
("s2dc-fused": the public ops, backend "auto") against the same losses on the references ("eager").

Shapes: the CPU demo's (4 volumes, 4 z-layers of 8 x 8 tokens, 64-d projections, 4 crops) and the official
one (4 volumes -> 12 problems of 144 x 144 tokens, 512-d, 16 crops), whose fused/reference ratio is the
training issue's target.

    python benchmarks/bench_train.py [--quick | --gpu] [--csv FILE]
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from unittest import mock

import harness
import torch
import torch.nn.functional as F

import s2dc_kernels
from s2dc_kernels.train.losses import GlobalLoss, NCLoss, P2PLoss, P2SLoss, token_scores

# (B volumes, Z layers, N tokens per layer, d, crops per volume)
SHAPES = {"quick": [(4, 4, 64, 64, 4)], "cpu": [(4, 4, 64, 64, 4), (4, 3, 144, 512, 16)]}
SHAPES["gpu"] = [(4, 3, 144, 512, 16)]


def loss_inputs(shape: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Student tokens q (gets the gradient), teacher tokens k near them, a 0/1 truth with about 110 of 144
    rows matched (a permutation with gaps), and pooled student / teacher crop embeddings."""
    B, Z, N, d, crops = shape
    q = F.normalize(torch.randn(B, Z, N, d, device=device), dim=-1)
    k = F.normalize(q + 0.5 * torch.randn_like(q), dim=-1)
    truth = torch.zeros(B, N, N, device=device)
    for b in range(B):
        rows = torch.randperm(N, device=device)[: int(0.76 * N)]
        truth[b, rows, rows] = 1.0
    query, keys = torch.randn(B, crops, d, device=device), torch.randn(B, crops, d, device=device)
    return q, k, truth, query, keys


def loss_path(ops: str, d: int) -> Callable[..., torch.Tensor]:
    """All four terms at weight 0.5, as the training loop sums them (q k^T computed once for L_p2p and
    L_p2s). The timed gradient is the one to q: L_g's own backward (to the pooled embeddings) is timed in
    its per-term case."""
    p2p, p2s, nc, glob = P2PLoss(ops), P2SLoss(ops), NCLoss(ops), GlobalLoss(ops, d)
    generator = torch.Generator().manual_seed(0)

    def total(q, k, truth, query, keys):
        glob.to(q.device)
        scores = token_scores(q, k)  # shared by L_p2p and L_p2s, as in the training loop
        token_terms = p2p(q, k, truth, scores) + p2s(q, k, truth, scores) + nc(q, k, truth)
        return 0.5 * (token_terms + glob(query, keys, generator))

    return total


def loss_term(ops: str, term: str, d: int) -> Callable[..., torch.Tensor]:
    """One term of the loss path alone on (q, k, truth) (L_p2p and L_p2s each computing q k^T), L_g on
    (query, keys) (the loss path's inputs 4 and 5, so that its gradient is the one timed)."""
    if term == "L_g":
        glob, generator = GlobalLoss(ops, d), torch.Generator().manual_seed(0)
        return lambda query, keys: glob.to(query.device)(query, keys, generator)
    module = {"L_p2p": P2PLoss, "L_p2s": P2SLoss, "L_nc": NCLoss}[term](ops)
    return lambda q, k, truth: module(q, k, truth)


def term_inputs_of(inputs: Callable, part: slice, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The inputs of one term: ``part`` of the loss path's inputs."""
    return inputs(device)[part]


@contextlib.contextmanager
def trained_with(backend: str) -> Iterator[None]:
    """As the training loop runs the losses: value_checks(False) (it checks the loss once); with
    S2DC_BACKEND=backend (the ops that implement it take it; "auto": each op's own choice)."""
    with mock.patch.dict(os.environ, {"S2DC_BACKEND": backend}), s2dc_kernels.value_checks(False):
        yield


def as_trained(fn: Callable, backend: str = "auto") -> Callable:
    """fn as a provider run as the training loop runs the losses (see trained_with)."""
    return harness.provider(fn, context=functools.partial(trained_with, backend))


def make_cases(args) -> list[harness.Case]:
    """The loss path per shape; on GPUs also each term alone (where the fused path's time goes)."""
    cases = []
    for shape in SHAPES[args.preset.name]:
        B, Z, N, d, crops = shape
        providers = {"s2dc-fused": as_trained(loss_path("fused", d)), "eager": loss_path("reference", d)}
        if args.gpu and s2dc_kernels.available_backends()["cuda"]:  # L_p2p on the CUDA C++ Sinkhorn
            providers["s2dc-fused-cuda"] = as_trained(loss_path("fused", d), backend="cuda")
        label = f"{B}x{Z}x{N}x{d} ({B * Z} problems)"
        inputs = functools.partial(loss_inputs, shape)
        cases.append(harness.Case("s2dc_loss_path", label, "fwd+bwd", inputs, providers))
        for term in ("L_p2p", "L_p2s", "L_nc", "L_g") if args.gpu else ():
            providers = {
                "s2dc-fused": as_trained(loss_term("fused", term, d)),
                "eager": loss_term("reference", term, d),
            }
            part = slice(3, 5) if term == "L_g" else slice(3)
            term_inputs = functools.partial(term_inputs_of, inputs, part)
            cases.append(harness.Case(f"s2dc_loss_path {term}", label, "fwd+bwd", term_inputs, providers))
    return cases


if __name__ == "__main__":
    harness.main("bench_train", make_cases)
