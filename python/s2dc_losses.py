"""The S2DC loss path on the fused ops against the same losses on the references.

    python python/s2dc_losses.py [--volumes 4] [--device cpu|cuda]

Builds random unit-norm patch embeddings shaped like S2DC's (B volumes x 3 z-layers of 144 patches, 512-d)
and a ground-truth match matrix, computes L_p2p (dustbin OT + BCE) and L_nc (neighbourhood consistency) with
``ops="fused"`` (the public ops, fastest backend) and ``ops="reference"`` (s2dc_kernels.reference), checks
that both agree forward and backward, and prints the time of each. In your own code the ops are drop-in
replacements: ``s2dc_kernels.log_optimal_transport(scores, alpha, n_iters)`` for SuperGlue's /
S2DC's ``log_optimal_transport``, ``s2dc_kernels.sinkhorn_knopp`` for SwAV's / DINOv2's Sinkhorn-Knopp.
"""

from __future__ import annotations

import argparse
import time

import torch

import s2dc_kernels as sk
from s2dc_kernels.train.losses import NCLoss, P2PLoss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=4, help="B volumes -> 3 B problems of 144 x 144")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    shape = (args.volumes, 3, 144, 512)
    query = torch.nn.functional.normalize(torch.randn(shape, device=args.device), dim=-1)
    key = torch.nn.functional.normalize(query + 0.5 * torch.randn_like(query), dim=-1)
    truth = torch.zeros(args.volumes, 144, 144, device=args.device)
    rows = torch.randperm(144, device=args.device)[:110]  # about 110 of 144 patches have a match
    truth[:, rows, rows] = 1.0

    results = {}
    for ops in ("reference", "fused"):
        p2p, nc = P2PLoss(ops), NCLoss(ops)

        def losses(p2p=p2p, nc=nc):
            q = query.clone().requires_grad_()
            total = p2p(q, key, truth) + nc(q, key, truth)
            return total.detach(), torch.autograd.grad(total, q)[0]

        losses()  # warm-up
        start = time.perf_counter()
        results[ops] = losses()
        if args.device == "cuda":
            torch.cuda.synchronize()
        elapsed_ms = 1e3 * (time.perf_counter() - start)
        print(f"{ops:>9}: L_p2p + L_nc = {results[ops][0].item():.6f}   {elapsed_ms:8.1f} ms")
    torch.testing.assert_close(results["fused"][0], results["reference"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results["fused"][1], results["reference"][1], rtol=1e-4, atol=1e-7)
    print(f"same loss and gradient (backends available here: {sk.available_backends()})")


if __name__ == "__main__":
    main()
