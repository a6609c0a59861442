#!/usr/bin/env bash
# Compile-checks every CUDA source in csrc/cuda with nvcc (no torch headers needed: the .cu files hold
# plain launchers). Skips, saying so, when nvcc is absent. Usage: bash .ci/compile_cuda.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null; then
  echo "nvcc not found: CUDA sources not compile-checked"
  exit 0
fi
shopt -s nullglob
sources=(csrc/cuda/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
  echo "no CUDA sources in csrc/cuda"
  exit 0
fi
out=$(mktemp -d)
for src in "${sources[@]}"; do
  echo "nvcc -c $src"
  nvcc -std=c++17 -O3 -Icsrc -arch=sm_90 -c "$src" -o "$out/$(basename "$src").o"
done
echo "compiled ${#sources[@]} CUDA source(s) with $(nvcc --version | tail -1)"
