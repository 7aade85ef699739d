#!/usr/bin/env bash
# Checks that the emulation catches bugs: builds mutants of csrc/cuda/sinkhorn.cu (each one deliberate bug) and
# expects run.sh to fail on every one. A mutant whose pattern no longer matches the source is reported as stale.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source_cu="$here/../../cuda/sinkhorn.cu"
work="${EMU_BUILD:-/tmp/s2dc_emulation}/mutants"
mkdir -p "$work"
# name | stages | python regex | replacement
mutants=(
  "sign|asan|column_sums\[c\] -= Fi \* pr|column_sums[c] += Fi * pr"
  "shared_overflow|asan|(copy_to_shared\(Cb, reinterpret_cast<T\*>\(sinkhorn_shared\) \+ N \+ M)|\1 + ldc"
  "divergent_barrier|asan|__syncthreads\(\);  // every warp has read G|if (warp > 0) __syncthreads();"
  "missing_barrier|tsan|__syncthreads\(\);\n(\s*const T\* f_cur)|\1"
)
missed=0
for m in "${mutants[@]}"; do
  IFS='|' read -r name stages pattern replacement <<< "$m"
  if ! python3 - "$source_cu" "$work/$name.cu" "$pattern" "$replacement" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
mutated, count = re.subn(sys.argv[3], sys.argv[4], text, count=1)
open(sys.argv[2], "w").write(mutated)
sys.exit(0 if count == 1 else 1)
PY
  then
    echo "STALE mutant $name: pattern not found"; missed=1; continue
  fi
  cp "$(dirname "$source_cu")/sinkhorn.h" "$work/sinkhorn.h"
  if EMU_STAGES="$stages" EMU_BUILD="$work/build_$name" "$here/run.sh" "$work/$name.cu" > "$work/$name.log" 2>&1; then
    echo "MISSED mutant $name ($stages): run.sh passed (log: $work/$name.log)"; missed=1
  else
    echo "caught mutant $name ($stages):"; grep -m3 -E "FAIL|ERROR: AddressSanitizer|WARNING: ThreadSanitizer|FATAL" "$work/$name.log" | cut -c1-200
  fi
done
exit $missed
