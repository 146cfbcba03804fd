#!/usr/bin/env bash
# Every check that needs a CUDA GPU, as one command, for a machine that has one and PyTorch
# (Ray, MLflow and FAISS are not needed, so it also runs on a bare GPU box with the repository
# copied over): the GPU rows of the training benchmark (ResNet-32 CR overhead), the
# CUDA-parametrized tests of curvature/ and CR, CR's patch and pair eigen-problems (cuSOLVER
# against the round-robin Triton kernel), where CR's graphed path spends its GPU time (its
# kernels profiled one by one) and the GPU rows of the geometry benchmark.
#
#   bash benchmarks/gpu_check.sh            # PYTHON=... to pick the interpreter
#
# GPU time is usually lent by the minute, so every stage runs whatever the others did, each under
# its own time limit (a hang costs that stage, not the rest; the limits add up to 555 s), the
# training rows first since they are what the GPU is mostly wanted for. A summary line per stage
# closes the log, and the command fails when any stage did. The log also goes to
# $OUT/gpu_check.log when OUT is set (a folder that is collected afterwards). FAISS's GPU index is
# not checked here: it needs faiss-gpu, which is not a dependency.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log="${OUT:-/tmp}/gpu_check.log"
summary=()
failed=0

# stage NAME SECONDS COMMAND...: run COMMAND under a time limit and note how it ended.
stage() {
    local name="$1" limit="$2" start rc
    shift 2
    echo "=== $name (limit ${limit} s)"
    start=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
        summary+=("$name: TIMED OUT after $((SECONDS - start)) s")
    elif [[ $rc -ne 0 ]]; then
        summary+=("$name: FAILED (exit $rc) after $((SECONDS - start)) s")
    else
        summary+=("$name: ok in $((SECONDS - start)) s")
    fi
    [[ $rc -eq 0 ]] || failed=1
}

{
    if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check: no CUDA device visible to torch"
        exit 1
    fi
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    "$PYTHON" -c "import torch, triton; print(f'torch {torch.__version__}, triton {triton.__version__}')" || true
    stage "training benchmark, GPU rows" 270 "$PYTHON" benchmarks/training.py --gpu-only
    stage "CUDA tests" 130 "$PYTHON" -m pytest -q -p no:cacheprovider -k "cuda and not faiss" \
        tests/test_tangent_rotation.py tests/test_class_geometry.py tests/test_quadratic.py tests/test_neighbours.py \
        tests/test_gram_rotation.py tests/test_linalg.py tests/test_regularizer.py tests/test_graphed.py \
        tests/test_jacobi_triton.py
    stage "CR's eigen-problems, cuSOLVER against Triton" 60 "$PYTHON" benchmarks/patch_eigh.py
    stage "where the graphed CR's GPU time goes" 45 "$PYTHON" benchmarks/cr_profile.py --cuda --tangent-dim 2 --uncaptured
    stage "geometry benchmark, CUDA rows" 50 "$PYTHON" benchmarks/geometry.py --cuda-only
    echo "=== summary"
    printf '%s\n' "${summary[@]}"
    exit "$failed"
} 2>&1 | tee "$log"
