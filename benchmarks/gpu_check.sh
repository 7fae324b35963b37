#!/usr/bin/env bash
# The first run on a GPU: kernel tests compiled, kernels against their roofline at
# gpt-oss-120b shapes, engine tokens/s at gpt-oss-20b shapes, and a 120b decode step
# scaled from a few layers.  One table in $OUT (default ./gpu-check/).  Made for a bare
# H100/H200 image (torch, triton, safetensors; no network); <= 8 minutes.
#
#   benchmarks/gpu_check.sh            # on the GPU
#   benchmarks/gpu_check.sh --dry-run  # tiny shapes, CPU, Triton interpreter (part of `make test`)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${OUT:-./gpu-check}"
python="${PYTHON:-python3}"
limit="${GPU_CHECK_TIMEOUT:-480}"  # seconds: the 8-minute budget
mkdir -p "$out"
status=0
timeout --signal=INT "$limit" "$python" "$here/gpu_check.py" --out "$out" "$@" 2>&1 | tee "$out/gpu_check.log" || status=$?
echo "gpu_check: exit $status, table in $out/gpu_check.md"
exit "$status"
