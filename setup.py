"""Build of s2dc-kernels and its compiled extension ``s2dc_kernels._C``.

    pip install --no-build-isolation -e .

(--no-build-isolation: compile against the torch already installed instead of a second one in an isolated
environment.) The extension always holds the C++ CPU kernels, and the CUDA kernels when both a CUDA build of
torch and a CUDA toolkit (nvcc, located by torch through CUDA_HOME or PATH) are present; no GPU is needed to
build. Its sources are listed in csrc/sources.txt, which CMakeLists.txt (the C++ unit tests) reads too. The
package imports and works without the extension: the "torch" and "triton" backends need none.

Environment switches:
    S2DC_FORCE_CUDA=1      build the CUDA kernels or fail with the reason (default: build them when possible)
    S2DC_SKIP_CUDA=1       never build the CUDA kernels
    S2DC_SKIP_EXTENSION=1  build no extension at all (a pure-Python install)
    S2DC_CUDA_ARCHS        the CUDA compute capabilities to compile for, ";"-separated, "+PTX" also embeds PTX
                           (default "8.0;9.0")
    MAX_JOBS               the number of parallel compile jobs (with ninja)

Compiler flags: -O3; -fopenmp, so that at::parallel_for in the bindings runs on torch's OpenMP threads and the
kernels' OpenMP SIMD pragmas vectorise their reductions; -fno-trapping-math, so that the branch-free exp2 and
log2 of csrc/cpu/vector_math.h if-convert in vector loops; no -ffast-math (the kernels rely on -inf and NaN
semantics).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def env_flag(name: str) -> bool:
    """True when the environment variable ``name`` is set to 1/true/yes/on."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def read_sources() -> dict[str, list[str]]:
    """csrc/sources.txt as {group: [paths relative to the repository root]}."""
    groups: dict[str, list[str]] = {}
    group: list[str] | None = None
    for raw in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            group = groups.setdefault(line[1:-1], [])
        elif group is None:
            raise ValueError(f"csrc/sources.txt: {line!r} comes before any [group]")
        else:
            group.append(line)
    return groups


def cuda_gencode_flags(archs: str) -> list[str]:
    """nvcc -gencode flags for "8.0;9.0+PTX"-style capability lists (spaces also separate)."""
    flags = []
    for arch in archs.replace(" ", ";").split(";"):
        arch = arch.strip()
        if not arch:
            continue
        capability = arch.removesuffix("+PTX")
        if not capability.replace(".", "").replace("a", "").isdigit() or "." not in capability:
            raise ValueError(f"S2DC_CUDA_ARCHS: {arch!r} is not a compute capability like 9.0 or 9.0+PTX")
        num = capability.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    if not flags:
        raise ValueError("S2DC_CUDA_ARCHS is empty")
    return flags


def cuda_build_reason() -> str | None:
    """Why the CUDA kernels cannot be built here (None when they can)."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if CUDA_HOME is None:
        return "no CUDA toolkit was found (set CUDA_HOME or put nvcc on PATH)"
    return None


def extensions() -> tuple[list, dict]:
    """(ext_modules, cmdclass) of the build: s2dc_kernels._C with or without its CUDA sources."""
    if env_flag("S2DC_SKIP_EXTENSION"):
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    if env_flag("S2DC_FORCE_CUDA") and env_flag("S2DC_SKIP_CUDA"):
        raise RuntimeError("S2DC_FORCE_CUDA and S2DC_SKIP_CUDA are both set")
    reason = "S2DC_SKIP_CUDA is set" if env_flag("S2DC_SKIP_CUDA") else cuda_build_reason()
    if reason is not None and env_flag("S2DC_FORCE_CUDA"):
        raise RuntimeError(f"S2DC_FORCE_CUDA=1 but the CUDA kernels cannot be built: {reason}")

    sources = read_sources()
    # C++20 (std::bit_cast in the CPU kernels) whatever standard this torch version passes by default
    cxx_flags = ["-O3", "-fno-trapping-math", "-std=c++20"]
    link_flags = []
    if sys.platform.startswith("linux"):  # torch's Linux wheels run at::parallel_for on OpenMP (libgomp)
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    else:
        cxx_flags.append("-fopenmp-simd")
    common = dict(
        name="s2dc_kernels._C",
        include_dirs=[str(ROOT / "csrc")],
        extra_link_args=link_flags,
    )
    if reason is None:
        archs = os.environ.get("S2DC_CUDA_ARCHS", "8.0;9.0")
        print(f"s2dc-kernels: building the CPU and CUDA kernels (compute capabilities {archs})")
        ext = CUDAExtension(
            sources=sources["cpu_kernels"]
            + sources["torch_bindings"]
            + sources["cuda_kernels"]
            + sources["cuda_bindings"],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo", *cuda_gencode_flags(archs)]},
            **common,
        )
    else:
        print(f"s2dc-kernels: building the CPU kernels only ({reason})")
        ext = CppExtension(
            sources=sources["cpu_kernels"] + sources["torch_bindings"],
            extra_compile_args={"cxx": cxx_flags},
            **common,
        )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
