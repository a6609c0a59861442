#!/usr/bin/env bash
# On a GPU machine: build the extension, verify every op on CUDA against the float64 CPU reference, run the
# test suite (its CUDA cases included), then benchmark on the GPU. Writes logs and JSON to OUTDIR.
# Usage: bash bench/gpu_check.sh OUTDIR [OPS]   (OPS: the benchmark's --ops; about 7 minutes on an H200)
set -uo pipefail
out=${1:?usage: bench/gpu_check.sh OUTDIR [OPS]}
ops=${2:-krylov_kernel,lssl,darts_edge}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
status=0
step() {  # step NAME SECONDS COMMAND...: runs COMMAND with a time limit, logs to OUTDIR/NAME.log
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1 || { echo "   FAILED (see $name.log)"; status=1; }
  echo "   $((SECONDS - t0)) s"; tail -n 4 "$out/$name.log"
}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$out/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
# The extension is built with csrc/cuda (binary_matmul, rk_finalize, int8_linear), which setup.py takes when torch
# sees a GPU and nvcc is present; the other CUDA kernels are Triton ones. `python -m pip`: a bare `pip` there can
# belong to another Python than the one with torch. Without pip in that Python, the extension is built in place and
# kernels/ is linked where the package layout puts it (accel/kernels).
export MAX_JOBS=16
step build 300 bash -c 'python -m pip install --no-build-isolation --no-deps -e . ||
  { python setup.py build_ext --inplace && ln -sfn ../kernels accel/kernels; }'
python -c "import accel.kernels, accel._C; print('accel', accel.__file__)"
step verify 120 python -m accel verify --device cuda
step tests 240 python -m pytest tests -q
step bench 170 python -m accel bench --device cuda --ops "$ops" --out "$out/bench_cuda.json" --no-report
grep -E "FAIL|checks passed" "$out/verify.log" | tail -n 15
grep -E "^\[|fwd" "$out/bench.log" | grep -E "^\[|fast|/fast" | tail -n 60
exit $status
