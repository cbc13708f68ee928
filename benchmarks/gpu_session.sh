#!/usr/bin/env bash
# What remains to run on a GPU machine (H100 / H200: torch + CUDA, triton, nvcc, ninja, pytest; no
# network), from the repository root. Each part fits in one 10-minute call; logs and results go
# to $OUT (default benchmarks/results), to be committed under benchmarks/results/.
#
#   bash benchmarks/gpu_session.sh checks            # build the CUDA extension, every GPU test, compute-sanitizer
#   bash benchmarks/gpu_session.sh sweep PRESET      # one part of the benchmark sweep (benchmarks/README.md):
#        gpu-bf16-clip gpu-bf16-siglip gpu-fp32-clip gpu-fp32-siglip gpu-max-batch-clip gpu-max-batch-siglip
#   bash benchmarks/gpu_session.sh kernels [NxD ...] # each piece of the CLIP forward+backward against torch.mm,
#        bf16 (benchmarks/kernels.py; default 65536x512 65536x1024, give 32768x512 32768x1024 if short): < 5 min
#
# Peers for the sweep (Inf-CL, open_clip) travel as wheels in .whl/ (benchmarks/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

case "${1:-}" in
  checks)  # every step runs; the exit status says whether all passed
    log="$out/gpu_checks.log"
    status=0
    nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$log"
    MAX_JOBS=16 FUSED_LOSSES_CUDA_ARCHS="$(python3 -c 'import torch; print("%d%d" % torch.cuda.get_device_capability())')" \
      python3 -m fused_losses.backends.cuda.build 2>&1 | tee -a "$log" || status=1
    python3 -m fused_losses --no-bench 2>&1 | tee -a "$log" || status=1
    python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee -a "$log" || status=1
    for tool in memcheck racecheck synccheck; do  # the CUDA kernels on small ragged inputs
      compute-sanitizer --tool "$tool" --error-exitcode 1 python3 -m pytest -q -p no:cacheprovider \
        tests/gpu/test_cuda_gpu.py -k memcheck 2>&1 | tee -a "$log" || status=1
    done
    exit "$status"
    ;;
  sweep)
    preset="${2:?name a preset, e.g. gpu-bf16-clip}"
    if ls .whl/*.whl >/dev/null 2>&1; then
      python3 -m pip install -q --no-index --no-deps --target /tmp/peers .whl/*.whl
      export PYTHONPATH="$PYTHONPATH:/tmp/peers"
    fi
    python3 -m benchmarks.run --preset "$preset" --out-dir "$out"
    ;;
  kernels)  # builds the CUDA extension first (~1 min) so that its pieces are timed too (skipped if it fails)
    log="$out/kernels.log"
    MAX_JOBS=16 FUSED_LOSSES_CUDA_ARCHS="$(python3 -c 'import torch; print("%d%d" % torch.cuda.get_device_capability())')" \
      python3 -m fused_losses.backends.cuda.build 2>&1 | tail -3 | tee "$log" || true
    shift
    sizes=("$@")
    [ ${#sizes[@]} -gt 0 ] || sizes=(65536x512 65536x1024)
    python3 -m benchmarks.kernels --sizes "${sizes[@]}" --out "$out/kernels_$(date +%Y-%m-%d).jsonl" 2>&1 | tee -a "$log"
    ;;
  *)
    sed -n '2,12p' "$0"
    exit 2
    ;;
esac
