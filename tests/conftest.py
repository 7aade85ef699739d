"""Test setup: Triton kernels run under the interpreter on CPU-only machines (set before any import)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import s2dc_kernels  # noqa: E402, F401  (imported after TRITON_INTERPRET is set)


def pytest_collection_modifyitems(config, items):
    """Tests on CUDA tensors carry the `cuda` marker and skip without a GPU."""
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


def cuda_marks(device: str) -> list:
    return [pytest.mark.cuda] if device == "cuda" else []


def backend_params(op_backends):
    """(backend, device) pytest params for every backend of an op, CUDA ones marked `cuda`."""
    params = []
    for backend in op_backends:
        for device in ("cpu", "cuda"):
            if (backend, device) in (("cpp", "cuda"), ("cuda", "cpu")):
                continue
            params.append(pytest.param(backend, device, id=f"{backend}-{device}", marks=cuda_marks(device)))
    return params


def require_backend(backend: str, device: str) -> None:
    """Skip when a backend cannot run here; fail instead for backends named in S2DC_REQUIRE_BACKENDS (CI)."""
    from s2dc_kernels._utils import _unavailable_reason

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    reason = _unavailable_reason(backend, torch.device(device))
    if reason is not None:
        if backend in os.environ.get("S2DC_REQUIRE_BACKENDS", "").split(","):
            pytest.fail(f"{backend} is required (S2DC_REQUIRE_BACKENDS) but unavailable: {reason}")
        pytest.skip(f"{backend} on {device}: {reason}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
