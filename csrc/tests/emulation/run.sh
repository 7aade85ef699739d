#!/usr/bin/env bash
# CPU emulation of csrc/cuda/sinkhorn.cu against the CPU kernels (run by `make cpp-test`, so in CI).
# Usage: csrc/tests/emulation/run.sh [path/to/sinkhorn.cu]   (default: the repository's; build in $EMU_BUILD)
#   1. transform.py rewrites the .cu for cuda_emulation.h (launch syntax, __shared__ declarations);
#   2. AddressSanitizer + UndefinedBehaviorSanitizer build, all cases (out-of-bounds accesses, including past the
#      launch's dynamic shared arena, and undefined behaviour);
#   3. ThreadSanitizer build, the cases with max(N, M) <= 64 (data races between emulated threads on any memory: shared arena,
#      static __shared__, global; happens-before only through __syncthreads, shuffles and the end of the launch).
# EMU_STAGES="asan tsan" (default) selects the runs. Exit status 0 when they pass.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
source_cu="$(realpath "${1:-$repo/csrc/cuda/sinkhorn.cu}")"
build="${EMU_BUILD:-/tmp/s2dc_emulation}"
mkdir -p "$build"

python3 "$here/transform.py" "$source_cu" "$build/sinkhorn_emulated.cpp"
includes=(-I"$here/include" -I"$here" -I"$(dirname "$source_cu")" -I"$repo/csrc")
g++ -O2 -std=c++20 -fopenmp-simd -fno-trapping-math -c "$repo/csrc/cpu/sinkhorn.cpp" -o "$build/cpu_sinkhorn.o" &
build_variant() {  # name, sanitizer flags...
  local name="$1"
  shift
  g++ -O1 -g -std=c++20 -pthread "$@" "${includes[@]}" -c "$build/sinkhorn_emulated.cpp" -o "$build/cuda_$name.o"
  g++ -O1 -g -std=c++20 -pthread "$@" "${includes[@]}" -c "$here/run_emulation.cpp" -o "$build/driver_$name.o"
}
build_variant asan -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer &
build_variant tsan -fsanitize=thread
wait
wait
g++ -pthread -fsanitize=address,undefined "$build/cuda_asan.o" "$build/driver_asan.o" "$build/cpu_sinkhorn.o" \
  -o "$build/emulation_asan"
g++ -pthread -fsanitize=thread "$build/cuda_tsan.o" "$build/driver_tsan.o" "$build/cpu_sinkhorn.o" \
  -o "$build/emulation_tsan"

stages="${EMU_STAGES:-asan tsan}"
status=0
if [[ " $stages " == *" asan "* ]]; then
  echo "== AddressSanitizer + UBSan, all cases"
  ASAN_OPTIONS=detect_leaks=0 timeout 240 "$build/emulation_asan" || status=1
fi
if [[ " $stages " == *" tsan "* ]]; then
  echo "== ThreadSanitizer, the cases with max(N, M) <= 64"
  TSAN_OPTIONS="halt_on_error=0 exitcode=66 report_signal_unsafe=0" timeout 240 "$build/emulation_tsan" --quick \
    2> "$build/tsan.log" || status=1
  races=$(grep -c "WARNING: ThreadSanitizer" "$build/tsan.log" || true)
  echo "ThreadSanitizer reports: $races (log: $build/tsan.log)"
  [ "$races" -eq 0 ] || { grep -A12 "WARNING: ThreadSanitizer" "$build/tsan.log" | head -40; status=1; }
  grep -h "EMULATION FATAL" "$build/tsan.log" || true
fi
[ $status -eq 0 ] && echo "EMULATION PASSED" || echo "EMULATION FAILED"
exit $status
