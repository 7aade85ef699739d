"""Rewrites a CUDA source for the CPU emulation (cuda_emulation.h): usage: transform.py IN.cu OUT.cpp

- `kernel<<<grid, block, bytes, stream>>>(args)` becomes
  `::emu::launch(kernel, ::emu::LaunchConfig{grid, block, bytes, stream}, args)`;
- `extern __shared__ ... T name[];` becomes a macro for the block's dynamic arena,
  `(T*)emu::dynamic_shared()`;
- `__shared__ T name[N];` and `__shared__ T name;` become per-block `static emu::Shared<T, N>` /
  `emu::SharedScalar<T>`.
Any other `__shared__` or `<<<` left is an error, so that a construct the emulator does not know fails loudly.
"""

import re
import sys

source = open(sys.argv[1]).read()

launch = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
source, launches = launch.subn(lambda m: f"::emu::launch({m[1]}, ::emu::LaunchConfig{{{m[2]}}}, ", source)

dynamic = re.compile(r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([\w\s]+?)\s+(\w+)\s*\[\s*\]\s*;")
source = dynamic.sub(
    lambda m: f"\n#define {m[2]} (reinterpret_cast<{m[1]}*>(::emu::dynamic_shared()))\n", source
)

array = re.compile(r"__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([\w:<>\s]+?)\s+(\w+)\s*\[([^\]]+)\]\s*;")
source = array.sub(lambda m: f"static ::emu::Shared<{m[1]}, {m[3]}> {m[2]};", source)
scalar = re.compile(r"__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([\w:<>\s]+?)\s+(\w+)\s*;")
source = scalar.sub(lambda m: f"static ::emu::SharedScalar<{m[1]}> {m[2]};", source)

leftover = [line for line in source.splitlines() if "__shared__" in line or "<<<" in line]
if leftover or launches == 0:
    sys.exit(
        "transform.py: constructs the emulator does not handle:\n"
        + "\n".join(leftover or ["no launch found"])
    )
open(sys.argv[2], "w").write('#include "cuda_emulation.h"\n' + source)
