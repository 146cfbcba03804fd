"""Long-tailed protocol and shot groups (SPEC §5)."""

from __future__ import annotations

import numpy as np

from orchestrator.data.long_tail import long_tail_counts, long_tail_indices, shot_groups


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
