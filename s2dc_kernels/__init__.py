"""s2dc-kernels: fused optimal-transport and neighbourhood kernels for self-supervised learning.

Public ops (each takes ``backend="auto"|"torch"|"cpp"|"triton"|"cuda"``; ``s2dc_kernels.reference`` holds the
pure-PyTorch references with the same arguments):

- ``sinkhorn``: batched log-domain Sinkhorn (POT semantics), four gradient modes.
- ``log_optimal_transport``: SuperGlue / S2DC dustbin Sinkhorn (log plan).
- ``sinkhorn_features``: log-domain Sinkhorn between point clouds, the cost streamed from the features.
- ``sinkhorn_knopp``: SwAV / DINOv2 Sinkhorn-Knopp, log domain, optionally across a process group.
- ``cosine_similarity``, ``knn``, ``neighborhood_consistency``: patch similarity, k-NN and the S2DC
  neighbourhood-distribution loss.
"""

from . import reference
from ._utils import available_backends, value_checks
from .similarity import cosine_similarity, knn, neighborhood_consistency
from .sinkhorn import log_optimal_transport, sinkhorn, sinkhorn_features, sinkhorn_knopp

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "cosine_similarity",
    "knn",
    "log_optimal_transport",
    "neighborhood_consistency",
    "reference",
    "sinkhorn",
    "sinkhorn_features",
    "sinkhorn_knopp",
    "value_checks",
]
