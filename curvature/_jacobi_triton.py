"""Batched eigen-decomposition of small symmetric matrices on CUDA: one Triton kernel, cyclic Jacobi.

Why: CR's pair stage decomposes one d x d matrix per neighbour pair, 136,000 per step for
ResNet-32 / CIFAR-100 (100 classes, Q = 128, k = 10). ``torch.linalg.eigh`` hands them to cuSOLVER's
batched solver and then reads its error codes on the host, which stops the host until the GPU has
caught up (a training step bound by launching kernels loses its head start) and rules the call out
of CUDA graphs. Here each GPU thread owns one matrix and runs the cyclic Jacobi method on it
(Golub & Van Loan, "Matrix Computations", 4th ed., Alg. 8.5.3; the rotation as in Numerical
Recipes §11.1: ``θ = (a_qq - a_pp) / 2a_pq``, ``t = sgn θ / (|θ| + sqrt(θ² + 1))``,
``c = 1/sqrt(t² + 1)``, ``s = t c``) on a working copy of its matrix in global memory, which stays
in the L1 cache. Sweeps repeat until every matrix of a block has an off-diagonal norm below
``4 eps`` of its Frobenius norm, at most :data:`MAX_SWEEPS`. Nothing is read back on the host. The
result is ``torch.linalg.eigh``'s: eigenvalues ascending, with their eigenvectors as columns.

Measured on an H200 (PyTorch 2.11, Triton 3.6; Jacobi against ``torch.linalg.eigh``, same random
positive semi-definite matrices, 2026-11-27): 136,000 of 2 x 2, 0.14 against 1.70 ms (float32);
of 4 x 4, 1.15 against 2.90 ms (float32) and 1.94 against 3.55 ms (float64). With one matrix per
thread the work per thread grows as n³ while the threads stay as many as the matrices, and larger
sizes lose: 136,000 of 8 x 8, 24.1 against 5.6 ms (float32); 13,600 of 11 x 11, 6.2 against 2.7 ms
(float64). So only sizes up to :data:`MAX_SIZE` come here (d <= 4 pair matrices; d = 1 and 2 have
closed forms in :mod:`curvature._linalg` anyway).

For the patch problems (13,600 of 11 x 11 per step, cuSOLVER 2.7 ms and a wait on the GPU),
:func:`round_robin_eigh` gives each matrix a warp instead of a thread: the matrix, padded to a power
of two, stays in registers, and each round turns n/2 disjoint pairs of rows and columns at once, in
the round-robin order of Brent & Luk ("The solution of singular-value and symmetric eigenvalue
problems on multiprocessor arrays", SIAM J. Sci. Stat. Comput. 6, 1985), so that a sweep is n - 1
rounds of whole-matrix operations. Compiled offline for sm_90 (Triton 3.8, no GPU): 150 registers
per thread in float64 and no spills, about 810 instructions per round; in Triton's interpreter CR's
11 x 11 patch matrices converge in 5 sweeps (75 rounds). 13,600 of them are then some 0.8 billion
warp instructions, 0.8 ms on an H200 if issuing them were the only limit, so a first estimate is
1-1.5 ms. It has not run on a GPU yet. It is used all the same for CUDA sizes 5 to 16
(:func:`curvature._linalg.symmetric_eigh`): unlike cuSOLVER it can run inside a CUDA graph, which
lets all of CR's fixed-shape path (:mod:`curvature.graphed`) be replayed without the host waiting
on the GPU. ``benchmarks/patch_eigh.py`` times it against cuSOLVER on CR's own patch matrices.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Largest matrix size sent to :func:`jacobi_eigh` (see the measurements above); larger ones go to
#: :func:`round_robin_eigh`.
MAX_SIZE = 4
#: Cap on sweeps: cyclic Jacobi converges quadratically, so this bounds only matrices that never
#: settle (non-finite entries), whose results are then not finite either.
MAX_SWEEPS = 20
#: Matrices per program: one per thread of a single warp.
LANES = 32
#: Largest matrix size :func:`round_robin_eigh` takes: at 16 x 16 a warp holds the matrix and its
#: eigenvectors in 8 float64 values per thread each (16 registers).
MAX_ROUND_ROBIN_SIZE = 16


@triton.jit
def _jacobi(work, evals, evecs, count, tol, N: tl.constexpr, MAX_SWEEPS: tl.constexpr, LANES: tl.constexpr):
    """Diagonalise each lane's matrix in ``work`` (N x N, full symmetric storage) in place,
    accumulating the rotations in ``evecs`` (starting from the identity); the diagonal goes to
    ``evals``."""
    lane = tl.program_id(0) * LANES + tl.arange(0, LANES)
    live = lane < count
    start = lane.to(tl.int64) * (N * N)
    matrix, vectors = work + start, evecs + start
    for row in tl.static_range(N):
        for col in tl.static_range(N):
            tl.store(vectors + row * N + col, tl.full([LANES], 1.0 if row == col else 0.0, evals.dtype.element_ty),
                     mask=live)
    unconverged = _unconverged(matrix, live, tol, N)
    sweep = 0
    while (sweep < MAX_SWEEPS) & (unconverged > 0):
        for p in range(N - 1):
            for q in range(p + 1, N):
                app = tl.load(matrix + p * N + p, mask=live, other=0.0)
                aqq = tl.load(matrix + q * N + q, mask=live, other=0.0)
                apq = tl.load(matrix + p * N + q, mask=live, other=0.0)
                rotate = apq != 0.0
                theta = (aqq - app) / tl.where(rotate, 2.0 * apq, 1.0)
                t = tl.where(theta >= 0.0, 1.0, -1.0) / (tl.abs(theta) + tl.sqrt(theta * theta + 1.0))
                t = tl.where(rotate, t, 0.0)
                cos = 1.0 / tl.sqrt(t * t + 1.0)
                sin = t * cos
                for r in tl.static_range(N):  # columns p and q of A (and, by symmetry, rows), and of V
                    arp = tl.load(matrix + r * N + p, mask=live, other=0.0)
                    arq = tl.load(matrix + r * N + q, mask=live, other=0.0)
                    new_rp, new_rq = cos * arp - sin * arq, sin * arp + cos * arq
                    tl.store(matrix + r * N + p, new_rp, mask=live)
                    tl.store(matrix + p * N + r, new_rp, mask=live)
                    tl.store(matrix + r * N + q, new_rq, mask=live)
                    tl.store(matrix + q * N + r, new_rq, mask=live)
                    vrp = tl.load(vectors + r * N + p, mask=live, other=0.0)
                    vrq = tl.load(vectors + r * N + q, mask=live, other=0.0)
                    tl.store(vectors + r * N + p, cos * vrp - sin * vrq, mask=live)
                    tl.store(vectors + r * N + q, sin * vrp + cos * vrq, mask=live)
                # the 2 x 2 block itself, which the loop above wrote with the off-block formula
                tl.store(matrix + p * N + p, app - t * apq, mask=live)
                tl.store(matrix + q * N + q, aqq + t * apq, mask=live)
                tl.store(matrix + p * N + q, tl.zeros_like(apq), mask=live)
                tl.store(matrix + q * N + p, tl.zeros_like(apq), mask=live)
        unconverged = _unconverged(matrix, live, tol, N)
        sweep += 1
    for r in tl.static_range(N):
        tl.store(evals + lane.to(tl.int64) * N + r, tl.load(matrix + r * N + r, mask=live, other=0.0), mask=live)


@triton.jit
def _unconverged(matrix, live, tol, N: tl.constexpr):
    """How many lanes have an off-diagonal norm above ``tol`` times their Frobenius norm."""
    off = tl.zeros_like(tl.load(matrix, mask=live, other=0.0))
    diagonal = tl.zeros_like(off)
    for r in tl.static_range(N):
        value = tl.load(matrix + r * N + r, mask=live, other=0.0)
        diagonal += value * value
        for col in tl.static_range(r + 1, N):
            value = tl.load(matrix + r * N + col, mask=live, other=0.0)
            off += value * value
    return tl.sum(tl.where(off > tol * tol * (diagonal + 2.0 * off), 1, 0), axis=0)


def jacobi_eigh(matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors (columns) of a batch (B, n, n) of symmetric CUDA
    matrices, n <= :data:`MAX_SIZE`, in their own dtype (float32 or float64)."""
    count, n = matrices.shape[0], matrices.shape[-1]
    if not 1 <= n <= MAX_SIZE:
        raise ValueError(f"matrices: the Jacobi kernel takes sizes 1 to {MAX_SIZE}, got {n} x {n}")
    work = matrices.clone(memory_format=torch.contiguous_format)  # the kernel's working copy, one copy
    evals = matrices.new_empty(count, n)
    evecs = matrices.new_empty(count, n, n)
    if count > 0:
        tol = 4 * torch.finfo(matrices.dtype).eps
        _jacobi[(triton.cdiv(count, LANES),)](work, evals, evecs, count, tol, N=n, MAX_SWEEPS=MAX_SWEEPS,
                                              LANES=LANES, num_warps=1)
    return _ascending(evals, evecs)


@triton.jit
def _round_partner(rows, round_index, BLOCK: tl.constexpr):
    """Each index's partner in round ``round_index`` of a round-robin tournament of BLOCK players
    (BLOCK even): player 0 stays at seat 0, the others move one seat per round, and seat s plays
    seat BLOCK - 1 - s, so that over BLOCK - 1 rounds every pair meets once."""
    last = BLOCK - 1
    seat = tl.where(rows == 0, 0, (rows - 1 - round_index + 2 * last) % last + 1)
    facing = last - seat
    return tl.where(facing == 0, 0, (facing - 1 + round_index) % last + 1)


@triton.jit
def _round_robin_jacobi(matrices, evals, evecs, n, tol, BLOCK: tl.constexpr, MAX_SWEEPS: tl.constexpr):
    """Diagonalise matrix ``program_id`` (n x n, contiguous) in registers, padded with zeros to
    BLOCK x BLOCK (padding is never rotated: its off-diagonal entries stay 0). Each round applies
    ``A <- Jᵀ A J``, ``V <- V J`` for the rotation J of BLOCK / 2 disjoint pairs (p < q):
    ``J_pp = J_qq = c``, ``J_pq = s``, ``J_qp = -s``, with c and s as in :func:`_jacobi`; since J
    has two entries per row and column, each product is a scaling plus a gather of the partner's
    column (or row)."""
    matrix = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK)
    row, col = rows[:, None], rows[None, :]
    inside = (row < n) & (col < n)
    start = matrix * n * n
    a = tl.load(matrices + start + row * n + col, mask=inside, other=0.0)
    v = tl.where(row == col, 1.0, 0.0).to(a.dtype)
    on_diagonal = row == col
    off = tl.sum(tl.sum(tl.where(on_diagonal, 0.0, a * a), axis=1), axis=0)
    total = tl.sum(tl.sum(a * a, axis=1), axis=0)
    sweep = 0
    while (sweep < MAX_SWEEPS) & (off > 2.0 * tol * tol * total):
        for round_index in range(BLOCK - 1):
            partner = _round_partner(rows, round_index, BLOCK)
            partner_col = col == partner[:, None]
            diagonal = tl.sum(tl.where(on_diagonal, a, 0.0), axis=1)
            partner_diagonal = tl.sum(tl.where(partner_col, diagonal[None, :], 0.0), axis=1)
            # A_pq and A_qp averaged (the same sum in either order), so that rows p and q of a pair
            # compute the same angle even where rounding left A slightly asymmetric
            apq = 0.5 * (tl.sum(tl.where(partner_col, a, 0.0), axis=1)
                         + tl.sum(tl.where(row == partner[None, :], a, 0.0), axis=0))
            first = rows < partner
            app = tl.where(first, diagonal, partner_diagonal)
            aqq = tl.where(first, partner_diagonal, diagonal)
            rotate = apq != 0.0
            theta = (aqq - app) / tl.where(rotate, 2.0 * apq, 1.0)
            t = tl.where(theta >= 0.0, 1.0, -1.0) / (tl.abs(theta) + tl.sqrt(theta * theta + 1.0))
            t = tl.where(rotate, t, 0.0)
            cos = 1.0 / tl.sqrt(t * t + 1.0)
            sin = tl.where(first, t * cos, -t * cos)  # -J[partner r, r]
            gather_cols = tl.broadcast_to(partner[None, :], (BLOCK, BLOCK))
            a = a * cos[None, :] - tl.gather(a, gather_cols, 1) * sin[None, :]  # A J
            v = v * cos[None, :] - tl.gather(v, gather_cols, 1) * sin[None, :]  # V J
            a = a * cos[:, None] - tl.gather(a, tl.broadcast_to(partner[:, None], (BLOCK, BLOCK)), 0) * sin[:, None]
        off = tl.sum(tl.sum(tl.where(on_diagonal, 0.0, a * a), axis=1), axis=0)
        sweep += 1
    tl.store(evals + matrix * n + rows, tl.sum(tl.where(on_diagonal, a, 0.0), axis=1), mask=rows < n)
    tl.store(evecs + start + row * n + col, v, mask=inside)


def round_robin_eigh(matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`jacobi_eigh`'s result for a batch (B, n, n) of symmetric CUDA matrices with n up to
    :data:`MAX_ROUND_ROBIN_SIZE`, one warp per matrix (see the module's docstring)."""
    count, n = matrices.shape[0], matrices.shape[-1]
    if not 1 <= n <= MAX_ROUND_ROBIN_SIZE:
        raise ValueError(f"matrices: the round-robin kernel takes sizes 1 to {MAX_ROUND_ROBIN_SIZE}, got {n} x {n}")
    flat = matrices.contiguous()
    evals = flat.new_empty(count, n)
    evecs = flat.new_empty(count, n, n)
    if count > 0:
        _round_robin_jacobi[(count,)](flat, evals, evecs, n, 4 * torch.finfo(flat.dtype).eps,
                                      BLOCK=max(2, triton.next_power_of_2(n)), MAX_SWEEPS=MAX_SWEEPS, num_warps=1)
    return _ascending(evals, evecs)


def _ascending(evals: torch.Tensor, evecs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues sorted ascending, with their eigenvector columns."""
    count, n = evals.shape
    evals, order = evals.sort(dim=-1)
    return evals, evecs.gather(-1, order[:, None, :].expand(count, n, n))
