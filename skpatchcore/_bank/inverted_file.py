"""An inverted-file index of the memory bank: k-means lists searched by matmuls.

The bank is partitioned into lists by k-means; a query is compared with the
entries of the lists whose centroids are nearest to it only. Each list is
compared with all the queries that probe it in one matrix product, so the
search runs on dense products like the exact search, over a small part of
the bank.

How many lists a query probes adapts to the query: at least a fixed number,
plus every list whose centroid is within a factor of the nearest centroid's
distance. A patch far from every centroid, such as a defect's, is about as
far from many of them, and its nearest bank entry may lie in any of those
lists; such patches decide image scores, so they are the ones not to miss.
"""

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .._torch_utils import one_torch_thread

# k-means is trained on this many bank entries per list, at most, for this
# many Lloyd iterations, then every entry joins its nearest centroid's list.
_TRAINING_PER_LIST = 64
_KMEANS_ITERATIONS = 10

# Each query probes its nearest lists, at least _MIN_PROBES of them or this
# fraction of all, and every list whose centroid is within _PROBE_RATIO
# times the nearest centroid's distance: on real patch features this found
# the exact neighbours, the most anomalous patches' included, at least as
# often as a fixed fraction of the lists that probed as many lists or more
# (docs/results.rst, "Approximate nearest-neighbour search", "How the
# indexes are set").
_PROBED_FRACTION = 1 / 64
_MIN_PROBES = 8
_PROBE_RATIO = 1.25

# Float32 entries of one distance tile (16 MiB), and queries searched
# together: their (query, list) pairs are held at once, a few dozen per
# query on a large bank (docs/results.rst, "Approximate nearest-neighbour
# search", "How the indexes are set").
_TILE_ENTRIES = 1 << 22
_QUERY_CHUNK = 16384


def n_lists_for(n_entries):
    """Number of k-means lists of a bank of ``n_entries`` entries.

    About the square root of the bank size: the comparisons of each query
    with the centroids then cost no more than those with a few lists.

    Parameters
    ----------
    n_entries : int
        Bank size.

    Returns
    -------
    n_lists : int
        Number of lists.
    """
    return max(1, round(math.sqrt(n_entries)))


def _nearest_centroids(points, centroids):
    """Row of the centroid nearest to each point, by float32 products."""
    norms = (centroids * centroids).sum(dim=1)
    tile = max(1, _TILE_ENTRIES // len(centroids))
    nearest = torch.empty(len(points), dtype=torch.int64, device=points.device)
    for start in range(0, len(points), tile):
        distances = torch.addmm(
            norms[None], points[start : start + tile], centroids.T, alpha=-2.0
        )
        nearest[start : start + tile] = distances.argmin(dim=1)
    return nearest


def build_inverted_file(bank, random_state):
    """Partition a bank into k-means lists.

    Parameters
    ----------
    bank : torch.Tensor of shape (n_entries, n_features)
        The float32 bank.

    random_state : int
        Seed of the k-means training sample and starting centroids.

    Returns
    -------
    index : tuple of three ndarrays
        ``(centroids, rows, starts)``: the float32 centroids of shape
        (n_lists, n_features), the bank rows ordered by list, and where each
        list starts in ``rows`` (n_lists + 1 offsets). Plain arrays, so that
        pickle and skops store the index as it is.
    """
    n_entries = len(bank)
    n_lists = n_lists_for(n_entries)
    rng = np.random.RandomState(random_state)
    n_train = min(n_entries, _TRAINING_PER_LIST * n_lists)
    training = bank[torch.from_numpy(np.sort(rng.choice(n_entries, n_train, False)))]
    centroids = training[torch.from_numpy(rng.choice(n_train, n_lists, False))]
    for _ in range(_KMEANS_ITERATIONS):
        labels = _nearest_centroids(training, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, labels, training)
        counts = torch.bincount(labels, minlength=n_lists)
        # A centroid that attracted no entry keeps its place.
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None].to(sums.dtype)
    labels = _nearest_centroids(bank, centroids)
    rows = torch.argsort(labels, stable=True)
    starts = torch.zeros(n_lists + 1, dtype=torch.int64)
    starts[1:] = torch.cumsum(torch.bincount(labels, minlength=n_lists).cpu(), dim=0)
    return centroids.cpu().numpy(), rows.cpu().numpy(), starts.numpy()


def extend_inverted_file(index, new_entries, n_old):
    """Add bank rows ``n_old`` onwards to the lists of an index of the others.

    Each new entry joins the list of its nearest centroid; the centroids do
    not move, and the entries of each list keep their order, the new ones
    after the old.

    Parameters
    ----------
    index : tuple of three ndarrays
        The index of bank rows ``0`` to ``n_old - 1``, as
        :func:`build_inverted_file` returns it.

    new_entries : torch.Tensor of shape (n_new, n_features)
        The float32 rows ``n_old`` to ``n_old + n_new - 1`` of the bank.

    n_old : int
        Bank rows that ``index`` holds.

    Returns
    -------
    index : tuple of three ndarrays
        ``(centroids, rows, starts)`` of the whole bank.
    """
    centroids, rows, starts = (np.asarray(array) for array in index)
    n_lists = len(centroids)
    new_labels = _nearest_centroids(
        new_entries, torch.from_numpy(np.array(centroids)).to(new_entries.device)
    )
    labels = np.concatenate(
        [np.repeat(np.arange(n_lists), np.diff(starts)), new_labels.cpu().numpy()]
    )
    rows = np.concatenate([rows, np.arange(n_old, n_old + len(new_entries))])
    starts = np.zeros(n_lists + 1, dtype=np.int64)
    starts[1:] = np.cumsum(np.bincount(labels, minlength=n_lists))
    return np.array(centroids), rows[np.argsort(labels, kind="stable")], starts


def _probes(queries, centroids):
    """``(query, list)`` pairs to search, sorted by list, and the list sizes."""
    n_lists = len(centroids)
    n_nearest = min(n_lists, max(_MIN_PROBES, math.ceil(_PROBED_FRACTION * n_lists)))
    norms = (centroids * centroids).sum(dim=1)
    tile = max(1, _TILE_ENTRIES // n_lists)
    pairs = []
    for start in range(0, len(queries), tile):
        chunk = queries[start : start + tile]
        squared = torch.addmm(norms[None], chunk, centroids.T, alpha=-2.0)
        squared += (chunk * chunk).sum(dim=1, keepdim=True)
        squared.clamp_(min=0.0)
        nearest, first = torch.topk(squared, n_nearest, dim=1, largest=False)
        probed = squared <= _PROBE_RATIO**2 * nearest[:, :1]
        probed.scatter_(1, first, True)
        found = probed.nonzero()
        found[:, 0] += start
        pairs.append(found)
    pairs = torch.cat(pairs)
    pairs = pairs[torch.argsort(pairs[:, 1], stable=True)]
    return pairs[:, 0], torch.bincount(pairs[:, 1], minlength=n_lists).tolist()


def inverted_file_candidates(
    index, bank, bank_norms, queries, n_candidates, groups=None
):
    """The ``n_candidates`` best rows per query among its probed lists.

    Parameters
    ----------
    index : tuple of three CPU tensors
        The arrays that :func:`build_inverted_file` returned.

    bank : torch.Tensor of shape (n_entries, n_features)
        The float32 bank the index was built on.

    bank_norms : torch.Tensor of shape (n_entries,)
        Squared norms of the bank entries.

    queries : torch.Tensor of shape (n_queries, n_features)
        Float32 queries on the bank's device.

    n_candidates : int
        Candidates per query, ranked by float32 distances.

    groups : tuple of two int64 tensors, default=None
        ``(query_groups, bank_groups)`` on the bank's device: a query never
        takes a bank entry of its own group as a candidate.

    Returns
    -------
    candidates : ndarray of shape (n_queries, n_candidates)
        Bank rows, -1 where the probed lists held fewer entries (of other
        groups).
    """
    centroids, rows, starts = index
    device = bank.device
    centroids, rows = centroids.to(device), rows.to(device)
    lists = [
        rows[begin:end] for begin, end in zip(starts[:-1].tolist(), starts[1:].tolist())
    ]
    candidates = [np.empty((0, n_candidates), dtype=np.int64)]
    for start in range(0, len(queries), _QUERY_CHUNK):
        chunk = queries[start : start + _QUERY_CHUNK]
        chunk_groups = None
        if groups is not None:
            chunk_groups = (groups[0][start : start + _QUERY_CHUNK], groups[1])
        asking, counts = _probes(chunk, centroids)
        tasks, first = [], 0
        for members, count in zip(lists, counts):
            if count and len(members):
                tasks.append((members, asking[first : first + count]))
            first += count
        candidates.append(
            _search_lists(tasks, bank, bank_norms, chunk, n_candidates, chunk_groups)
        )
    return np.concatenate(candidates)


def _search_lists(tasks, bank, bank_norms, queries, n_candidates, groups):
    """Candidates of ``queries`` over ``(list members, asking queries)`` tasks.

    Entries of a query's own group (``groups``) count as infinitely far, so
    they are kept only where too few others were probed, and then returned
    as -1, as are the places that no entry filled.
    """
    lock, remaining = threading.Lock(), iter(tasks)

    def next_task():
        with lock:
            return next(remaining, None)

    def worker():
        """Best rows of each query over the lists this worker takes."""
        best_values = torch.full(
            (len(queries), n_candidates), float("inf"), device=bank.device
        )
        best_rows = torch.full(
            (len(queries), n_candidates), -1, dtype=torch.int64, device=bank.device
        )
        for members, asking in iter(next_task, None):
            vectors, norms = bank[members], bank_norms[members]
            if groups is not None:
                member_groups = groups[1][members]
            step = max(1, _TILE_ENTRIES // len(members))
            for start in range(0, len(asking), step):
                these = asking[start : start + step]
                distances = torch.addmm(
                    norms[None], queries[these], vectors.T, alpha=-2.0
                )
                if groups is not None:
                    own = groups[0][these, None] == member_groups[None, :]
                    distances.masked_fill_(own, float("inf"))
                values, found = torch.topk(
                    distances, min(n_candidates, len(members)), dim=1, largest=False
                )
                values = torch.cat([best_values[these], values], dim=1)
                found = torch.cat([best_rows[these], members[found]], dim=1)
                values, kept = torch.topk(values, n_candidates, dim=1, largest=False)
                best_values[these] = values
                best_rows[these] = found.gather(1, kept)
        return best_values, best_rows

    n_threads = torch.get_num_threads()
    if bank.device.type == "cpu" and n_threads > 1:
        # Lists in parallel, each on one thread: a list's products are
        # small, and torch's own threads spent more time waiting for each
        # other than computing on them, far more when other work shared the
        # cores (docs/results.rst, "Approximate nearest-neighbour search",
        # "How the indexes are set").
        with one_torch_thread(), ThreadPoolExecutor(n_threads) as pool:
            found = [pool.submit(worker) for _ in range(n_threads)]
            found = [future.result() for future in found]
    else:
        found = [worker()]
    values = torch.cat([values for values, _ in found], dim=1)
    rows = torch.cat([rows for _, rows in found], dim=1)
    values, kept = torch.topk(values, n_candidates, dim=1, largest=False)
    rows = rows.gather(1, kept)
    rows[torch.isinf(values)] = -1
    return rows.cpu().numpy()
