"""The compiled CPU kernels (curvature/_native.c): built here, LAPACK's eigen-decompositions, the
tensor form's patch and pair stages (values and gradients), and the tensor form when they cannot
be built."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from curvature import _native, manifolds
from curvature.gram_rotation import cloud_grams, gram_angles, gram_patches
from curvature.neighbours import knn_indices


def test_kernels_build_on_this_machine():
    """CI has a C compiler: were the kernels not built, every other CPU test would run the tensor
    form alone and this module's comparisons would compare it with itself."""
    assert _native.library() is not None, _native._failure


def symmetric_batch(size: int, dtype: torch.dtype) -> torch.Tensor:
    """Random positive semi-definite matrices of rank size - 1 (as centred patches are), a repeated
    eigenvalue, a zero matrix and an identity: the cases Jacobi rotations must settle."""
    generator = torch.Generator().manual_seed(size)
    factors = torch.randn(40, size, size - 1 if size > 1 else 1, generator=generator, dtype=torch.float64)
    matrices = factors @ factors.mT
    matrices[0] = 0.0
    matrices[1] = torch.eye(size, dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))[0]
    repeated = torch.ones(size, dtype=torch.float64)
    repeated[-1] = 3.0
    matrices[2] = basis @ torch.diag(repeated) @ basis.mT
    return matrices.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 7, 11, 16])
def test_eigh_matches_lapack(size, dtype):
    matrices = symmetric_batch(size, dtype)
    evals, evecs = _native.eigh(matrices)
    expected = torch.linalg.eigh(matrices.double()).eigenvalues
    assert evals.dtype == dtype and evecs.dtype == dtype
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    scale = float(matrices.abs().max())
    assert float((evals.double() - expected).abs().max()) < tolerance * scale
    assert bool((evals[:, 1:] >= evals[:, :-1]).all())
    eye = torch.eye(size, dtype=dtype).expand_as(evecs)
    torch.testing.assert_close(evecs.mT @ evecs, eye, rtol=0, atol=tolerance * 10)
    rebuilt = evecs @ torch.diag_embed(evals) @ evecs.mT
    torch.testing.assert_close(rebuilt, matrices, rtol=0, atol=tolerance * 10 * scale)


def cr_like_clouds(rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two clouds padded to one width: a curved one, and a random one with repeated points (whose
    patches have fewer directions than d, so some pairs are measured in one direction only)."""
    width = 60
    sphere = torch.tensor(manifolds.sphere(width, 3, 2.0, 16, rng)) + 4.0
    random = torch.tensor(rng.normal(size=(width, 16)))
    random[:8] = random[0]
    batch = torch.stack([sphere, random])
    indices = torch.cat([knn_indices(sphere, 8, "torch"), knn_indices(random[:50], 8, "torch") + width])
    members = torch.cat([torch.arange(width), torch.arange(50) + width])
    return batch, members, indices


@pytest.mark.parametrize("angle_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dim", [1, 2, 3, 5])
def test_patch_and_pair_stages_equal_the_tensor_form(dim, angle_dtype, rng, monkeypatch):
    """The compiled patch stage (spectra, coefficients and their backward through the
    eigen-decomposition) and pair stage give the same angles and the same gradient with respect to
    the points as the tensor form: to float32
    precision where the tensor form solves its pair eigen-problems in float32, and in float64 up to
    the ~sqrt(eps) (1.5e-8 rad) to which both resolve angles near 0 (the repeated points' patches)."""
    batch, members, indices = cr_like_clouds(rng)
    weights = torch.tensor(rng.normal(size=len(members)))

    def angles_and_gradient(native: bool) -> tuple[torch.Tensor, torch.Tensor]:
        monkeypatch.setattr(_native, "enabled", native)
        points = batch.clone().requires_grad_()
        valid = torch.zeros(batch.shape[:2], dtype=torch.bool).flatten().index_fill(0, members, True).reshape(2, -1)
        angle = gram_angles(gram_patches(cloud_grams(points, valid), members, indices), indices, dim, angle_dtype)
        (angle.double() * weights).sum().backward()
        return angle.detach(), points.grad

    angle, gradient = angles_and_gradient(True)
    expected_angle, expected_gradient = angles_and_gradient(False)
    assert angle.dtype == angle_dtype
    tolerance = 1e-7 if angle_dtype == torch.float64 else 2e-4
    torch.testing.assert_close(angle, expected_angle, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(gradient, expected_gradient, rtol=tolerance * 100, atol=tolerance * 10)


def test_without_a_compiler_warns_once_and_runs_the_tensor_form(rng, monkeypatch, tmp_path):
    batch, members, indices = cr_like_clouds(rng)
    valid = torch.zeros(batch.shape[:2], dtype=torch.bool).flatten().index_fill(0, members, True).reshape(2, -1)

    def angles() -> torch.Tensor:
        return gram_angles(gram_patches(cloud_grams(batch, valid), members, indices), indices, 3)

    monkeypatch.setattr(_native, "enabled", False)
    expected = angles()
    monkeypatch.setattr(_native, "enabled", True)
    monkeypatch.setattr(_native, "_library", None)
    monkeypatch.setattr(_native, "_failure", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing built there yet
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.warns(UserWarning, match="cannot be built here"):
        assert _native.library() is None
    assert "no-such-compiler" in _native._failure
    torch.testing.assert_close(angles(), expected, rtol=0, atol=0)
    assert not _native.available(torch.device("cpu"), 3)
    with pytest.raises(RuntimeError, match=r"check curvature\._native\.available\(\)"):
        _native.eigh(torch.eye(3)[None])


def test_processes_building_at_once_each_load_a_whole_library(tmp_path):
    """Ray workers start together: each builds under a temporary name and renames, so none loads a
    half-written file; ``CURVLT_NATIVE=0`` turns the kernels off."""
    script = "from curvature import _native; print(_native.library() is not None)"
    environment = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    runs = [subprocess.Popen([sys.executable, "-c", script], env=environment, stdout=subprocess.PIPE, text=True)
            for _ in range(3)]
    assert [run.communicate(timeout=120)[0].strip() for run in runs] == ["True"] * 3
    assert len(list((tmp_path / "curvlt").glob("native-*.so"))) == 1
    assert not [path for path in (tmp_path / "curvlt").iterdir() if not path.name.startswith("native-")]
    switched_off = subprocess.run([sys.executable, "-c", script], env={**environment, "CURVLT_NATIVE": "0"},
                                  capture_output=True, text=True, timeout=120)
    assert switched_off.stdout.strip() == "False"


def test_undirected_edges_are_the_tensor_forms_pairs(rng):
    """Same pairs as ``_undirected_edges`` (in another order): each directed edge maps to the pair of
    the same two points, and a pair with a point that lacks directions keeps its own orientation."""
    from curvature.gram_rotation import _undirected_edges

    points = torch.tensor(rng.normal(size=(80, 3)))
    indices = knn_indices(points, 6, "torch")
    symmetric = torch.tensor(rng.random(80) > 0.2)
    own, other, which = _native.undirected_edges(indices, symmetric)
    expected_own, expected_other, expected_which = _undirected_edges(indices, symmetric)
    assert own.numel() == expected_own.numel() < indices.numel()
    pairs = torch.stack([own[which], other[which]], dim=1)
    expected = torch.stack([expected_own[expected_which], expected_other[expected_which]], dim=1)
    both = (symmetric[pairs[:, 0]] & symmetric[pairs[:, 1]])
    assert torch.equal(pairs[~both], expected[~both])
    assert torch.equal(pairs[both].sort(dim=1).values, expected[both].sort(dim=1).values)


def test_threads_split_the_work_without_changing_the_result(rng):
    """The kernels run on PyTorch's OpenMP threads (backward passes sum per-thread copies): the
    same angles on one thread and on two, and the same gradients up to the order of summation
    (which moves them by up to 1e-6 relative here: the repeated points' patches have eigenvalue
    gaps at the clamp, whose large terms cancel)."""
    batch, members, indices = cr_like_clouds(rng)
    valid = torch.zeros(batch.shape[:2], dtype=torch.bool).flatten().index_fill(0, members, True).reshape(2, -1)

    def angles_and_gradient(threads: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.set_num_threads(threads)
        points = batch.clone().requires_grad_()
        angle = gram_angles(gram_patches(cloud_grams(points, valid), members, indices), indices, 3)
        angle.sum().backward()
        return angle.detach(), points.grad

    before = torch.get_num_threads()
    try:
        one, two = angles_and_gradient(1), angles_and_gradient(2)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0])
    torch.testing.assert_close(one[1], two[1], rtol=1e-5, atol=1e-7)


def test_builds_without_openmp_too(monkeypatch, tmp_path):
    """A compiler without OpenMP (clang without libomp) gets the serial build of the same source."""
    import ctypes

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    serial = ctypes.CDLL(str(_native._compiled(os.environ.get("CC", "cc"), (*_native._FLAGS, *_native._THREADING[-1]))))
    assert serial.curvlt_max_dim() == _native.library().curvlt_max_dim()


def test_builds_in_the_temporary_directory_when_the_cache_cannot_be_made(monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker / "cache"))  # mkdir under a file fails
    monkeypatch.setattr(_native.tempfile, "tempdir", str(tmp_path))
    built = _native._compiled(os.environ.get("CC", "cc"), (*_native._FLAGS, *_native._THREADING[-1]))
    assert built.parent == tmp_path / f"curvlt-{os.getuid()}" and built.exists()


SMALL_STACK = """
import sys, threading, numpy as np, torch
sys.path.insert(0, {tests!r})
from test_native import cr_like_clouds
from curvature.gram_rotation import cloud_grams, gram_angles, gram_patches
torch.set_num_threads(1)  # the kernels run on the calling thread alone
batch, members, indices = cr_like_clouds(np.random.default_rng(0))
valid = torch.zeros(batch.shape[:2], dtype=torch.bool).flatten().index_fill(0, members, True).reshape(2, -1)
done = []

def run():
    points = batch.clone().requires_grad_()
    angle = gram_angles(gram_patches(cloud_grams(points, valid), members, indices), indices, 5)
    angle.sum().backward()
    done.append(bool(torch.isfinite(points.grad).all()))

threading.stack_size({stack})
thread = threading.Thread(target=run)
thread.start()
thread.join()
print(done)
"""


def test_kernels_fit_a_small_thread_stack():
    """The kernels' work arrays grow with the patch and tangent sizes, not with the largest size
    they take: CR's stages at k = 8 run on a thread with a 128 KiB stack (musl's default thread
    stack; a small ``ulimit -s`` does the same). Run in a subprocess: an overflow kills it."""
    script = SMALL_STACK.format(tests=os.path.dirname(__file__), stack=128 * 1024)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})
    assert run.returncode == 0 and run.stdout.strip() == "[True]", (run.returncode, run.stderr[-500:])


def test_backward_passes_in_any_order_of_points_and_pairs(rng):
    """The backward passes split their work by cloud and by the pairs' first point, which come in
    that order from CR's lists; given in another order (a caller's own lists) they run on one
    thread, with the same gradients up to the order of summation."""
    from curvature.gram_rotation import pair_operands

    batch, members, indices = cr_like_clouds(rng)
    valid = torch.zeros(batch.shape[:2], dtype=torch.bool).flatten().index_fill(0, members, True).reshape(2, -1)
    weights = torch.tensor(rng.normal(size=len(members)))
    shuffle = torch.Generator().manual_seed(0)

    def gradient(points_order: torch.Tensor, shuffle_pairs: bool) -> torch.Tensor:
        """d/dpoints of a weighted sum of the angles, the points (rows) listed in ``points_order``."""
        row_of = points_order.argsort()  # old row -> new row
        shuffled_members, shuffled_indices = members[points_order], row_of[indices[points_order]]
        points = batch.clone().requires_grad_()
        patches = gram_patches(cloud_grams(points, valid), shuffled_members, shuffled_indices)
        pairs = pair_operands(patches, shuffled_indices, 3)
        order = torch.randperm(len(pairs.own), generator=shuffle) if shuffle_pairs else torch.arange(len(pairs.own))
        theta = _native.pair_angles(pairs.coefficients, pairs.inner, patches.patches, pairs.has_direction,
                                    pairs.own[order], pairs.other[order], torch.finfo(torch.float64).eps)
        theta = torch.empty_like(theta).index_copy(0, order, theta)  # back in pair order
        angle = theta.index_select(0, pairs.which).reshape(-1, indices.shape[1]).mean(dim=1)
        (angle * weights[points_order]).sum().backward()
        return points.grad

    in_order = gradient(torch.arange(len(members)), False)
    shuffled_points = torch.randperm(len(members), generator=shuffle)
    assert not bool((members[shuffled_points].diff() >= 0).all())  # clouds no longer one after the other
    # Up to the order of summation, as in test_threads_split_the_work_without_changing_the_result.
    torch.testing.assert_close(gradient(torch.arange(len(members)), True), in_order, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gradient(shuffled_points, False), in_order, rtol=1e-5, atol=1e-7)
