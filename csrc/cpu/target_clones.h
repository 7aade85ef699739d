// S2DC_TARGET_CLONES: compile a hot loop for AVX-512, AVX2 + FMA and baseline x86-64; the dynamic loader picks
// one per machine (GCC function multiversioning, glibc). Helpers called from it must be always-inlined so that
// they are compiled for the same instruction set. Elsewhere it expands to nothing.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__)
#define S2DC_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define S2DC_TARGET_CLONES
#endif
