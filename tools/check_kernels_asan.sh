#!/usr/bin/env bash
# Build the kernel library together with tools/kernel_selftest.cc under AddressSanitizer + UBSan and run
# it: every aot entry point on random shapes, every instruction set this CPU has, 1 and 2 threads,
# exact-size buffers (so any out-of-bounds access aborts with a report). Needs g++ with libasan.
#   tools/check_kernels_asan.sh            # ASan + UBSan
#   tools/check_kernels_asan.sh valgrind   # the same self-test under valgrind memcheck (no sanitizers)
set -euo pipefail
cd "$(dirname "$0")/.."
src=msbnb_pass/kernels/csrc
out=${TMPDIR:-/tmp}/msbnb_kernel_selftest
if [ "${1:-}" = "valgrind" ]; then
  g++ -std=c++17 -O1 -g -pthread -I "$src" tools/kernel_selftest.cc "$src"/*.cc -o "$out"
  valgrind --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite "$out"
else
  g++ -std=c++17 -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer \
    -pthread -I "$src" tools/kernel_selftest.cc "$src"/*.cc -o "$out"
  ASAN_OPTIONS=detect_leaks=1 "$out"
fi
