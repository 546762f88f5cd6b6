"""Nearest-neighbour search in the memory bank of nominal patch features."""

import warnings

import numpy as np
import torch

# Extra candidates taken from the fast float32 pass before the exact re-ranking;
# a true neighbour could only be missed if rounding moved it past this many
# others, far beyond float32 error on distances between real features.
_RERANK_MARGIN = 8

# Queries and bank rows per tile of the float32 product. A tile of 2,048 x
# 4,096 entries (32 MiB) stays near the caches: on 784 queries against a
# 784,000 x 152 bank, the product ran at 70-85 GFLOPS in such tiles against
# 33-35 in one pass over the whole bank. Memory stays bounded whatever the
# number of queries or the bank size.
_QUERY_TILE = 2048
_BANK_TILE = 4096

# Upper bound on float64 difference entries in the exact re-ranking (64 MiB).
_RERANK_ENTRIES = 1 << 23


def as_tensor(array):
    """A CPU tensor sharing ``array``'s memory, also when ``array`` is read-only."""
    # Such tensors are only read, but torch warns on every read-only array,
    # e.g. the bank of a detector loaded with joblib.load(..., mmap_mode="r"),
    # or points that joblib hands to a worker as a read-only memory map.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="The given NumPy array is not writable"
        )
        return torch.from_numpy(array)


class MemoryBank:
    """A float32 bank of patch features with k-nearest-neighbour queries.

    Parameters
    ----------
    features : ndarray of shape (n_entries, n_features)
        The bank.

    algorithm : {"exact", "pynndescent"}, default="exact"
        ``"exact"`` searches by brute force in blocks; ``"pynndescent"``
        builds an approximate index, for large banks.

    random_state : int, default=0
        Seed of the pynndescent index.

    device : str or torch.device, default="cpu"
        Where exact searches run.

    index : pynndescent.NNDescent, default=None
        A prepared index of ``features`` to reuse instead of building one.

    Notes
    -----
    Exact search ranks candidates with a float32 matrix product, then
    recomputes the distances of the ``k + 8`` best candidates as float64
    norms of differences and re-ranks them. Returned distances are therefore
    accurate (no cancellation in ``|a|^2 + |b|^2 - 2ab``) and do not depend on
    how queries are split into blocks or batches.
    """

    def __init__(
        self, features, algorithm="exact", random_state=0, device="cpu", index=None
    ):
        if not (features.dtype == np.float32 and features.flags.c_contiguous):
            features = np.ascontiguousarray(features, dtype=np.float32)
        # Held by reference, so that a pickled detector stores its bank once.
        self.features = features
        self.algorithm = algorithm
        self.random_state = random_state
        self.device = torch.device(device)
        self._index = index
        if algorithm == "pynndescent" and index is None:
            self._build_index()

    def __len__(self):
        return self.features.shape[0]

    def _build_index(self):
        from pynndescent import NNDescent

        self._index = NNDescent(
            self.features,
            metric="euclidean",
            random_state=self.random_state,
            n_neighbors=min(30, len(self) - 1) if len(self) > 2 else 1,
        )
        self._index.prepare()

    def _device_features(self):
        if getattr(self, "_cached", None) is None:
            tensor = as_tensor(self.features).to(self.device)
            self._cached = (tensor, (tensor * tensor).sum(dim=1))
        return self._cached

    def kneighbors(self, queries, n_neighbors=1, exclude_groups=None):
        """Distances and indices of the nearest bank entries of each query.

        Parameters
        ----------
        queries : ndarray of shape (n_queries, n_features)
            Query features.

        n_neighbors : int, default=1
            Neighbours per query, at most the bank size.

        exclude_groups : tuple of two ndarrays, default=None
            ``(query_groups, bank_groups)``: a query never matches a bank
            entry of its own group. Used to score training images against a
            bank without their own patches; always searched exactly.

        Returns
        -------
        distances : ndarray of shape (n_queries, n_neighbors)
            Euclidean distances, ascending, float32.

        indices : ndarray of shape (n_queries, n_neighbors)
            Bank row of each neighbour.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        n_candidates = min(len(self), n_neighbors + _RERANK_MARGIN)
        block = max(
            1,
            min(
                _QUERY_TILE,
                _RERANK_ENTRIES // (n_candidates * self.features.shape[1]),
            ),
        )
        approximate = self.algorithm == "pynndescent" and exclude_groups is None
        distances, indices = [], []
        for start in range(0, len(queries), block):
            chunk = queries[start : start + block]
            if approximate:
                candidates = self._index_candidates(chunk, n_candidates)
                excluded = None
            else:
                groups = None
                if exclude_groups is not None:
                    groups = (
                        exclude_groups[0][start : start + block],
                        exclude_groups[1],
                    )
                candidates, excluded = self._exact_candidates(
                    chunk, n_candidates, groups
                )
            d, i = self._rerank(chunk, candidates, n_neighbors, excluded)
            distances.append(d)
            indices.append(i)
        return np.concatenate(distances), np.concatenate(indices)

    def _index_candidates(self, queries, n_candidates):
        if self._index is None:
            self._build_index()
        candidates, _ = self._index.query(queries, k=n_candidates)
        return candidates.astype(np.int64)

    def _exact_candidates(self, queries, n_candidates, groups):
        """The ``n_candidates`` best bank rows per query by a float32 product.

        The bank is swept in tiles; each tile's best rows are merged with
        the best so far, so the result is that of one pass over the bank.
        """
        bank, bank_norms = self._device_features()
        chunk = as_tensor(queries).to(self.device)
        if groups is not None:
            query_groups, bank_groups = groups
            # Only the bank rows of the queries' own groups can be excluded:
            # comparing those alone, instead of every pair, cut the extra
            # time of a held-out search over a plain one from 25 % to 9 %
            # (784 queries, a bank of 784,000 rows from 10,000 images).
            own_rows = np.flatnonzero(np.isin(bank_groups, np.unique(query_groups)))
            query_groups = torch.from_numpy(query_groups).to(self.device)
        best_values = best_rows = None
        for start in range(0, len(bank), _BANK_TILE):
            stop = min(start + _BANK_TILE, len(bank))
            # One fused call: the product followed by a scaled subtraction
            # took 2.4 times as long on 12,544 x 4,234 entries.
            approx = torch.addmm(
                bank_norms[None, start:stop], chunk, bank[start:stop].T, alpha=-2.0
            )
            if groups is not None:
                first, last = np.searchsorted(own_rows, (start, stop))
                own_in_tile = own_rows[first:last]
                if len(own_in_tile):
                    columns = torch.from_numpy(own_in_tile - start).to(self.device)
                    tile_groups = torch.from_numpy(bank_groups[own_in_tile])
                    tile_groups = tile_groups.to(self.device)
                    same = query_groups[:, None] == tile_groups[None, :]
                    approx[:, columns] = approx[:, columns].masked_fill_(
                        same, float("inf")
                    )
            values, rows = torch.topk(
                approx, min(n_candidates, stop - start), dim=1, largest=False
            )
            rows += start
            if best_values is not None:
                values = torch.cat([best_values, values], dim=1)
                rows = torch.cat([best_rows, rows], dim=1)
                values, kept = torch.topk(
                    values, min(n_candidates, values.shape[1]), dim=1, largest=False
                )
                rows = rows.gather(1, kept)
            best_values, best_rows = values, rows
        excluded = None
        if groups is not None:
            excluded = torch.isinf(best_values).cpu().numpy()
        return best_rows.cpu().numpy(), excluded

    def _rerank(self, queries, candidates, n_neighbors, excluded):
        # Candidates in bank order, then a stable sort by distance: equal
        # distances keep the lower bank index first, however the bank was
        # swept for them.
        by_row = np.argsort(candidates, axis=1, kind="stable")
        rows = np.arange(len(queries))[:, None]
        candidates = candidates[rows, by_row]
        distances = self.exact_distances(queries, candidates)
        if excluded is not None:
            distances[excluded[rows, by_row]] = np.inf
        order = np.argsort(distances, axis=1, kind="stable")[:, :n_neighbors]
        return distances[rows, order].astype(np.float32), candidates[rows, order]

    def exact_distances(self, queries, indices):
        """Float64 Euclidean distances from each query to its listed bank rows.

        Parameters
        ----------
        queries : ndarray of shape (n_queries, n_features)
            Query features.

        indices : ndarray of shape (n_queries, k)
            Bank rows per query.

        Returns
        -------
        distances : ndarray of shape (n_queries, k)
            Norms of the differences, computed in float64.
        """
        # torch rather than numpy: its gather and reduction use every core.
        bank = as_tensor(self.features)
        differences = bank[torch.from_numpy(np.asarray(indices))].to(torch.float64)
        differences.sub_(as_tensor(np.asarray(queries))[:, None, :])
        return torch.linalg.vector_norm(differences, dim=2).numpy()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cached"] = None
        state["device"] = torch.device("cpu")
        return state
