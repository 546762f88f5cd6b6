"""Nearest-neighbour search in the memory bank of nominal patch features."""

import numpy as np
import torch

from .._torch_utils import as_tensor
from .int8 import Int8Bank, int8_products_work
from .inverted_file import (
    build_inverted_file,
    extend_inverted_file,
    inverted_file_candidates,
    n_lists_for,
)
from .selection import smallest_per_row

# Extra candidates taken from the fast ranking pass before the exact
# re-ranking: a true neighbour is missed only if rounding moves it past this
# many others, far beyond float32 error on distances between real features,
# and twice the worst rank that int8 quantisation gave the true neighbour on
# the shared data sets (docs/results.rst, "Prediction stages on the CPU",
# "Earlier measurements").
_RERANK_MARGIN = 8

# Rank the bank by int8 products on the CPU; False ranks in float32 (tests
# and benchmarks compare the two).
_INT8_RANKING = True

# Queries and bank rows per tile of the ranking product. Tiles of 16 MiB of
# keys stay near the caches; larger ones, which the allocator also hands
# back to the system after each tile, were slower, and so was one pass over
# the whole bank. Memory stays bounded whatever the number of queries or the
# bank size. docs/results.rst, "Prediction stages on the CPU", has the times
# (the tile row, its notes and "Earlier measurements").
_QUERY_TILE = 1024
_BANK_TILE = 4096

# Search breadth of pynndescent queries (its default is 0.1): 0.3 finds far
# more of the exact neighbours of real patch features, for slower queries.
# docs/results.rst, "Approximate nearest-neighbour search" (its notes and
# "How the indexes are set"), has the study.
_PYNNDESCENT_EPSILON = 0.3

# An inverted file extended by partial_fit keeps its lists until the bank's
# square root, the number of lists a new index would have, exceeds theirs
# by this factor (the bank 2.25 times the size the index was built for);
# then it is rebuilt. Extending compares the new entries with the centroids
# only. On Lite0 ELPV features with two busy cores, an index of 78,400
# entries took 1.3 s to extend by 7,840 and 12.2 s to rebuild; one of
# 50,000 extended by 50,000 found 99.86 % of the exact neighbours against
# 99.88 % for a rebuilt one, as fast (docs/results.rst, "Prediction at any
# scale").
_IVF_GROWTH = 1.5

# Bank size from which nn_algorithm="auto" searches the inverted file.
# Below it, exact search costs a quarter of a second per image or less and
# the index, 1.6 to 3 times faster, moved one image's score by up to 1.5;
# at 100,000 entries it was 5.5 to 8.6 times faster with AUROC unchanged.
# Fits of up to about 640 images at 224 x 224 and ratio 0.1, which include
# the usual benchmarks (MVTec AD's largest category has 391), keep the
# paper's search (docs/results.rst, "Prediction at any scale").
IVF_FROM_ENTRIES = 50_000

# Upper bound on float64 difference entries in the exact re-ranking (64 MiB).
_RERANK_ENTRIES = 1 << 23


def resolve_algorithm(algorithm, n_entries):
    """The search that ``algorithm`` asks for on a bank of ``n_entries``.

    Parameters
    ----------
    algorithm : {"auto", "exact", "ivf", "pynndescent"}
        ``"auto"`` is ``"exact"`` below ``IVF_FROM_ENTRIES`` entries and
        ``"ivf"`` from there on; the others are returned as they are.

    n_entries : int
        Bank size.

    Returns
    -------
    algorithm : {"exact", "ivf", "pynndescent"}
    """
    if algorithm != "auto":
        return algorithm
    return "ivf" if n_entries >= IVF_FROM_ENTRIES else "exact"


class MemoryBank:
    """A float32 bank of patch features with k-nearest-neighbour queries.

    Parameters
    ----------
    features : ndarray of shape (n_entries, n_features)
        The bank.

    algorithm : {"exact", "ivf", "pynndescent"}, default="exact"
        ``"exact"`` searches by brute force in blocks; ``"ivf"`` builds an
        inverted-file index (k-means lists, see
        :func:`~skpatchcore._bank.inverted_file.build_inverted_file`) and
        ``"pynndescent"`` a neighbour graph, both approximate, for large
        banks.

    random_state : int, default=0
        Seed of the index.

    device : str or torch.device, default="cpu"
        Where exact and inverted-file searches run; :meth:`to` gives the
        bank on another device.

    index : tuple of ndarray or pynndescent.NNDescent, default=None
        A prepared index of ``features`` to reuse instead of building one.

    Notes
    -----
    Exact search ranks candidates with a float32 matrix product, then
    recomputes the distances of the ``k + 8`` best candidates as float64
    norms of differences and re-ranks them. Returned distances are therefore
    accurate (no cancellation in ``|a|^2 + |b|^2 - 2ab``) and do not depend on
    how queries are split into blocks or batches.

    An index proposes the ``k + 8`` candidates instead, re-ranked the same
    way: a neighbour it misses is replaced by a farther entry, but every
    returned distance is the exact distance to the returned row. Searches
    with ``exclude_groups`` go through the inverted file too, which leaves
    out each query's own group while it ranks the probed lists; a query
    whose probed lists hold too few entries of other groups is searched
    exactly. pynndescent's searches with ``exclude_groups`` are exact.
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
        if algorithm != "exact" and index is None:
            self._build_index()

    def __len__(self):
        return self.features.shape[0]

    def to(self, device):
        """The bank searching on ``device``.

        Parameters
        ----------
        device : str or torch.device
            Where the exact and inverted-file searches are to run.
            pynndescent's graph is searched on the CPU wherever the bank is.

        Returns
        -------
        bank : MemoryBank
            ``self`` when ``device`` equals the bank's ``device``; otherwise a
            new bank on ``device`` holding the same features and index (not
            copies, and the index is not rebuilt), whose copy of the features
            on the device, and int8 bank on the CPU, are made by its first
            search. ``self`` keeps its own.
        """
        device = torch.device(device)
        if device == self.device:
            return self
        return MemoryBank(
            self.features,
            algorithm=self.algorithm,
            random_state=self.random_state,
            device=device,
            index=self._index,
        )

    def extended(self, features):
        """The bank with ``features`` appended, and its index kept current.

        Parameters
        ----------
        features : ndarray of shape (n_new, n_features)
            New entries, after the bank's own.

        Returns
        -------
        bank : MemoryBank
            A new bank on the same device with the same algorithm and seed.
            An inverted file is extended (each new entry joins its nearest
            list) while the bank's square root stays within
            ``_IVF_GROWTH`` times its number of lists, and rebuilt beyond;
            a pynndescent graph is rebuilt.
        """
        features = np.ascontiguousarray(features, dtype=np.float32)
        index = None
        if self.algorithm == "ivf" and self._index is not None:
            n_lists = len(self._index[0])
            if n_lists_for(len(self) + len(features)) <= _IVF_GROWTH * n_lists:
                index = extend_inverted_file(
                    self._index, as_tensor(features).to(self.device), len(self)
                )
        return MemoryBank(
            np.concatenate([self.features, features]),
            algorithm=self.algorithm,
            random_state=self.random_state,
            device=self.device,
            index=index,
        )

    def _build_index(self):
        if self.algorithm == "ivf":
            self._index = build_inverted_file(
                self._device_features()[0], self.random_state
            )
            return
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
            bank without their own patches; searched exactly unless the bank
            has an inverted file, whose probed lists are then searched
            without the query's own entries.

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
        approximate = self.algorithm == "ivf" or (
            self.algorithm == "pynndescent" and exclude_groups is None
        )
        if approximate:
            # All at once: an inverted-file search compares each list with
            # every query that probes it in one product.
            all_candidates, all_excluded = self._index_candidates(
                queries, n_candidates, exclude_groups
            )
        distances, indices = [], []
        for start in range(0, len(queries), block):
            chunk = queries[start : start + block]
            if approximate:
                candidates = all_candidates[start : start + block]
                excluded = None
                if all_excluded is not None:
                    excluded = all_excluded[start : start + block]
            else:
                groups = None
                if exclude_groups is not None:
                    groups = (
                        exclude_groups[0][start : start + block],
                        exclude_groups[1],
                    )
                # Int8 keys rank the nearest entry well within the margin,
                # but not always the order of several neighbours of tightly
                # clustered features: those searches (eq. 7's few) stay in
                # float32.
                candidates, excluded = self._exact_candidates(
                    chunk, n_candidates, groups, int8=n_neighbors == 1
                )
            d, i = self._rerank(chunk, candidates, n_neighbors, excluded)
            distances.append(d)
            indices.append(i)
        return np.concatenate(distances), np.concatenate(indices)

    def _index_candidates(self, queries, n_candidates, groups=None):
        """Candidates from the index, and which are of the query's group.

        The second array is None unless ``groups`` is given.
        """
        if self._index is None:
            self._build_index()
        if self.algorithm == "pynndescent":
            candidates, _ = self._index.query(
                queries, k=n_candidates, epsilon=_PYNNDESCENT_EPSILON
            )
            return candidates.astype(np.int64), None
        bank, bank_norms = self._device_features()
        device_groups = None
        if groups is not None:
            device_groups = tuple(
                torch.from_numpy(np.asarray(g, dtype=np.int64)).to(self.device)
                for g in groups
            )
        candidates = inverted_file_candidates(
            # Read-only arrays when the detector was loaded memory-mapped.
            tuple(as_tensor(array) for array in self._index),
            bank,
            bank_norms,
            as_tensor(queries).to(self.device),
            n_candidates,
            device_groups,
        )
        # Probed lists too small to fill the candidates (tiny banks), or
        # filled with the query's own entries (a training image's patches
        # held out from a bank of mostly its own): these queries are
        # searched exactly, over the whole bank.
        short = np.flatnonzero((candidates < 0).any(axis=1))
        excluded = None if groups is None else np.zeros(candidates.shape, bool)
        if len(short):
            short_groups = None if groups is None else (groups[0][short], groups[1])
            found, short_excluded = self._exact_candidates(
                queries[short], n_candidates, short_groups
            )
            candidates[short] = found
            if excluded is not None:
                excluded[short] = short_excluded
        return candidates, excluded

    def _int8_bank(self):
        """The bank quantised for ranking on the CPU, or None to rank in float32."""
        if not (_INT8_RANKING and self.device.type == "cpu" and int8_products_work()):
            return None
        if getattr(self, "_int8", None) is None:
            self._int8 = Int8Bank(self._device_features()[0])
        return self._int8

    def _exact_candidates(self, queries, n_candidates, groups, int8=False):
        """The ``n_candidates`` best bank rows per query by a fast product.

        With ``int8`` on the CPU, the bank is ranked by int8 products (see
        :mod:`skpatchcore._bank.int8`); otherwise, on other devices
        and for queries beyond the bank's int8 range, by a float32 product.
        """
        chunk = as_tensor(queries).to(self.device)
        int8_bank = self._int8_bank() if int8 else None
        if int8_bank is None:
            return self._sweep(chunk, n_candidates, groups, self._float_keys)
        quantised, clipped = int8_bank.quantise(chunk)
        if not bool(clipped.any()):
            return self._sweep(quantised, n_candidates, groups, int8_bank.keys)
        candidates = np.empty((len(chunk), n_candidates), dtype=np.int64)
        excluded = None if groups is None else np.empty(candidates.shape, bool)
        clipped = clipped.numpy()
        for rows, sources, keys in (
            (~clipped, quantised, int8_bank.keys),
            (clipped, chunk, self._float_keys),
        ):
            part_groups = None if groups is None else (groups[0][rows], groups[1])
            found, part_excluded = self._sweep(
                sources[torch.from_numpy(rows)], n_candidates, part_groups, keys
            )
            candidates[rows] = found
            if excluded is not None:
                excluded[rows] = part_excluded
        return candidates, excluded

    def _float_keys(self, chunk, start, stop):
        """Squared distances minus the queries' squared norms, in float32."""
        bank, bank_norms = self._device_features()
        # One fused call: the product followed by a scaled subtraction took
        # far longer (docs/results.rst, "Prediction stages on the CPU",
        # "Earlier measurements").
        return torch.addmm(
            bank_norms[None, start:stop], chunk, bank[start:stop].T, alpha=-2.0
        )

    def _sweep(self, chunk, n_candidates, groups, keys):
        """The rows of smallest ``keys(chunk, start, stop)`` over the bank.

        The bank is swept in tiles; each tile's best rows are merged with
        the best so far, so the result is that of one pass over the bank.
        """
        n_bank = len(self)
        if groups is not None:
            query_groups, bank_groups = groups
            # Only the bank rows of the queries' own groups can be excluded:
            # comparing those alone, instead of every pair, cuts most of the
            # extra time of a held-out search over a plain one
            # (docs/results.rst, "Fitting at scale", run C).
            own_rows = np.flatnonzero(np.isin(bank_groups, np.unique(query_groups)))
            query_groups = torch.from_numpy(query_groups).to(self.device)
        best_values = best_rows = excluded_key = None
        for start in range(0, n_bank, _BANK_TILE):
            stop = min(start + _BANK_TILE, n_bank)
            approx = keys(chunk, start, stop)
            if excluded_key is None:
                excluded_key = (
                    torch.iinfo(approx.dtype).max
                    if not approx.is_floating_point()
                    else float("inf")
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
                        same, excluded_key
                    )
            values, rows = smallest_per_row(approx, min(n_candidates, stop - start))
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
            excluded = (best_values == excluded_key).cpu().numpy()
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
        state["_int8"] = None
        state["device"] = torch.device("cpu")
        return state
