#!/usr/bin/env bash
# On a GPU machine: build the extension with its CUDA sources, run the test suite with CUDA visible,
# verify every op on the GPU and benchmark it there. Writes logs and JSON to OUTDIR.
# Usage: bash bench/gpu_check.sh OUTDIR      (budget: under 8 minutes on an H100)
set -uo pipefail
out=${1:?usage: bench/gpu_check.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
status=0
step() {  # step NAME COMMAND...: runs COMMAND, logs to OUTDIR/NAME.log, remembers a failure
  local name=$1; shift
  echo "== $name: $*"
  local t0=$SECONDS
  "$@" >"$out/$name.log" 2>&1 || { echo "   FAILED (see $name.log)"; status=1; }
  echo "   $((SECONDS - t0)) s"; tail -n 3 "$out/$name.log"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out/gpu.txt" 2>&1
step build env ACCEL_FORCE_CUDA=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 pip install --no-build-isolation -e .
step info python -m accel info
step tests timeout 240 python -m pytest tests -q -x
step verify python -m accel verify --device cuda
step bench timeout 240 python -m accel bench --device cuda --out "$out/bench_cuda.json" --no-report
exit $status
