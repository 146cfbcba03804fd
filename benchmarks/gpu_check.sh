#!/usr/bin/env bash
# Every check that needs a CUDA GPU, as one command, for a machine that has one and PyTorch
# (Ray, MLflow and FAISS are not needed, so it also runs on a bare GPU box with the repository
# copied over): the CUDA-parametrized tests of curvature/ and CR, then CR's patch eigen-problems
# (cuSOLVER against the round-robin Triton kernel), the GPU rows of the training benchmark
# (ResNet-32 CR overhead) and of the geometry benchmark.
#
#   bash benchmarks/gpu_check.sh            # PYTHON=... to pick the interpreter
#
# The log also goes to $OUT/gpu_check.log when OUT is set (a folder that is collected afterwards).
# FAISS's GPU index is not checked here: it needs faiss-gpu, which is not a dependency.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log="${OUT:-/tmp}/gpu_check.log"
{
    "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device visible to torch')"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    "$PYTHON" -c "import torch, triton; print(f'torch {torch.__version__}, triton {triton.__version__}')" || true
    "$PYTHON" -m pytest -q -p no:cacheprovider -k "cuda and not faiss" tests/test_tangent_rotation.py \
        tests/test_class_geometry.py tests/test_quadratic.py tests/test_neighbours.py tests/test_gram_rotation.py \
        tests/test_linalg.py tests/test_regularizer.py tests/test_graphed.py tests/test_jacobi_triton.py
    "$PYTHON" benchmarks/patch_eigh.py
    "$PYTHON" benchmarks/training.py --gpu-only
    "$PYTHON" benchmarks/geometry.py --cuda-only
} 2>&1 | tee "$log"
