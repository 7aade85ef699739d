"""Pure-PyTorch reference implementations of every op: the ground truth for tests and benchmarks.

Same arguments as the public functions, without ``backend``; no input checks; plain autograd.
"""

from .similarity import cosine_similarity, knn, neighborhood_consistency
from .sinkhorn import log_optimal_transport, sinkhorn, sinkhorn_knopp

__all__ = [
    "cosine_similarity",
    "knn",
    "log_optimal_transport",
    "neighborhood_consistency",
    "sinkhorn",
    "sinkhorn_knopp",
]
