import numpy as np
import pytest

from skpatchcore import _memory_bank
from skpatchcore._memory_bank import MemoryBank


def brute_force(queries, bank, k):
    d = np.linalg.norm(
        queries[:, None, :].astype(np.float64) - bank[None].astype(np.float64), axis=2
    )
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, axis=1), order


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(500, 32)).astype(np.float32)
    queries = rng.normal(size=(300, 32)).astype(np.float32)
    return bank, queries


def test_exact_matches_brute_force(data):
    bank, queries = data
    distances, indices = MemoryBank(bank).kneighbors(queries, 5)
    expected_d, expected_i = brute_force(queries, bank, 5)
    np.testing.assert_array_equal(indices, expected_i)
    np.testing.assert_allclose(distances, expected_d, rtol=1e-6)


def test_precise_where_the_expanded_formula_cancels():
    # Far from the origin, |a|^2 + |b|^2 - 2ab loses every digit of a
    # distance of 1e-3 in float32; the re-ranking must still get it.
    bank = np.full((3, 8), 1000.0, dtype=np.float32)
    bank[1, 0] += 0.5
    bank[2, 0] += 1.0
    query = bank[1:2].copy()
    query[0, 1] += 1e-3
    distances, indices = MemoryBank(bank).kneighbors(query, 1)
    true_distance = np.linalg.norm(
        query[0].astype(np.float64) - bank[1].astype(np.float64)
    )
    assert indices[0, 0] == 1
    np.testing.assert_allclose(distances[0, 0], true_distance, rtol=1e-6)


@pytest.mark.parametrize("query_tile, bank_tile", [(7, 64), (300, 5), (1, 1000)])
def test_independent_of_tiles(data, monkeypatch, query_tile, bank_tile):
    bank, queries = data
    # Exact duplicates: ties must resolve to the lower bank row whichever
    # tile each copy falls in.
    bank = np.concatenate([bank, bank[::-1]])
    groups = (np.arange(len(queries)) % 3, np.arange(len(bank)) % 3)
    whole = MemoryBank(bank).kneighbors(queries, 3)
    whole_excluded = MemoryBank(bank).kneighbors(queries, 3, groups)
    monkeypatch.setattr(_memory_bank, "_QUERY_TILE", query_tile)
    monkeypatch.setattr(_memory_bank, "_BANK_TILE", bank_tile)
    tiled = MemoryBank(bank).kneighbors(queries, 3)
    tiled_excluded = MemoryBank(bank).kneighbors(queries, 3, groups)
    split = [
        MemoryBank(bank).kneighbors(queries[i : i + 50], 3)
        for i in range(0, len(queries), 50)
    ]
    for result in (tiled, tuple(np.concatenate(p) for p in zip(*split))):
        np.testing.assert_array_equal(result[1], whole[1])
        np.testing.assert_array_equal(result[0], whole[0])
    np.testing.assert_array_equal(tiled_excluded[1], whole_excluded[1])
    expected_d, expected_i = brute_force(queries, bank, 3)
    np.testing.assert_array_equal(whole[1], expected_i)


def test_excluded_groups_are_never_matched(data):
    bank, queries = data
    bank_groups = np.arange(len(bank)) % 4
    query_groups = np.arange(len(queries)) % 4
    distances, indices = MemoryBank(bank).kneighbors(
        queries, 2, exclude_groups=(query_groups, bank_groups)
    )
    for q in range(len(queries)):
        allowed = np.flatnonzero(bank_groups != query_groups[q])
        d, i = brute_force(queries[q : q + 1], bank[allowed], 2)
        np.testing.assert_array_equal(indices[q], allowed[i[0]])
        np.testing.assert_allclose(distances[q], d[0], rtol=1e-6)


def test_pynndescent_finds_the_true_neighbours_on_easy_data(data):
    bank, queries = data
    distances, indices = MemoryBank(
        bank, algorithm="pynndescent", random_state=0
    ).kneighbors(queries, 1)
    expected_d, expected_i = brute_force(queries, bank, 1)
    assert (indices == expected_i).mean() > 0.95
    # Returned distances are exact distances to the returned rows.
    np.testing.assert_allclose(
        distances[:, 0],
        np.linalg.norm(queries - bank[indices[:, 0]], axis=1),
        rtol=1e-5,
    )


def test_pickle_drops_the_device_cache(data):
    import pickle

    bank, queries = data
    memory = MemoryBank(bank)
    before = memory.kneighbors(queries, 1)
    restored = pickle.loads(pickle.dumps(memory))
    assert restored._cached is None
    np.testing.assert_array_equal(restored.kneighbors(queries, 1)[1], before[1])
