import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from skpatchcore._bank import search
from skpatchcore._bank.int8 import int8_products_work
from skpatchcore._bank.search import MemoryBank
from skpatchcore._bank.selection import smallest_per_row


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


@pytest.mark.parametrize(
    "shape, k, high",
    [((50, 4096), 9, 40), ((64, 400), 17, 1 << 20), ((8, 64), 3, 5), ((5, 30), 2, 9)],
)
@pytest.mark.parametrize("dtype", [torch.int32, torch.float32])
def test_smallest_per_row_is_topk(shape, k, high, dtype):
    # Few distinct values force ties across and within the column spans.
    generator = torch.Generator().manual_seed(k)
    keys = torch.randint(-high, high, shape, generator=generator).to(dtype)
    values, columns = smallest_per_row(keys, k)
    expected, _ = torch.topk(keys, k, dim=1, largest=False)
    torch.testing.assert_close(values, expected, rtol=0, atol=0)
    torch.testing.assert_close(keys.gather(1, columns), values, rtol=0, atol=0)
    assert all(len(set(row.tolist())) == k for row in columns)


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


@pytest.mark.slow
@pytest.mark.parametrize("query_tile, bank_tile", [(7, 64), (300, 5), (1, 1000)])
def test_independent_of_tiles(data, monkeypatch, query_tile, bank_tile):
    bank, queries = data
    # Exact duplicates: ties must resolve to the lower bank row whichever
    # tile each copy falls in.
    bank = np.concatenate([bank, bank[::-1]])
    groups = (np.arange(len(queries)) % 3, np.arange(len(bank)) % 3)
    whole = MemoryBank(bank).kneighbors(queries, 3)
    whole_excluded = MemoryBank(bank).kneighbors(queries, 3, groups)
    monkeypatch.setattr(search, "_QUERY_TILE", query_tile)
    monkeypatch.setattr(search, "_BANK_TILE", bank_tile)
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


@pytest.mark.slow
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


@pytest.mark.parametrize("algorithm", ["exact", "ivf"])
def test_to_moves_the_search_and_drops_the_device_state(data, algorithm):
    bank, queries = data
    memory = MemoryBank(bank, algorithm=algorithm)
    # Both rankings fill the caches: int8 for one neighbour, float32 for more.
    one, several = memory.kneighbors(queries, 1), memory.kneighbors(queries, 3)
    cached, int8 = memory._cached, getattr(memory, "_int8", None)
    assert cached is not None
    if algorithm == "exact" and int8_products_work():
        assert int8 is not None

    # "meta" holds no data: the move itself reads nothing from the device.
    moved = memory.to(torch.device("meta"))
    assert moved is not memory
    assert moved.device == torch.device("meta")
    assert getattr(moved, "_cached", None) is None
    assert getattr(moved, "_int8", None) is None
    assert moved.features is memory.features
    assert moved._index is memory._index
    assert (moved.algorithm, moved.random_state) == (algorithm, 0)
    # The original keeps its device and its caches.
    assert memory.device == torch.device("cpu")
    assert memory._cached is cached
    assert getattr(memory, "_int8", None) is int8

    back = moved.to("cpu")
    assert back.device == torch.device("cpu")
    for k, expected in ((1, one), (3, several)):
        distances, indices = back.kneighbors(queries, k)
        np.testing.assert_array_equal(indices, expected[1])
        np.testing.assert_array_equal(distances, expected[0])


def test_to_the_same_device_is_a_no_op(data):
    bank, _ = data
    memory = MemoryBank(bank)
    assert memory.to("cpu") is memory
    assert memory.to(torch.device("cpu")) is memory
    on_meta = memory.to("meta")
    assert on_meta.to(torch.device("meta")) is on_meta


def clustered(n_bank, n_queries, n_outliers, seed=0):
    """Points around 60 overlapping centres; queries from them and outliers.

    Outliers (centre plus three times the spread) stand for the patches of
    defects, far from every bank entry: the queries that decide image scores.
    On these, probing a fixed 8 of the 141 lists of 20,000 entries found the
    nearest neighbour of 98.7 % of the queries and 89 % of the outliers.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=1.0, size=(60, 32))
    scales = rng.uniform(0.5, 1.5, size=(60, 32))

    def draw(n, spread):
        which = rng.integers(len(centres), size=n)
        noise = rng.normal(size=(n, 32)) * scales[which] * spread
        return (centres[which] + noise).astype(np.float32)

    queries = np.concatenate([draw(n_queries, 1.0), draw(n_outliers, 3.0)])
    return draw(n_bank, 1.0), queries


def test_ivf_recall_against_brute_force_on_clustered_points():
    bank, queries = clustered(20000, 1500, 100)
    memory = MemoryBank(bank, algorithm="ivf", random_state=0)
    distances, indices = memory.kneighbors(queries, 3)
    true_distances = cdist(queries.astype(np.float64), bank.astype(np.float64))
    found = true_distances[np.arange(len(queries)), indices[:, 0]]
    hit = found == true_distances.min(axis=1)
    assert hit.mean() >= 0.99
    assert hit[-100:].mean() >= 0.99
    # Returned distances are the exact distances to the returned rows,
    # ascending, whatever the index's float32 ranking said.
    np.testing.assert_allclose(
        distances,
        np.take_along_axis(true_distances, indices, axis=1),
        rtol=1e-6,
    )
    assert np.all(np.diff(distances, axis=1) >= 0)
    # Far fewer lists are searched than the bank holds.
    centroids, rows, starts = memory._index
    assert len(centroids) == round(np.sqrt(len(bank)))
    np.testing.assert_array_equal(np.sort(rows), np.arange(len(bank)))
    assert starts[0] == 0 and starts[-1] == len(bank)


def test_ivf_does_not_depend_on_query_batches_or_threads(monkeypatch):
    import torch

    bank, queries = clustered(5000, 400, 40)
    memory = MemoryBank(bank, algorithm="ivf", random_state=0)
    whole = memory.kneighbors(queries, 2)
    split = [memory.kneighbors(queries[i : i + 37], 2) for i in range(0, 440, 37)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        other_threads = memory.kneighbors(queries, 2)
    finally:
        torch.set_num_threads(threads)
    for result in (tuple(np.concatenate(p) for p in zip(*split)), other_threads):
        np.testing.assert_array_equal(result[1], whole[1])
        np.testing.assert_array_equal(result[0], whole[0])


@pytest.mark.slow
def test_ivf_is_seeded_and_kept_when_pickled():
    import pickle

    bank, queries = clustered(3000, 100, 10)
    a = MemoryBank(bank, algorithm="ivf", random_state=3)
    b = MemoryBank(bank, algorithm="ivf", random_state=3)
    c = MemoryBank(bank, algorithm="ivf", random_state=4)
    for x, y in zip(a._index, b._index):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a._index[0], c._index[0])
    restored = pickle.loads(pickle.dumps(a))
    for x, y in zip(restored._index, a._index):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(
        restored.kneighbors(queries, 1)[1], a.kneighbors(queries, 1)[1]
    )


def test_ivf_searches_read_only_arrays_silently(tmp_path):
    # As a detector loaded with joblib.load(..., mmap_mode="r") holds them.
    import warnings

    import joblib

    bank, queries = clustered(3000, 100, 10)
    path = tmp_path / "bank.joblib"
    joblib.dump(MemoryBank(bank, algorithm="ivf"), path)
    loaded = joblib.load(path, mmap_mode="r")
    assert not loaded._index[1].flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        distances, _ = loaded.kneighbors(queries, 1)
    np.testing.assert_array_equal(
        distances, MemoryBank(bank, algorithm="ivf").kneighbors(queries, 1)[0]
    )


def test_ivf_searches_exactly_what_its_lists_cannot_fill():
    # 100 entries in 10 lists: a query's probed lists hold fewer than all of
    # them, so asking for every entry needs the exact search.
    bank, queries = clustered(100, 20, 0)
    distances, indices = MemoryBank(bank, algorithm="ivf").kneighbors(queries, 100)
    expected_d, expected_i = brute_force(queries, bank, 100)
    np.testing.assert_array_equal(indices, expected_i)
    np.testing.assert_allclose(distances, expected_d, rtol=1e-6)


def test_ivf_held_out_search_never_returns_own_entries():
    bank, queries = clustered(2000, 200, 20)
    bank_groups = np.arange(len(bank)) % 7
    query_groups = np.arange(len(queries)) % 7
    memory = MemoryBank(bank, algorithm="ivf", random_state=0)
    distances, indices = memory.kneighbors(
        queries, 2, exclude_groups=(query_groups, bank_groups)
    )
    assert np.all(bank_groups[indices] != query_groups[:, None])
    true_distances = cdist(queries.astype(np.float64), bank.astype(np.float64))
    np.testing.assert_allclose(
        distances, np.take_along_axis(true_distances, indices, axis=1), rtol=1e-6
    )
    # Nearest entries of the other groups, by brute force.
    true_distances[bank_groups[None, :] == query_groups[:, None]] = np.inf
    expected = true_distances.min(axis=1)
    assert np.all(distances[:, 0] >= expected * (1 - 1e-6))
    assert np.mean(np.isclose(distances[:, 0], expected, rtol=1e-6)) >= 0.99


def test_ivf_held_out_search_falls_back_where_own_entries_fill_the_lists():
    # 380 entries of group 0 around the origin fill every list a group-0
    # query probes (20 lists, at least 8 probed); the 20 entries of group 1
    # lie far away in lists of their own, so only the exact fallback finds
    # them.
    rng = np.random.default_rng(1)
    bank = np.concatenate(
        [rng.normal(size=(380, 8)), rng.normal(size=(20, 8)) + 40.0]
    ).astype(np.float32)
    bank_groups = np.repeat([0, 1], [380, 20])
    queries = rng.normal(size=(30, 8)).astype(np.float32)
    query_groups = np.zeros(len(queries), dtype=np.int64)
    memory = MemoryBank(bank, algorithm="ivf", random_state=0)
    assert len(memory._index[0]) == 20
    for k in (1, 3, 25):
        distances, indices = memory.kneighbors(
            queries, k, exclude_groups=(query_groups, bank_groups)
        )
        expected_d, expected_i = brute_force(queries, bank[380:], min(k, 20))
        np.testing.assert_array_equal(indices[:, :20], 380 + expected_i)
        np.testing.assert_allclose(distances[:, :20], expected_d, rtol=1e-6)
        # Beyond the 20 entries of other images, nothing is left to match.
        assert np.all(np.isinf(distances[:, 20:]))


def test_extended_ivf_matches_its_lists_and_rebuilds_when_outgrown():
    bank, queries = clustered(4000, 300, 40)
    memory = MemoryBank(bank[:3000], algorithm="ivf", random_state=0)
    grown = memory.extended(bank[3000:])
    np.testing.assert_array_equal(grown.features, bank)
    centroids, rows, starts = grown._index
    np.testing.assert_array_equal(centroids, memory._index[0])
    np.testing.assert_array_equal(np.sort(rows), np.arange(len(bank)))
    # Every entry sits in the list of its nearest centroid.
    labels = np.repeat(np.arange(len(centroids)), np.diff(starts))
    nearest = cdist(bank[rows], centroids).argmin(axis=1)
    assert np.mean(labels == nearest) > 0.999
    _, indices = grown.kneighbors(queries, 1)
    true_distances = cdist(queries.astype(np.float64), bank.astype(np.float64))
    found = true_distances[np.arange(len(queries)), indices[:, 0]]
    assert np.mean(found == true_distances.min(axis=1)) >= 0.99
    # Grown past 1.5 times the lists' worth of entries: a new index.
    outgrown = MemoryBank(bank[:1000], algorithm="ivf").extended(bank[1000:])
    assert len(outgrown._index[0]) == round(np.sqrt(len(bank)))
    exact = MemoryBank(bank[:10]).extended(bank[10:])
    assert exact.algorithm == "exact" and exact._index is None


@pytest.mark.parametrize(
    "algorithm, n_entries, expected",
    [
        ("auto", search.IVF_FROM_ENTRIES - 1, "exact"),
        ("auto", search.IVF_FROM_ENTRIES, "ivf"),
        ("exact", 10**7, "exact"),
        ("ivf", 10, "ivf"),
        ("pynndescent", 10, "pynndescent"),
    ],
)
def test_resolve_algorithm(algorithm, n_entries, expected):
    assert search.resolve_algorithm(algorithm, n_entries) == expected


def test_ivf_compiles_nothing(monkeypatch):
    # No numba: nothing is compiled when a detector is fitted or loaded, in
    # any process, unlike pynndescent's graph.
    import sys

    monkeypatch.setitem(sys.modules, "pynndescent", None)
    monkeypatch.setitem(sys.modules, "numba", None)
    bank, queries = clustered(500, 20, 0)
    _, indices = MemoryBank(bank, algorithm="ivf").kneighbors(queries, 1)
    assert np.mean(indices == brute_force(queries, bank, 1)[1]) >= 0.9
