"""Long-tailed protocol and shot groups (SPEC §5)."""

from __future__ import annotations

import numpy as np

from orchestrator.data.long_tail import long_tail_counts, long_tail_indices, per_class_subsample, shot_groups


def test_counts_follow_the_exponential_profile():
    counts = long_tail_counts(5000, 10, 100.0)
    expected = [int(np.floor(5000 * 100.0 ** (-c / 9))) for c in range(10)]
    assert counts.tolist() == expected
    assert counts[0] == 5000 and counts[-1] == 50
    assert long_tail_counts(500, 100, 1.0).tolist() == [500] * 100


def test_subsample_is_seeded_and_respects_counts():
    labels = np.repeat(np.arange(5), 200)
    first = long_tail_indices(labels, 5, 10.0, seed=3)
    assert np.array_equal(first, long_tail_indices(labels, 5, 10.0, seed=3))
    assert not np.array_equal(first, long_tail_indices(labels, 5, 10.0, seed=4))
    assert np.bincount(labels[first]).tolist() == long_tail_counts(200, 5, 10.0).tolist()


def test_shot_groups():
    groups = shot_groups(np.array([500, 101, 100, 20, 19, 1]), many_threshold=100, few_threshold=20)
    assert groups.tolist() == [0, 0, 1, 1, 2, 2]


def test_geometry_subsample_is_the_one_earlier_versions_drew():
    """A resumed run (or a rerun) measures the same points: the draws are those of the per-class
    loop this function replaced."""
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(7), [900, 400, 301, 300, 120, 30, 5]))
    expected, draws = [], np.random.default_rng(11)
    for c in range(7):
        members = np.flatnonzero(labels == c)
        expected.append(members if len(members) <= 300 else draws.choice(members, 300, replace=False))
    assert np.array_equal(per_class_subsample(labels, 300, seed=11), np.sort(np.concatenate(expected)))
