import numpy as np
import pytest
import torch
from conftest import brute_force_k_center

from skpatchcore._bank import coreset
from skpatchcore._bank.coreset import greedy_coreset, random_projection, split_budget


def test_matches_brute_force_without_projection():
    points = np.random.default_rng(0).normal(size=(200, 5)).astype(np.float32)
    chosen = greedy_coreset(
        points, 20, projection_dim=None, random_state=np.random.RandomState(3)
    )
    start = np.random.RandomState(3).randint(200)
    assert chosen[0] == start
    np.testing.assert_array_equal(chosen, brute_force_k_center(points, 20, start))


def test_matches_brute_force_on_the_projected_points():
    points = np.random.default_rng(1).normal(size=(150, 40)).astype(np.float32)
    chosen = greedy_coreset(
        points, 15, projection_dim=8, random_state=np.random.RandomState(7)
    )
    replay = np.random.RandomState(7)
    projected = points @ random_projection(40, 8, replay)
    start = replay.randint(150)
    np.testing.assert_array_equal(chosen, brute_force_k_center(projected, 15, start))


def test_hand_checked_toy_set():
    # Three clusters on a line: around 0, around 10, and a lone point at 100.
    points = np.array([[0.0], [0.1], [0.2], [10.0], [10.1], [100.0]], dtype=np.float32)
    random_state = np.random.RandomState(0)
    start = np.random.RandomState(0).randint(6)
    chosen = greedy_coreset(points, 3, projection_dim=None, random_state=random_state)
    # Whatever the start, the 3-center cover must take one point of each
    # cluster: the farthest point is always in another cluster.
    clusters = {0: 0, 1: 0, 2: 0, 3: 1, 4: 1, 5: 2}
    assert chosen[0] == start
    assert sorted(clusters[i] for i in chosen) == [0, 1, 2]


def test_covering_radius_beats_random_subset():
    rng = np.random.default_rng(2)
    # A multimodal cloud: one dense blob and a few far, small ones.
    blobs = [rng.normal(size=(900, 3))] + [
        rng.normal(loc=20 * k, scale=0.1, size=(5, 3)) for k in range(1, 5)
    ]
    points = np.concatenate(blobs).astype(np.float32)

    def radius(indices):
        d = np.linalg.norm(points[:, None] - points[indices][None], axis=2)
        return d.min(axis=1).max()

    chosen = greedy_coreset(
        points, 30, projection_dim=None, random_state=np.random.RandomState(0)
    )
    random_subset = rng.choice(len(points), 30, replace=False)
    assert radius(chosen) < radius(random_subset)


def test_distinct_indices_even_with_duplicates():
    points = np.zeros((10, 4), dtype=np.float32)
    points[0] = 1.0
    chosen = greedy_coreset(
        points, 10, projection_dim=None, random_state=np.random.RandomState(0)
    )
    assert sorted(chosen.tolist()) == list(range(10))


def test_seeded_and_sized():
    points = np.random.default_rng(3).normal(size=(300, 64)).astype(np.float32)
    a = greedy_coreset(
        points, 25, projection_dim=16, random_state=np.random.RandomState(5)
    )
    b = greedy_coreset(
        points, 25, projection_dim=16, random_state=np.random.RandomState(5)
    )
    c = greedy_coreset(
        points, 25, projection_dim=16, random_state=np.random.RandomState(6)
    )
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (25,)


@pytest.mark.parametrize("n_samples", [0, 301])
def test_rejects_bad_sizes(n_samples):
    points = np.zeros((300, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="n_samples"):
        greedy_coreset(
            points,
            n_samples,
            projection_dim=None,
            random_state=np.random.RandomState(0),
        )


def test_thread_setting_is_restored():
    import torch

    before = torch.get_num_threads()
    points = np.random.default_rng(4).normal(size=(50, 3)).astype(np.float32)
    greedy_coreset(
        points, 5, projection_dim=None, random_state=np.random.RandomState(0)
    )
    assert torch.get_num_threads() == before


def test_thread_setting_is_restored_when_selections_overlap():
    import threading

    import torch

    from skpatchcore._bank.coreset import greedy_k_center

    before = torch.get_num_threads()
    points = np.random.default_rng(5).normal(size=(3000, 16)).astype(np.float32)
    barrier = threading.Barrier(4)

    def select(seed):
        barrier.wait()
        return greedy_k_center(points, 300, seed)

    threads = [threading.Thread(target=select, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(
    "n_samples, sizes, expected",
    [
        (10, [50, 50], [5, 5]),
        (10, [61, 31, 11], [6, 3, 1]),
        # 7 * (5, 3, 2) / 10 = (3.5, 2.1, 1.4): the one left over goes to the
        # largest remainder.
        (7, [5, 3, 2], [4, 2, 1]),
        # 4 * (20, 1, 1) / 22 = (3.6, 0.2, 0.2): the empty chunks get one
        # each, taken from the largest share.
        (4, [20, 1, 1], [2, 1, 1]),
        # Equal remainders: the earlier chunk first.
        (3, [2, 2], [2, 1]),
        (6, [3, 3], [3, 3]),
        # Fewer points than chunks: one each all the same.
        (1, [4, 4, 4], [1, 1, 1]),
    ],
)
def test_split_budget(n_samples, sizes, expected):
    np.testing.assert_array_equal(split_budget(n_samples, sizes), expected)


def test_split_budget_adds_up_and_is_proportional():
    rng = np.random.default_rng(6)
    for _ in range(50):
        sizes = rng.integers(1, 500, size=rng.integers(1, 20))
        n_samples = int(rng.integers(len(sizes), sizes.sum() + 1))
        shares = split_budget(n_samples, sizes)
        assert shares.sum() == n_samples
        assert np.all((shares >= 1) & (shares <= sizes))
        if np.all(n_samples * sizes / sizes.sum() >= 1):
            assert np.all(np.abs(shares - n_samples * sizes / sizes.sum()) < 1)


@pytest.mark.parametrize("n_points, n_samples", [(2000, 200), (300, 300)])
def test_device_loop_chooses_as_the_host_loop(n_points, n_samples):
    # The loop meant for GPUs (no read-back per step) runs on CPU tensors
    # here: it must choose the same rows, duplicates and all.
    rng = np.random.default_rng(0)
    points = torch.from_numpy(rng.normal(size=(n_points, 16)).astype(np.float32))
    points[10] = points[20]
    expected = coreset._greedy_steps(points, n_samples, 3)
    found = coreset._greedy_steps_on_device(points, n_samples, 3)
    np.testing.assert_array_equal(found, expected)
    assert len(np.unique(found)) == n_samples
