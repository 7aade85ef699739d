"""Every Triton kernel of s2dc_kernels/triton_kernels compiles to sm_90 (Hopper) cubin, without a GPU.

The CPU-only counterpart of the nvcc compile check of the CUDA sources: each launch configuration in CASES
(the pointer element types, constexpr values, num_warps and num_stages that the launchers in the kernel
modules pass) goes through triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32)), i.e.
TTIR -> TTGIR -> LLVM IR -> PTX -> ptxas, and must fit sm_90's shared memory per block.

Kernels are discovered, not listed: a kernel is an @triton.jit function defined in one of the modules that
no other @triton.jit function calls (the others are device helpers, compiled inside the kernels). A kernel
without a case fails the test, as does a case whose constexprs differ from the kernel's.

tests/conftest.py sets TRITON_INTERPRET=1 on CPU-only machines, under which @triton.jit makes interpreter
objects that cannot be compiled; the compiles therefore run in a fresh interpreter (this file run as a
script) without TRITON_INTERPRET and with an empty Triton cache, reporting JSON on stdout.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field

import pytest

tl = pytest.importorskip("triton.language")

TARGET_ARCH = 90
SM90_MAX_SHARED = 227 * 1024  # bytes of shared memory one block may use on sm_90
INTEGER_BUFFERS = {
    "n_done_ptr": "*i64",
    "stopped_ptr": "*i32",
    "neighbours_ptr": "*i64",
    "indices_ptr": "*i64",
}


@dataclass(frozen=True)
class Case:
    """One launch configuration: pointers to ``dtype`` unless typed in INTEGER_BUFFERS or ``types`` (full
    Triton types by argument name), scalars i64 for *_bits (float bit patterns) and i32 otherwise."""

    kernel: str
    dtype: str
    constexprs: dict
    num_warps: int = 4
    num_stages: int | None = None  # None: Triton's default, as the launchers that do not pass it
    types: dict = field(default_factory=dict)


BF16_FEATURES = {"X_ptr": "*bf16", "Y_ptr": "*bf16"}
TILE_16x128, TILE_64x32 = {"BLOCK_N": 16, "BLOCK_M": 128}, {"BLOCK_N": 64, "BLOCK_M": 32}
TILE_16x64, TILE_32x32 = {"BLOCK_N": 16, "BLOCK_M": 64}, {"BLOCK_N": 32, "BLOCK_M": 32}

# fmt: off
CASES = [
    # sinkhorn.py: program regime (_tile_config for sides ~100: 32 x 128 fp32, 16 x 128 fp64, 8 warps)
    Case("sinkhorn_log_forward_kernel", "fp32", {"CHECK_TOL": True, "BLOCK_N": 32, "BLOCK_M": 128}, 8),
    Case("sinkhorn_log_forward_kernel", "fp64", {"CHECK_TOL": False, "BLOCK_N": 16, "BLOCK_M": 128}, 8),
    Case("sinkhorn_log_backward_kernel", "fp32", {"BLOCK_N": 32, "BLOCK_M": 128}, 8),
    Case("sinkhorn_log_backward_kernel", "fp64", {"BLOCK_N": 16, "BLOCK_M": 128}, 8),
    # sinkhorn.py: split regime (_split_blocks)
    Case("sinkhorn_split_row_kernel", "fp32", {"CHECK_TOL": True, **TILE_16x128}),
    Case("sinkhorn_split_row_kernel", "fp64", {"CHECK_TOL": False, **TILE_16x64}),
    Case("sinkhorn_split_col_kernel", "fp32", {"CHECK_TOL": True, "ERR_BLOCKS": 64, **TILE_64x32}),
    Case("sinkhorn_split_col_kernel", "fp64", {"CHECK_TOL": False, "ERR_BLOCKS": 16, **TILE_32x32}),
    Case("sinkhorn_split_backward_row_kernel", "fp32", TILE_16x128),
    Case("sinkhorn_split_backward_row_kernel", "fp64", TILE_16x64),
    Case("sinkhorn_split_backward_col_kernel", "fp32", TILE_64x32),
    Case("sinkhorn_split_backward_col_kernel", "fp64", TILE_32x32),
    # sinkhorn.py: sinkhorn_knopp (fp32 logits only)
    Case("sinkhorn_knopp_col_kernel", "fp32", TILE_64x32),
    Case("sinkhorn_knopp_row_kernel", "fp32", {"SPLIT": False, **TILE_16x128}),
    Case("sinkhorn_knopp_row_kernel", "fp32", {"SPLIT": True, **TILE_16x128}),
    Case("sinkhorn_knopp_merge_kernel", "fp32", {"BLOCK": 256}),
    Case("sinkhorn_knopp_plan_kernel", "fp32", {"BLOCK_N": 32, "BLOCK_M": 128}),
    # neighborhood.py (_blocks: N = 512 fp32 with a mask, N = 64 fp64 without: mask_ptr is then kl)
    Case("neighborhood_forward_kernel", "fp32",
         {"HAS_MASK": True, "BLOCK_I": 16, "BLOCK_N": 512, "BLOCK_D": 16}, 8, types={"mask_ptr": "*u8"}),
    Case("neighborhood_forward_kernel", "fp64",
         {"HAS_MASK": False, "BLOCK_I": 16, "BLOCK_N": 64, "BLOCK_D": 32}),
    Case("neighborhood_backward_kernel", "fp32", {"BLOCK_I": 16, "BLOCK_N": 512, "BLOCK_D": 16}, 8),
    Case("neighborhood_backward_kernel", "fp64", {"BLOCK_I": 16, "BLOCK_N": 64, "BLOCK_D": 32}),
    # similarity.py: scores (_tiles; METRIC 0 cosine / 1 dot / 2 l2; k-NN chunks write an fp32 / fp64 scratch)
    Case("similarity_kernel", "fp32", {"METRIC": 0, "EXCLUDE_SELF": False, "ACC_DTYPE": tl.float32,
         "PRECISION": "ieee", "BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_D": 32}),
    Case("similarity_kernel", "bf16", {"METRIC": 0, "EXCLUDE_SELF": False, "ACC_DTYPE": tl.float32,
         "PRECISION": "ieee", "BLOCK_N": 128, "BLOCK_M": 128, "BLOCK_D": 32}, 8),
    Case("similarity_kernel", "fp16", {"METRIC": 2, "EXCLUDE_SELF": True, "ACC_DTYPE": tl.float32,
         "PRECISION": "ieee", "BLOCK_N": 128, "BLOCK_M": 128, "BLOCK_D": 32}, 8, types={"out_ptr": "*fp32"}),
    Case("similarity_kernel", "fp32", {"METRIC": 1, "EXCLUDE_SELF": True, "ACC_DTYPE": tl.float32,
         "PRECISION": "tf32", "BLOCK_N": 128, "BLOCK_M": 128, "BLOCK_D": 32}, 8),
    Case("similarity_kernel", "fp64", {"METRIC": 2, "EXCLUDE_SELF": True, "ACC_DTYPE": tl.float64,
         "PRECISION": "ieee", "BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_D": 16}),
    # similarity.py: on-chip k-NN (32 x 128 tiles, 16 warps; LOG_K = log2 of the padded k, 1..7)
    Case("knn_topk_kernel", "fp32", {"METRIC": 0, "EXCLUDE_SELF": True, "PRECISION": "ieee",
         "LOG_K": 7, "LOG_N": 5, "LOG_M": 7, "BLOCK_D": 32}, 16),
    Case("knn_topk_kernel", "bf16", {"METRIC": 2, "EXCLUDE_SELF": False, "PRECISION": "ieee",
         "LOG_K": 3, "LOG_N": 5, "LOG_M": 7, "BLOCK_D": 32}, 16),
    Case("knn_topk_kernel", "fp32", {"METRIC": 1, "EXCLUDE_SELF": False, "PRECISION": "tf32",
         "LOG_K": 1, "LOG_N": 5, "LOG_M": 7, "BLOCK_D": 32}, 16),
    Case("knn_l2_values_kernel", "fp16", {"ACC_DTYPE": tl.float32, "BLOCK_P": 64, "BLOCK_D": 32}),
    Case("knn_l2_values_kernel", "fp64", {"ACC_DTYPE": tl.float64, "BLOCK_P": 64, "BLOCK_D": 32}),
    # similarity.py: cosine backward (g, y in the input dtype; s, out in the accumulation dtype)
    Case("scaled_matmul_kernel", "fp32", {"ACC_DTYPE": tl.float32, "PRECISION": "ieee",
         "BLOCK_N": 64, "BLOCK_M": 32, "BLOCK_D": 64}),
    Case("scaled_matmul_kernel", "fp32", {"ACC_DTYPE": tl.float32, "PRECISION": "tf32",
         "BLOCK_N": 64, "BLOCK_M": 32, "BLOCK_D": 64}, types={"g_ptr": "*bf16", "y_ptr": "*bf16"}),
    Case("scaled_matmul_kernel", "fp64", {"ACC_DTYPE": tl.float64, "PRECISION": "ieee",
         "BLOCK_N": 32, "BLOCK_M": 16, "BLOCK_D": 32}),
    # sinkhorn_features.py (_blocks for d >= 128: fp32 64 x 64 x 128, bf16 128 x 64 x 128, fp64 32 x 32 x 64;
    # STOP_MODE 0 no tol / 1 row half-step / 2 column half-step; FINISH: columns not split)
    Case("features_lse_kernel", "fp32", {"STOP_MODE": 1, "FINISH": True, "PRECISION": "ieee",
         "ERR_BLOCKS": 16, "BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_D": 128}, 8, 1),
    Case("features_lse_kernel", "fp32", {"STOP_MODE": 2, "FINISH": False, "PRECISION": "ieee",
         "ERR_BLOCKS": 16, "BLOCK_N": 128, "BLOCK_M": 64, "BLOCK_D": 128}, 8, 2, types=BF16_FEATURES),
    Case("features_lse_kernel", "fp32", {"STOP_MODE": 2, "FINISH": True, "PRECISION": "tf32", "ERR_BLOCKS": 1,
         "BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_D": 32}, 4, 2),
    Case("features_lse_kernel", "fp64", {"STOP_MODE": 0, "FINISH": True, "PRECISION": "ieee", "ERR_BLOCKS": 1,
         "BLOCK_N": 32, "BLOCK_M": 32, "BLOCK_D": 64}, 4, 2),
    Case("features_finish_kernel", "fp32", {"STOP_MODE": 2, "ERR_BLOCKS": 16, "SPLITS": 8, "BLOCK_N": 512}),
    Case("features_finish_kernel", "fp64", {"STOP_MODE": 1, "ERR_BLOCKS": 4, "SPLITS": 2, "BLOCK_N": 64}),
    Case("features_plan_kernel", "fp32", {"WITH_Z": True, "PRECISION": "ieee", "Z_PRECISION": "ieee",
         "BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_D": 128}, 8, 1),
    Case("features_plan_kernel", "fp32", {"WITH_Z": True, "PRECISION": "ieee", "Z_PRECISION": "tf32",
         "BLOCK_N": 128, "BLOCK_M": 64, "BLOCK_D": 128}, 8, 2, types=BF16_FEATURES),
    Case("features_plan_kernel", "fp64", {"WITH_Z": False, "PRECISION": "ieee", "Z_PRECISION": "ieee",
         "BLOCK_N": 32, "BLOCK_M": 32, "BLOCK_D": 64}, 4, 2),
]
# fmt: on


# ------------------------------------------------------------------ the compiling process (run as a script)
def discover_kernels() -> dict:
    """{name: JITFunction} of the kernels of s2dc_kernels.triton_kernels: @triton.jit functions defined in
    one of its modules that no @triton.jit function of the package calls."""
    from triton.runtime.jit import JITFunction

    import s2dc_kernels.triton_kernels as package

    jitted, called = {}, set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, JITFunction) and obj.fn.__module__ == module.__name__:
                if name in jitted:
                    raise RuntimeError(f"two @triton.jit functions are named {name}")
                jitted[name] = obj
                called.update(obj.fn.__code__.co_names)
    return {name: fn for name, fn in jitted.items() if name not in called}


def signature_of(fn, case: Case) -> dict:
    """The ASTSource signature {argument: Triton type} of one case."""
    signature = {}
    for param in fn.params:
        if param.is_constexpr:
            signature[param.name] = "constexpr"
        elif param.name in case.types:
            signature[param.name] = case.types[param.name]
        elif param.name.endswith("_ptr"):
            signature[param.name] = INTEGER_BUFFERS.get(param.name, "*" + case.dtype)
        else:
            signature[param.name] = "i64" if param.name.endswith("_bits") else "i32"
    return signature


def compile_case(fn, case: Case):
    """triton.compile of one case for sm_90; raises on an error or a mismatch with the kernel's constexprs."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = [param.name for param in fn.params]
    expected = {param.name for param in fn.params if param.is_constexpr}
    if set(case.constexprs) != expected:
        raise ValueError(f"constexprs {sorted(case.constexprs)} != the kernel's {sorted(expected)}")
    unknown = set(case.types) - set(names)
    if unknown:
        raise ValueError(f"types for arguments the kernel does not have: {sorted(unknown)}")
    # constexprs keyed by (argument index,): the form every Triton 3.x ASTSource accepts (newer ones map
    # names to it)
    constexprs = {(names.index(name),): value for name, value in case.constexprs.items()}
    options = {"num_warps": case.num_warps}
    if case.num_stages is not None:
        options["num_stages"] = case.num_stages
    source = ASTSource(fn=fn, signature=signature_of(fn, case), constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", TARGET_ARCH, 32), options=options)


def describe(case: Case) -> str:
    flags = ", ".join(f"{k}={getattr(v, 'name', v)}" for k, v in case.constexprs.items())
    return f"{case.kernel}[{case.dtype}; {flags}; num_warps={case.num_warps}, num_stages={case.num_stages}]"


def cuda_unavailable_reason() -> str | None:
    """Why the installed Triton cannot produce sm_90 code (no nvidia backend, no ptxas, ...), or None."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend

        make_backend(GPUTarget("cuda", TARGET_ARCH, 32))
        from triton.backends.nvidia import compiler as nvidia

        nvidia.get_ptxas(TARGET_ARCH)  # raises RuntimeError("Cannot find ptxas") without a usable ptxas
    except Exception as error:  # noqa: BLE001  (any failure here means no CUDA target at all)
        return f"Triton cannot target CUDA sm_{TARGET_ARCH}: {type(error).__name__}: {error}"
    return None


def run_all() -> dict:
    """Compile every case; the JSON-able report read by test_kernels_compile_for_sm90."""
    reason = cuda_unavailable_reason()
    if reason is not None:
        return {"unavailable": reason}
    start = time.perf_counter()
    kernels = discover_kernels()
    failures = []
    for case in CASES:
        if case.kernel not in kernels:
            failures.append(f"{describe(case)}: no such kernel (discovered: {sorted(kernels)})")
            continue
        try:
            compiled = compile_case(kernels[case.kernel], case)
            if compiled.metadata.shared > SM90_MAX_SHARED:
                failures.append(
                    f"{describe(case)}: needs {compiled.metadata.shared} bytes of shared memory, "
                    f"sm_90 allows {SM90_MAX_SHARED}"
                )
        except Exception as error:  # noqa: BLE001  (every compile error is reported, with its kernel)
            last = traceback.format_exception_only(type(error), error)[-1].strip()
            failures.append(f"{describe(case)}: {type(error).__name__}: {str(error).strip() or last}")
    return {
        "kernels": sorted(kernels),
        "without_case": sorted(set(kernels) - {case.kernel for case in CASES}),
        "cases": len(CASES),
        "failures": failures,
        "seconds": time.perf_counter() - start,
    }


# ------------------------------------------------------------------ the test
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as cache:
        env["TRITON_CACHE_DIR"] = cache  # compile for real, not from an earlier run's cache
        result = subprocess.run(
            [sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True, timeout=900
        )
    assert result.returncode == 0, f"the compiling process failed:\n{result.stdout}\n{result.stderr}"
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if "unavailable" in report:
        if "triton" in os.environ.get("S2DC_REQUIRE_BACKENDS", "").split(","):
            pytest.fail(f"triton is required (S2DC_REQUIRE_BACKENDS): {report['unavailable']}")
        pytest.skip(report["unavailable"])
    assert report["kernels"], "no Triton kernels discovered in s2dc_kernels/triton_kernels"
    problems = [f"{name}: no compile case in CASES" for name in report["without_case"]] + report["failures"]
    assert not problems, f"{len(problems)} of {report['cases']} sm_90 compile checks failed:\n" + "\n".join(
        problems
    )


if __name__ == "__main__":
    print(json.dumps(run_all()))
