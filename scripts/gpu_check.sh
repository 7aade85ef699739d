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

# Wheels carried in .whl/ (packages the GPU image lacks: nibabel, POT, flash-sinkhorn), installed beside the
# image's own.
if compgen -G ".whl/*.whl" >/dev/null; then
    python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/s2dc-site \
        .whl/*.whl >>"$out/install.log" 2>&1 && export PYTHONPATH=/tmp/s2dc-site${PYTHONPATH:+:$PYTHONPATH}
fi

# The CUDA kernels or a failed step (not a silent CPU-only build), for this GPU's architecture only.
arch=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
export S2DC_FORCE_CUDA=1 S2DC_CUDA_ARCHS=${S2DC_CUDA_ARCHS:-${arch:-9.0}} MAX_JOBS=${MAX_JOBS:-$(nproc)}
required=triton,cuda  # the CUDA tests fail (not skip) when these backends cannot run
if ! step install 240 "$out/install.log" python -m pip install --no-build-isolation --no-deps -e .; then
    echo "install failed: going on with the Python and Triton paths from the source tree (see install.log)"
    required=triton
fi

step backends 60 "$out/env.txt" python -c \
    "import s2dc_kernels; print('available backends:', s2dc_kernels.available_backends())"
tail -n 1 "$out/env.txt"

# Triton compiles each kernel variant the tests touch: spread them over processes when pytest-xdist is there.
# The files in order of what the open work needs first (a time-out loses the last ones), every test file named.
parallel=()
python -c "import xdist" 2>/dev/null && parallel=(-n 8)
test_files=(tests/test_sinkhorn.py tests/test_sinkhorn_knopp.py tests/test_train_losses.py tests/test_train_loop.py
    tests/test_train_data.py tests/test_sinkhorn_features.py tests/test_neighborhood_fused.py tests/test_similarity.py)
missing=$(comm -23 <(ls tests/test_*.py | grep -v test_triton_compile | sort) <(printf '%s\n' "${test_files[@]}" | sort))
[ -n "$missing" ] && echo "gpu_check: test files not in its list (appended): $missing" && test_files+=($missing)
step tests 240 "$out/tests.log" env S2DC_REQUIRE_BACKENDS=$required python -m pytest "${test_files[@]}" -m cuda -q -ra \
    "${parallel[@]}"
tail -n 3 "$out/tests.log"

# One process per benchmark script (a kernel fault loses one script, not all), each with the time left
# less 60 s for every script after it and the training step's share below. BENCH_SCRIPTS and BENCH_FLAGS
# choose the scripts and their flags; by default our GPU backends (with the tf32 / bf16 variants), eager,
# eager-topk, the bare bmm floor and FlashSinkhorn (when its wheel is in .whl/), but not torch.compile, POT or
# the per-problem loop, whose compile or run times do not fit one check (BENCH_FLAGS=" " runs every provider).
scripts=(${BENCH_SCRIPTS:-bench_sinkhorn bench_similarity bench_train})
ours=s2dc-triton,s2dc-triton-program,s2dc-triton-split,s2dc-triton-tf32,s2dc-triton-bf16,s2dc-cuda,s2dc-fused,s2dc-fused-cuda
BENCH_FLAGS=${BENCH_FLAGS:---providers $ours,eager,eager-topk,bmm,flash-sinkhorn}
train_seconds=120
for i in "${!scripts[@]}"; do
    left=$((deadline - SECONDS - 20 - train_seconds - 60 * (${#scripts[@]} - i - 1)))
    step "${scripts[i]}" $((left > 45 ? left : 45)) "$out/bench.log" \
        python "benchmarks/${scripts[i]}.py" --gpu --csv "$out/results.csv" $BENCH_FLAGS
done
# recall@k of the k-NN providers against the exact search (bench_similarity; the CSV has no column for it).
grep "^knn recall@k" "$out/bench.log"

# The loss path's share of a training step at the official geometry (4 x 4 crops of 96^3, 3 x 3 x 3 tokens,
# 4 volumes): a synthetic 400 x 400 x 100 volume, 8 steps per ops setting, medians of the last 5 (the CPU-side
# crop sampling takes ~3 s per step at this geometry, outside the timed step).
train_share() {
    python -c "import nibabel as nib, numpy as np; nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=(400, 400, 100)).astype(np.float32), np.eye(4)), '/tmp/s2dc_volume.nii.gz')" || return 1
    for ops in fused reference; do
        python -m s2dc_kernels.train --data /tmp/s2dc_volume.nii.gz --preset mri --device cuda --ops "$ops" \
            --steps 8 --save-every 1000 --grid 4 4 --crop 96 --depth 96 --token-stride 32 \
            --out "/tmp/s2dc_train_$ops" >/dev/null || return 1
        python -c "import json, statistics as st; rows = [json.loads(l) for l in open('/tmp/s2dc_train_$ops/metrics.jsonl')][-5:]; loss, step = (st.median(r[k] for r in rows) * 1e3 for k in ('time_loss_s', 'time_step_s')); print(f'train step, official geometry, --ops $ops: loss path {loss:.2f} ms of a {step:.2f} ms step ({100 * loss / step:.1f}%)')"
    done
}
export -f train_share
step train $train_seconds "$out/bench.log" bash -c train_share
grep "^train step" "$out/bench.log"

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
