// The C++ unit tests' check: print a failed condition and count it; main returns 1 when any failed.
#pragma once

#include <cstdio>
#include <string>

namespace s2dc_test {

inline int failures = 0;

inline void check(bool condition, const std::string& what) {
  if (!condition) {
    std::printf("FAIL: %s\n", what.c_str());
    ++failures;
  }
}

// Prints the summary; the exit status of main: 1 when any check failed.
inline int report() {
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all checks passed\n");
  return 0;
}

}  // namespace s2dc_test
