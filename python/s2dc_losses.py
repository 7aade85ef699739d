"""The S2DC loss path with the fused ops as drop-in replacements for the official code's functions.

    python python/s2dc_losses.py [--problems 12] [--backend auto]

Builds random unit-norm patch embeddings shaped like S2DC's (B*3 problems of 144 patches, 512-d) and a
ground-truth match matrix, computes L_p2p (dustbin OT + BCE, method.md section 2) and L_nc (neighbourhood
consistency, section 4) with the references and with the chosen backend, checks that both agree forward and
backward, and prints the time of each.
"""

from __future__ import annotations

import argparse
import time

import torch

import s2dc_kernels as sk
from s2dc_kernels import reference


def p2p_loss(log_optimal_transport, query, key, truth, n_iters=100):
    """BCE of the dustbin OT plan (dustbin dropped, P clamped to [1e-6, 1 - 1e-6]) against the 0/1 matches."""
    scores = query @ key.mT
    plan = log_optimal_transport(scores, torch.tensor(1.0), n_iters)[:, :-1, :-1].exp()
    plan = plan.clamp(1e-6, 1 - 1e-6)
    positives = -(plan.log() * truth).sum((1, 2)) / truth.sum((1, 2))
    negatives = -((1 - plan).log() * (1 - truth)).sum((1, 2)) / (1 - truth).sum((1, 2))
    return (positives + negatives).mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=12, help="B * 3 problems of 144 x 144 (default 12)")
    parser.add_argument("--backend", default="auto", help="auto, torch, cpp, triton or cuda")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    n, dim = 144, 512
    query = torch.nn.functional.normalize(torch.randn(args.problems, n, dim, device=device), dim=-1)
    key = torch.nn.functional.normalize(query + 0.5 * torch.randn_like(query), dim=-1)
    truth = (torch.rand(args.problems, n, n, device=device) < 1 / n).float()
    mask = truth.sum(-1) > 0

    def losses(lot, nc):
        q = query.clone().requires_grad_()
        total = p2p_loss(lot, q, key, truth) + nc(q, key, k=8, tau_s=0.1, tau_t=0.04, mask=mask)
        (grad,) = torch.autograd.grad(total, q)
        return total.detach(), grad

    def fused_lot(scores, alpha, n_iters):
        return sk.log_optimal_transport(scores, alpha, n_iters, backend=args.backend)

    def fused_nc(student, teacher, **kw):
        return sk.neighborhood_consistency(student, teacher, backend="auto", **kw)

    results = {}
    for name, fns in (
        ("reference", (reference.log_optimal_transport, reference.neighborhood_consistency)),
        ("s2dc", (fused_lot, fused_nc)),
    ):
        losses(*fns)  # warm-up
        start = time.perf_counter()
        results[name] = losses(*fns)
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed_ms = 1e3 * (time.perf_counter() - start)
        print(f"{name:>9}: loss {results[name][0].item():.6f}   {elapsed_ms:8.1f} ms")
    torch.testing.assert_close(results["s2dc"][0], results["reference"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results["s2dc"][1], results["reference"][1], rtol=1e-4, atol=1e-7)
    print(f"same loss and gradient (backends available here: {sk.available_backends()})")


if __name__ == "__main__":
    main()
