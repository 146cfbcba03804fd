"""Tangent-rotation angle curvature from inner products alone (SPEC §3.3, kernel form).

Why: the curvature regularizer measures one small cloud per class (tens to hundreds of points in
64-512 dimensions) at every training step. Every quantity of the estimator depends on the points
only through inner products, so given each cloud's Gram matrix ``K = X Xᵀ`` all per-neighbour
work happens in (k+1)-dimensional patch coordinates and the ambient dimension p drops out. It is
the estimator of :func:`curvature.rotation.pointwise_curvature` (tested equal) in other
coordinates. With ``H`` the centring matrix of a patch ``P_i = {i} ∪ N(i)`` (m = k + 1 points):

    Y_i Y_iᵀ = H K[P_i, P_i] H = U_i Λ_i U_iᵀ,          T_i = A_iᵀ X[P_i],  A_i = H U_i[:, :d] Λ_i^{-1/2}
    S_i = K[:, P_i] A_i   (the inner products of every point of the cloud with T_i's directions)
    T_j T_iᵀ = A_jᵀ S_i[P_j] = M_ij,                     R Rᵀ = diag(h_j) - M_ij M_ijᵀ

where ``R = T_j - (T_j T_iᵀ) T_i`` is the part of ``T_j`` outside ``T_i`` and ``h_j`` marks the
non-zero rows of ``T_j``; the eigenvalues of ``R Rᵀ`` are the sin² of the principal angles.
``S_i`` is computed once per point, so each neighbour pair costs one (d x m)(m x d) product.
The Gram matrices are in float64: centring inside a Gram matrix subtracts nearly equal numbers,
and the tensors here (at most points x m x W) are small enough for double precision to cost little. One difference
from the points form remains: ``diag(h) - M Mᵀ`` is formed from cosines, so an angle near 0 is
resolved only to about sqrt(eps) of the precision of the final eigenvalues (3e-4 rad in float32,
1.5e-8 in float64), where the points form resolves it fully; for the class curvatures CR works with
(mean angles of tenths of a radian and more) this is far below their own sampling noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from curvature import _native
from curvature._linalg import safe_sqrt, squared_angle_from_sin2, symmetric_eigh, symmetric_eigvals
from curvature.local_pca import tangent_scales


def cloud_grams(clouds: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, W, W) float64 Gram matrices of the clouds (B, W, p), each first moved to the mean of its
    valid points (``valid`` (B, W); a translation, which every patch's centring removes anyway) so
    that the entries are of the size of the cloud's spread, not of its distance from the origin.
    Shapes depend only on the inputs' (no host synchronisation), as CUDA graphs need."""
    points = clouds.double()
    weights = valid.to(points.dtype)[..., None]
    means = (points.detach() * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)
    return _OuterGram.apply(points - means[:, None, :])


class _OuterGram(torch.autograd.Function):
    """``X Xᵀ`` of a batch of clouds. Its gradient ``(G + Gᵀ) X`` is one batched product, where
    autograd's for ``X @ X.mT`` takes one per operand: one of the largest products in CR's backward
    saved (0.15-0.5 ms of CR's 13-27 ms in a Fashion-MNIST step on the 2-core CPU, in-process A/B)."""

    @staticmethod
    def forward(ctx, clouds: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(clouds)
        return clouds @ clouds.mT

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (clouds,) = ctx.saved_tensors
        return (grad + grad.mT) @ clouds


def neighbours_from_grams(grams: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """(B, W, k) slots of each slot's k nearest valid slots in its own cloud (itself excluded),
    from squared distances ``K_aa + K_bb - 2 K_ab``: the Gram matrices are needed anyway, and in
    float64 they rank neighbours at least as exactly as ``cdist`` on the points."""
    with torch.no_grad():
        norms = grams.diagonal(dim1=1, dim2=2)
        distances = norms[:, :, None] + norms[:, None, :] - 2 * grams
        distances.masked_fill_(~valid[:, None, :], float("inf"))
        distances.diagonal(dim1=1, dim2=2).fill_(float("inf"))
        return distances.topk(k, dim=2, largest=False).indices


@dataclass
class GramPatches:
    """Every measured point's patch ``P_i = {i} ∪ N(i)`` in Gram form, eigen-decomposed."""

    grams: torch.Tensor  # (B, W, W) float64 Gram matrices of the padded clouds (:func:`cloud_grams`)
    blocks: torch.Tensor  # (n,) each point's cloud
    patches: torch.Tensor  # (n, m) slots of P_i in the point's cloud
    evals: torch.Tensor  # (n, m) eigenvalues of the centred patch Gram matrix, descending
    evecs: torch.Tensor  # (n, m, m) its eigenvectors, columns in the same order
    # Compiled form (:mod:`curvature._native`, CPU): ``evals`` and ``evecs`` carry no gradient, and
    # the pair stage's kernels carry it from ``grams`` themselves.
    compiled: bool = False


def gram_patches(grams: torch.Tensor, members: torch.Tensor, indices: torch.Tensor) -> GramPatches:
    """The patch stage: ``grams`` (B, W, W) from :func:`cloud_grams` of B clouds padded to W slots;
    ``members`` (n,): the flat slot (``cloud * W + slot``) of each measured point; ``indices``
    (n, k): each point's neighbours as rows of ``members``, all in the point's own cloud. On the
    CPU the compiled kernels (:mod:`curvature._native`) do this stage where they can be built."""
    if _native.available(grams.device, indices.shape[1] + 1):
        blocks, patches = patch_slots(grams.shape[1], members, indices)
        return GramPatches(grams, blocks, patches, *_native.patch_spectra(grams, blocks, patches), compiled=True)
    blocks, patches, centred = patch_grams(grams, members, indices)
    return GramPatches(grams, blocks, patches, *descending(*symmetric_eigh(centred)))


def patch_grams(grams: torch.Tensor, members: torch.Tensor,
                indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`gram_patches` up to its eigen-decomposition: each point's cloud (n,), its patch's
    slots (n, m) and the patch's centred Gram matrix ``H K[P_i, P_i] H`` (n, m, m)."""
    width = grams.shape[1]
    blocks, patches = patch_slots(width, members, indices)
    entries = (blocks[:, None, None] * width + patches[:, :, None]) * width + patches[:, None, :]  # K[P_i, P_i]
    return blocks, patches, _centre(grams.reshape(-1).index_select(0, entries.flatten()).view(entries.shape))


def patch_slots(width: int, members: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each measured point's cloud (n,) and the slots of its patch ``{i} ∪ N(i)`` in that cloud (n, m),
    for clouds padded to ``width`` slots (``members``, ``indices`` as for :func:`gram_patches`)."""
    slot = members % width
    return members // width, torch.cat([slot[:, None], slot[indices]], dim=1)


def descending(evals: torch.Tensor, evecs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and eigenvector columns from ascending (``symmetric_eigh``'s order) to descending."""
    return evals.flip(-1), evecs.flip(-1)


def gram_angles(patches: GramPatches, indices: torch.Tensor, dim: int,
                angle_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The pair stage: per-point angle curvature ``a_i`` (radians, ``angle_dtype``) with tangent
    dimension ``dim``; differentiable with respect to the Gram matrices behind ``patches``. On the
    CPU it runs as one compiled loop (:mod:`curvature._native`) where that can be built."""
    pairs = pair_operands(patches, indices, dim)
    k = indices.shape[1]
    if _native.available(indices.device, dim):
        theta = _native.pair_angles(pairs.coefficients, pairs.inner, patches.patches, pairs.has_direction,
                                    pairs.own, pairs.other, torch.finfo(angle_dtype).eps)
        return angles_from_theta(theta.to(angle_dtype), pairs.which, k)
    return angles_from_sin2(symmetric_eigvals(residual_grams(pairs, patches).to(angle_dtype)), pairs.which, k)


@dataclass
class PairOperands:
    """What the pair stage needs of the patches, and which pairs it measures."""

    coefficients: torch.Tensor  # (n, m, d) A_i = H U_i[:, :d] Λ_i^{-1/2}
    inner: torch.Tensor  # (n, W, d) S_i = K[:, P_i] A_i: each point's cloud against its tangent directions
    has_direction: torch.Tensor  # (n, d) which of each point's d tangent directions have variance
    own: torch.Tensor  # (E,) i of each measured pair
    other: torch.Tensor  # (E,) j of each measured pair
    which: torch.Tensor | None  # (n * k,) measured pair of each directed edge; None: every edge, in order


def pair_operands(patches: GramPatches, indices: torch.Tensor, dim: int, distinct: bool = True) -> PairOperands:
    """The pair stage's operands. ``distinct``: each pair whose two tangent spaces both have d
    directions once (``which`` maps back); otherwise every directed edge in order (``which`` is
    ``None``), twice the pairs but shapes fixed by the inputs', as CUDA graphs need."""
    n, k = indices.shape
    if patches.compiled:
        coefficients, inner, has_direction = _native.patch_coefficients(patches.grams, patches.blocks, patches.patches,
                                                                        patches.evals, patches.evecs, dim)
    else:
        scales, has_direction = tangent_scales(patches.evals, dim)  # Λ^{-1/2} where defined, else 0
        coefficients = _centre_columns(patches.evecs[..., :dim] * scales[:, None, :])  # A_i (n, m, d)
        inner = inner_products(patches, coefficients)
    if distinct:
        edges = _native.undirected_edges if _native.available(indices.device, 1) else _undirected_edges
        own, other, which = edges(indices, has_direction.all(dim=1))
    else:
        own, other, which = torch.arange(n * k, device=indices.device) // k, indices.flatten(), None
    return PairOperands(coefficients, inner, has_direction, own, other, which)


def inner_products(patches: GramPatches, coefficients: torch.Tensor) -> torch.Tensor:
    """``S_i = K[:, P_i] A_i`` (n, W, d) of every point, from the coefficients ``A_i`` (n, m, d):
    on CUDA by :func:`inner_products_by_cloud`, on the CPU by :func:`inner_products_by_point`."""
    if patches.grams.is_cuda:
        return inner_products_by_cloud(patches, coefficients)
    return inner_products_by_point(patches, coefficients)


def inner_products_by_cloud(patches: GramPatches, coefficients: torch.Tensor) -> torch.Tensor:
    """:func:`inner_products` as one product per cloud: its Gram matrix times the coefficients of
    all its points, each point's placed at its patch's slots, ``(W·d, W) @ (W, W)``. That is W/m
    times the arithmetic of a (d x m)(m x W) product per point, but in the shape matrix-multiply
    kernels are fast at, and it never forms the patch rows ``K[P_i, :]`` (n, m, W): at ResNet-32 /
    CIFAR-100 shapes 163 MB of float64, gathered in the forward pass and scattered back in the
    backward. Those per-point products (cuBLAS runs each in its own tile) and gathers were the
    largest part of CR's GPU work on an H200 (with the other tiny products, 4.4 and 1.0 of 9.6 ms;
    ``benchmarks/HISTORY.md``, "Training step, GPU")."""
    grams, blocks, slots = patches.grams, patches.blocks, patches.patches
    num_clouds, width = grams.shape[0], grams.shape[1]
    n, m, dim = coefficients.shape
    members = blocks * width + slots[:, 0]  # a patch's first slot is its point's own
    directions = torch.arange(dim, device=slots.device)
    target = (members[:, None, None] * dim + directions[None, :, None]) * width + slots[:, None, :]  # (n, d, m)
    # (B, W·d, W): row (i, e) holds A_i[:, e] at P_i; added, so that a slot twice in a patch (only in
    # classes of k points or fewer, where the neighbours run out) counts twice, as in the rows' product
    placed = coefficients.new_zeros(num_clouds * width * dim * width).scatter_add(
        0, target.flatten(), coefficients.mT.flatten())
    product = placed.view(num_clouds, width * dim, width) @ grams  # row (i, e): Σ_p A_i[p, e] K[P_i[p], :]
    return product.view(num_clouds * width, dim, width).index_select(0, members).mT


def inner_products_by_point(patches: GramPatches, coefficients: torch.Tensor) -> torch.Tensor:
    """:func:`inner_products` as one (d x m)(m x W) product per point on its patch rows ``K[P_i, :]``
    (n, m, W): the least arithmetic, which is what costs on the CPU."""
    grams, slots = patches.grams, patches.patches
    num_clouds, width = grams.shape[0], grams.shape[1]
    n, m, _ = coefficients.shape
    rows = grams.reshape(num_clouds * width, width).index_select(0, (patches.blocks[:, None] * width + slots).flatten())
    return (coefficients.mT @ rows.view(n, m, width)).mT


def pair_residual_grams(patches: GramPatches, indices: torch.Tensor, dim: int,
                        distinct: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`gram_angles` up to its eigenvalues, in tensor form: ``R Rᵀ`` (E, d, d) of each
    neighbour pair, and which pair each directed edge (flattened ``indices``) is; ``distinct`` as
    for :func:`pair_operands`."""
    pairs = pair_operands(patches, indices, dim, distinct)
    return residual_grams(pairs, patches), pairs.which


def residual_grams(pairs: PairOperands, patches: GramPatches) -> torch.Tensor:
    """``R Rᵀ = diag(h_j) - M_ij M_ijᵀ`` (E, d, d), ``M_ij = A_jᵀ S_i[P_j]``."""
    n, width, dim = pairs.inner.shape
    m = pairs.coefficients.shape[1]
    picked = pairs.inner.reshape(n * width, dim).index_select(
        0, (pairs.own[:, None] * width + patches.patches[pairs.other]).flatten()).reshape(-1, m, dim)
    overlap = pairs.coefficients.index_select(0, pairs.other).mT @ picked  # (E, d, d): M_ij = T_j T_iᵀ
    return torch.diag_embed(pairs.has_direction.index_select(0, pairs.other).to(overlap.dtype)) - overlap @ overlap.mT


def angles_from_sin2(sin2: torch.Tensor, which: torch.Tensor | None, k: int) -> torch.Tensor:
    """Per-point angle curvature (n,) from the pairs' sin² of principal angles (E, d): the mean over
    each point's k neighbours of ``θ = sqrt(Σ θ_l²)`` (SPEC §3.3); ``which`` as from
    :func:`pair_operands`."""
    return angles_from_theta(safe_sqrt(squared_angle_from_sin2(sin2).sum(dim=-1)), which, k)


def angles_from_theta(theta: torch.Tensor, which: torch.Tensor | None, k: int) -> torch.Tensor:
    """Per-point angle curvature (n,): the mean of the pairs' ``θ`` (E,) over each point's k neighbours."""
    return (theta if which is None else theta.index_select(0, which)).reshape(-1, k).mean(dim=1)


def _centre(gram: torch.Tensor) -> torch.Tensor:
    """``H G H``: the Gram matrix of the same points after subtracting their mean."""
    return gram - gram.mean(dim=1, keepdim=True) - gram.mean(dim=2, keepdim=True) + gram.mean(dim=(1, 2), keepdim=True)


def _centre_columns(coefficients: torch.Tensor) -> torch.Tensor:
    """``H U Λ^{-1/2}``: each column minus its mean over the patch, which moves the patch's centring
    into the coefficients (``T_i = A_iᵀ X[P_i]``, no centred points needed)."""
    return coefficients - coefficients.mean(dim=1, keepdim=True)


def _undirected_edges(indices: torch.Tensor,
                      symmetric: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each neighbour pair once: the principal angles between ``T_i`` and ``T_j`` do not depend on
    the order when both have all d directions (``symmetric``), and most k-NN edges come in both
    directions. Returns the (own, other) rows of the distinct edges and, per directed edge
    (flattened ``indices``), which distinct edge it is."""
    n, k = indices.shape
    own = torch.arange(n, device=indices.device).repeat_interleave(k)
    other = indices.flatten()
    both = symmetric[own] & symmetric[other]
    low, high = torch.minimum(own, other), torch.maximum(own, other)
    keys = torch.where(both, low * n + high, n * n + own * n + other)  # asymmetric edges stay apart
    distinct, which = torch.unique(keys, return_inverse=True)
    edge_order = torch.arange(own.numel(), device=own.device)
    first = torch.full_like(distinct, own.numel()).scatter_reduce(0, which, edge_order, "amin")
    return own[first], other[first], which
