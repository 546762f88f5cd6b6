import numpy as np
import pytest
import torch

from skpatchcore._bank import search
from skpatchcore._bank.int8 import Int8Bank, int8_products_work
from skpatchcore._bank.search import MemoryBank

pytestmark = pytest.mark.skipif(
    not int8_products_work(), reason="no exact int8 products on this CPU"
)


def brute_force(queries, bank, k):
    d = np.linalg.norm(
        queries[:, None, :].astype(np.float64) - bank[None].astype(np.float64), axis=2
    )
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, axis=1), order


@pytest.fixture
def clusters():
    """Clustered points far from the origin, as patch features are."""
    rng = np.random.default_rng(0)
    centers = rng.normal(scale=4.0, size=(40, 48)) + 10.0
    bank = centers[rng.integers(40, size=3000)] + rng.normal(size=(3000, 48))
    queries = centers[rng.integers(40, size=700)] + rng.normal(size=(700, 48))
    return bank.astype(np.float32), queries.astype(np.float32)


def test_keys_are_integer_half_distances(clusters):
    bank, queries = clusters
    int8_bank = Int8Bank(torch.from_numpy(bank))
    quantised, clipped = int8_bank.quantise(torch.from_numpy(queries))
    keys = int8_bank.keys(quantised, 0, len(bank)).numpy()

    # The same quantisation, in float64 and int64 with numpy.
    center = bank.astype(np.float64).mean(axis=0)
    scale = np.abs(bank - center).max() / 127
    b = np.round((bank - center) / scale).astype(np.int64)
    q = np.clip(np.round((queries - center) / scale), -127, 127).astype(np.int64)
    half_norms = np.round(((bank - center) ** 2).sum(axis=1) / (2 * scale**2))
    expected = half_norms.astype(np.int64)[None, :] - q @ b.T
    inside = ~clipped.numpy()
    assert inside.mean() > 0.9
    keys, expected = keys[inside], expected[inside]
    assert keys.dtype == np.int32
    # Centre and scale come from float32 arithmetic: a value on a rounding
    # boundary may land one step away.
    assert np.mean(keys == expected) > 0.99
    assert np.abs(keys - expected).max() <= 2 * 127


@pytest.mark.slow
def test_keys_rank_like_distances(clusters):
    bank, queries = clusters
    int8_bank = Int8Bank(torch.from_numpy(bank))
    quantised, _ = int8_bank.quantise(torch.from_numpy(queries))
    keys = int8_bank.keys(quantised, 0, len(bank)).numpy()
    _, nearest = brute_force(queries, bank, 1)
    rank = (keys < np.take_along_axis(keys, nearest, axis=1)).sum(axis=1)
    assert rank.max() <= search._RERANK_MARGIN


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 9])
def test_int8_search_matches_brute_force(clusters, k):
    # Several neighbours are ranked in float32: on such concentrated
    # clusters int8 keys do not keep the order of the 9 nearest.
    bank, queries = clusters
    searcher = MemoryBank(bank)
    assert searcher._int8_bank() is not None
    distances, indices = searcher.kneighbors(queries, k)
    expected_d, expected_i = brute_force(queries, bank, k)
    np.testing.assert_array_equal(indices, expected_i)
    np.testing.assert_allclose(distances, expected_d, rtol=1e-6)


def test_int8_and_float_rankings_give_the_same_neighbours(clusters, monkeypatch):
    bank, queries = clusters
    groups = np.arange(len(queries)) % 50, np.arange(len(bank)) % 50
    found = {}
    for int8 in (True, False):
        monkeypatch.setattr(search, "_INT8_RANKING", int8)
        searcher = MemoryBank(bank)
        found[int8] = searcher.kneighbors(queries, 1, exclude_groups=groups)
    np.testing.assert_array_equal(found[True][1], found[False][1])
    np.testing.assert_array_equal(found[True][0], found[False][0])
    # No query is matched with a bank row of its own group.
    assert not np.any(groups[1][found[True][1]] == groups[0][:, None])


@pytest.mark.slow
def test_queries_beyond_the_bank_range_are_ranked_in_float(clusters):
    bank, queries = clusters
    queries = queries.copy()
    queries[::7, 3] = 1e4
    int8_bank = Int8Bank(torch.from_numpy(bank))
    _, clipped = int8_bank.quantise(torch.from_numpy(queries))
    assert clipped.numpy()[::7].all()
    distances, indices = MemoryBank(bank).kneighbors(queries, 2)
    expected_d, expected_i = brute_force(queries, bank, 2)
    np.testing.assert_array_equal(indices, expected_i)
    np.testing.assert_allclose(distances, expected_d, rtol=1e-6)


def test_candidates_do_not_depend_on_batching(clusters):
    bank, queries = clusters
    searcher = MemoryBank(bank)
    whole, _ = searcher._exact_candidates(queries, 9, None, int8=True)
    parts = np.concatenate(
        [
            searcher._exact_candidates(queries[i : i + 100], 9, None, int8=True)[0]
            for i in range(0, len(queries), 100)
        ]
    )
    np.testing.assert_array_equal(np.sort(whole, axis=1), np.sort(parts, axis=1))


def test_large_norms_need_more_digits():
    # Every value at the top of the int8 range: the half squared norms need
    # several digits of 127 * 127.
    rng = np.random.default_rng(1)
    bank = np.sign(rng.normal(size=(200, 64))).astype(np.float32)
    queries = np.sign(rng.normal(size=(50, 64))).astype(np.float32)
    int8_bank = Int8Bank(torch.from_numpy(bank))
    assert int8_bank.augmented.shape[1] > 64 + 2
    distances, indices = MemoryBank(bank).kneighbors(queries, 1)
    expected_d, _ = brute_force(queries, bank, 1)
    np.testing.assert_allclose(distances, expected_d, rtol=1e-6)
