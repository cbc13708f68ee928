#!/usr/bin/env bash
# What remains to run on a GPU machine (H100 / H200: torch + CUDA, triton, nvcc, ninja, pytest; no
# network), from the repository root. Each part fits in one 10-minute call; logs and results go
# to $OUT (default benchmarks/results), to be committed under benchmarks/results/.
#
#   bash benchmarks/gpu_session.sh quick             # one call of about 6 minutes: environment, build, self-check, every
#        GPU test (four groups at once), sanitizers, bf16 CLIP figures, the kernels part; stops starting work after
#        QUICK_BUDGET_S (330) seconds and prints a short table last (QUICK_SWEEP_SIZES, QUICK_KERNEL_SIZES: smaller
#        sizes for a dry run)
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

build_for_this_gpu() {  # the CUDA extension for the GPU's own arch only
  MAX_JOBS=16 FUSED_LOSSES_CUDA_ARCHS="$(python3 -c 'import torch; print("%d%d" % torch.cuda.get_device_capability())')" \
    python3 -m fused_losses.backends.cuda.build
}

install_wheels() {  # peers and test dependencies carried as wheels in .whl/ (the machine has no network)
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/peers .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/peers"
  fi
}

case "${1:-}" in
  quick)  # the first GPU pass in one call; every step runs, each within its share of the budget
    set +e +o pipefail
    install_wheels  # tests/gpu/test_losses_gpu.py needs pytorch-metric-learning (benchmarks/README.md)
    start=$(date +%s)
    stop_at=$((start + ${QUICK_BUDGET_S:-330}))
    left() { echo $((stop_at - $(date +%s))); }
    log="$out/quick.log"  # at most 8 files come back from the device tool: quick, tests, sweep (2), kernels (2)
    {
      nvidia-smi
      python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))'
      nvcc --version | tail -2
      echo "== build $(date +%T)"
      timeout 150 bash -c "$(declare -f build_for_this_gpu); build_for_this_gpu" 2>&1 | tail -40
      echo "build exit ${PIPESTATUS[0]}"
      echo "== self-check $(date +%T)"
      timeout 90 python3 -m fused_losses --no-bench 2>&1 | tr '\r' '\n' | grep -v '^self-check \['
    } >"$log" 2>&1
    echo "== tests $(date +%T)" | tee -a "$log"
    test_s=$(( $(left) * 45 / 100 ))
    per_test=$(python3 -c 'import pytest_timeout' 2>/dev/null && echo "--timeout=120")
    pytest_group() {  # SIGINT at the deadline: pytest stops and still prints its summary
      echo "== pytest $*"
      timeout -s INT -k 20 "$test_s" python3 -m pytest -q -p no:cacheprovider --tb=short -rfE $per_test "$@" 2>&1
    }
    tests="$out/tests.log"
    pytest_group tests/gpu/test_losses_gpu.py -k triton >"$tests.1" &
    pytest_group tests/gpu/test_losses_gpu.py -k "not triton" >"$tests.2" &
    pytest_group tests/gpu/test_triton_gpu.py >"$tests.3" &
    pytest_group tests/gpu/test_cuda_gpu.py tests/gpu/test_chunked_backward_gpu.py >"$tests.4" &
    (for tool in memcheck racecheck synccheck; do  # the CUDA kernels on small ragged inputs
      echo "== compute-sanitizer $tool"
      timeout -k 10 "$test_s" compute-sanitizer --tool "$tool" --error-exitcode 1 python3 -m pytest -q \
        -p no:cacheprovider tests/gpu/test_cuda_gpu.py -k memcheck 2>&1 | tail -15
      echo "sanitizer exit ${PIPESTATUS[0]}"
    done) >"$tests.5" 2>&1 &
    wait
    for part in 1 2 3 4 5; do cat "$tests.$part"; echo; done >"$tests" && rm "$tests".[1-5]
    echo "== bf16 CLIP sweep $(date +%T), $(left) s left" | tee -a "$log"
    python3 -m benchmarks.run --losses clip --dtypes bfloat16 --batch-sizes ${QUICK_SWEEP_SIZES:-16384 65536} --dims 512 1024 \
      --providers triton cuda torch reference --repeats 5 --budget-ms 200 --slow-limit-s 2 \
      --time-limit-s "$(( $(left) * 60 / 100 ))" --out-dir "$out" >"$out/sweep.log" 2>&1
    echo "sweep exit $?" | tee -a "$log"
    echo "== kernels $(date +%T), $(left) s left" | tee -a "$log"
    timeout -s INT -k 10 "$(( $(left) > 20 ? $(left) : 20 ))" python3 -m benchmarks.kernels \
      --sizes ${QUICK_KERNEL_SIZES:-65536x512 65536x1024} --out "$out/kernels.jsonl" >"$out/kernels.log" 2>&1
    echo "kernels exit $?" | tee -a "$log"
    echo "== summary $(date +%T), $(( $(date +%s) - start )) s" | tee -a "$log"
    grep -E "^build exit|FAIL|^self-check (passed|FAILED)" "$log"
    grep -E "^== | in [0-9.]+s|[Ii]nterrupted|sanitizer exit|^(FAILED|ERROR) " "$tests" | cut -c1-200 | head -40
    grep -E "^\|" "$out/sweep.log" | tail -30
    grep -E "^\|" "$out/kernels.log"
    ;;
  checks)  # every step runs; the exit status says whether all passed
    log="$out/gpu_checks.log"
    status=0
    install_wheels
    nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$log"
    build_for_this_gpu 2>&1 | tee -a "$log" || status=1
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
    install_wheels
    python3 -m benchmarks.run --preset "$preset" --out-dir "$out"
    ;;
  kernels)  # builds the CUDA extension first (~1 min) so that its pieces are timed too (skipped if it fails)
    log="$out/kernels.log"
    build_for_this_gpu 2>&1 | tail -3 | tee "$log" || true
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
