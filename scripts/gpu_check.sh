#!/usr/bin/env bash
# The GPU check: build, CUDA tests and benchmarks on a fresh CUDA machine (torch and triton installed,
# no internet), all logs and results in OUTDIR. Every step is time-limited (the whole run stays under
# GPU_CHECK_SECONDS, default 480); a failing step does not stop the others, but the exit status is 1.
#
#   scripts/gpu_check.sh OUTDIR
#
# OUTDIR gets: env.txt (GPU, driver, versions, backends), install.log, tests.log, bench.log,
# results.csv (benchmark rows, appended as measured), results.md (their tables), speedup.png.
set -u
out=${1:?usage: scripts/gpu_check.sh OUTDIR}
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.." || exit 1
deadline=$((SECONDS + ${GPU_CHECK_SECONDS:-480}))
failed=()

# step NAME SECONDS LOG CMD...: run CMD under `timeout`, its output appended to LOG; record a failure.
step() {
    local name=$1 limit=$2 log=$3 start=$SECONDS rc
    shift 3
    timeout --kill-after=15 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    echo "[$name] exit $rc after $((SECONDS - start)) s (log: $log)"
    if [ "$rc" -ne 0 ]; then
        failed+=("$name (exit $rc$([ "$rc" -eq 124 ] && echo ', timed out'))")
    fi
    return "$rc"
}

{
    date -u +"%F %T UTC"
    git rev-parse --verify -q HEAD || echo "no commit yet"
    nvidia-smi
    nvcc --version 2>/dev/null | tail -n 2
    python - <<'PY'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda})")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError:
    print("triton: not installed")
print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
PY
} >"$out/env.txt" 2>&1

# The CUDA kernels or a failed step (not a silent CPU-only build), for this GPU's architecture only.
arch=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
export S2DC_FORCE_CUDA=1 S2DC_CUDA_ARCHS=${S2DC_CUDA_ARCHS:-${arch:-9.0}} MAX_JOBS=${MAX_JOBS:-$(nproc)}
required=triton,cuda  # the CUDA tests fail (not skip) when these backends cannot run
if ! step install 240 "$out/install.log" pip install --no-build-isolation --no-deps -e .; then
    echo "install failed: going on with the Python and Triton paths from the source tree (see install.log)"
    required=triton
fi

step backends 60 "$out/env.txt" python -c \
    "import s2dc_kernels; print('available backends:', s2dc_kernels.available_backends())"
tail -n 1 "$out/env.txt"

step tests 150 "$out/tests.log" env S2DC_REQUIRE_BACKENDS=$required python -m pytest tests -m cuda -q -ra
tail -n 3 "$out/tests.log"

left=$((deadline - SECONDS - 30))
step bench $((left > 60 ? left : 60)) "$out/bench.log" python benchmarks/run.py --gpu --csv "$out/results.csv"

if [ -s "$out/results.csv" ]; then
    plot=()
    python -c "import matplotlib" 2>/dev/null && plot=(--plot "$out/speedup.png")
    timeout 60 python benchmarks/render.py --csv "$out/results.csv" --stdout "${plot[@]}" \
        >"$out/results.md" 2>>"$out/bench.log" || failed+=("render")
    echo
    cat "$out/results.md"
else
    failed+=("results (no benchmark rows)")
fi

echo
if [ ${#failed[@]} -eq 0 ]; then
    echo "gpu_check: all steps passed ($SECONDS s); outputs in $out"
    exit 0
fi
echo "gpu_check: FAILED: ${failed[*]} ($SECONDS s); outputs in $out"
exit 1
