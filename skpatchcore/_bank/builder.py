"""Build the memory bank from training images, one chunk of images at a time.

The data's way: images -> patch features of one chunk -> projected features
-> greedy k-center selection in that chunk -> the chunk's coreset joins the
bank, and the rest of the chunk's features are dropped. Only the chunks being
selected at once are ever held at full length, so memory grows with the bank
(``coreset_ratio`` of all patches), not with all patches; time grows linearly
with the number of images, as each chunk's selection costs the same.
"""

import math
from typing import NamedTuple

import numpy as np
from joblib import Parallel, delayed, effective_n_jobs

from .._feature_batch import FeatureBatch
from .._progress import progress_bar
from .coreset import greedy_k_center, project, selection_projection, split_budget


def plan_chunks(n_images, patches_per_image, *, method, chunk_size, random_state):
    """Split image indices into the chunks whose coresets make up the bank.

    Parameters
    ----------
    n_images : int
        Number of training images.

    patches_per_image : int or ndarray of shape (n_images,)
        Patch features per image, or of each image.

    method : {"auto", "greedy", "partitioned"}
        ``"greedy"``: one chunk of all images, in order (Algorithm 1 on all
        patches). ``"partitioned"``: chunks of at most ``chunk_size`` patches
        (at least one image each), as many images in each as fit when every
        image has as many patches as the largest. ``"auto"``: greedy when
        all patches fit in one chunk, else partitioned.

    chunk_size : int
        Largest number of patches per chunk.

    random_state : numpy.random.RandomState
        Shuffles the images among chunks when there are several, so that
        every chunk is a random sample of the training set.

    Returns
    -------
    chunks : list of ndarray of int
        Image indices of each chunk, of near-equal sizes.
    """
    patches_per_image = np.broadcast_to(patches_per_image, (n_images,))
    if method == "greedy" or patches_per_image.sum() <= chunk_size:
        return [np.arange(n_images)]
    images_per_chunk = max(1, chunk_size // int(patches_per_image.max()))
    n_chunks = math.ceil(n_images / images_per_chunk)
    return np.array_split(random_state.permutation(n_images), n_chunks)


class _KeptImages(NamedTuple):
    """Where the features of the images kept for calibration are gathered."""

    slots: dict
    starts: np.ndarray
    rows: np.ndarray
    grid_shapes: list
    geometries: list


class BankBuilder:
    """Select the memory bank of a stream of training images.

    Parameters
    ----------
    features : PatchFeatures
        The engine's feature stage.

    projection_dim : int or None
        Dimension of the random projection the selection runs on.

    method : {"auto", "greedy", "partitioned"}
        See :func:`plan_chunks`.

    chunk_size : int
        Largest number of patches per chunk.

    n_jobs : int or None
        Chunks selected in parallel, through joblib.

    batch_size : int
        Images read and transformed together.

    random_state : numpy.random.RandomState
        Draws, in this order, the shuffle of images among chunks (only with
        several chunks), the projection and one starting point per chunk.

    verbose : int
        Show progress bars when positive.
    """

    def __init__(
        self,
        features,
        *,
        projection_dim,
        method,
        chunk_size,
        n_jobs,
        batch_size,
        random_state,
        verbose,
    ):
        self.features = features
        self.projection_dim = projection_dim
        self.method = method
        self.chunk_size = chunk_size
        self.n_jobs = n_jobs
        self.batch_size = batch_size
        self.random_state = random_state
        self.verbose = verbose

    def build(self, sources, n_bank, patch_counts, keep_images=(), hold_out=False):
        """The memory bank of ``sources``, and the features of ``keep_images``.

        Parameters
        ----------
        sources : list
            Validated image sources (see ``check_images``).

        n_bank : int
            Bank size, at least 1; all patches are kept when they are not
            more.

        patch_counts : ndarray of shape (len(sources),)
            Patch features of each image.

        keep_images : array-like of int, default=()
            Images whose full patch features are also returned, e.g. to
            calibrate thresholds.

        hold_out : bool, default=False
            Keep ``keep_images`` out of the bank: their features are only
            returned, and the coreset is selected among the other images.

        Returns
        -------
        bank : ndarray of shape (n_bank, n_features)
            Float32 coreset features.

        bank_images : ndarray of shape (n_bank,)
            The training image each bank entry comes from.

        kept : FeatureBatch
            Patch features of ``keep_images``, in their order.
        """
        n_features = self.features.feature_dim
        keep_images = np.asarray(keep_images, dtype=np.int64)
        in_bank = np.arange(len(sources))
        if hold_out:
            in_bank = np.setdiff1d(in_bank, keep_images)
        n_patches = int(patch_counts[in_bank].sum())
        chunks = plan_chunks(
            len(in_bank),
            patch_counts[in_bank],
            method=self.method,
            chunk_size=self.chunk_size,
            random_state=self.random_state,
        )
        chunks = [in_bank[chunk] for chunk in chunks]
        select = n_bank < n_patches
        if select:
            projection = selection_projection(
                n_features, self.projection_dim, self.random_state
            )
            sizes = [int(patch_counts[chunk].sum()) for chunk in chunks]
            shares = split_budget(n_bank, sizes)
            starts = [int(self.random_state.randint(size)) for size in sizes]
        kept_counts = patch_counts[keep_images]
        kept = _KeptImages(
            slots={int(i): s for s, i in enumerate(keep_images)},
            starts=np.cumsum(kept_counts) - kept_counts,
            rows=np.empty((int(kept_counts.sum()), n_features), dtype=np.float32),
            grid_shapes=[None] * len(keep_images),
            geometries=[None] * len(keep_images),
        )
        device = self.features.device
        # Chunks go to joblib workers on the CPU; one GPU does them in turn.
        n_parallel = 1 if device.type != "cpu" else effective_n_jobs(self.n_jobs)
        # Filled in place: joining per-chunk pieces at the end would hold
        # the bank twice at the peak (docs/results.rst, "Fitting at scale",
        # run D).
        n_rows = n_bank if select else n_patches
        bank = np.empty((n_rows, n_features), dtype=np.float32)
        bank_images = np.empty(n_rows, dtype=np.int64)
        filled = 0
        with (
            progress_bar(len(sources), "features", "images", self.verbose) as images,
            progress_bar(n_bank, "coreset", "patches", self.verbose and select) as bar,
            Parallel(n_jobs=1 if device.type != "cpu" else self.n_jobs) as parallel,
        ):
            if hold_out:
                # Their features are copied into the kept slots, then dropped.
                self._extract(sources, keep_images, patch_counts, images, kept)
            for first in range(0, len(chunks), n_parallel):
                group = range(first, min(first + n_parallel, len(chunks)))
                features = [
                    self._extract(sources, chunks[c], patch_counts, images, kept)
                    for c in group
                ]
                if select:
                    chosen = parallel(
                        delayed(greedy_k_center)(
                            project(f, projection), int(shares[c]), starts[c], device
                        )
                        for c, f in zip(group, features)
                    )
                else:
                    chosen = [np.arange(len(f)) for f in features]
                for c, f, rows in zip(group, features, chosen):
                    np.take(f, rows, axis=0, out=bank[filled : filled + len(rows)])
                    ends = np.cumsum(patch_counts[chunks[c]])
                    bank_images[filled : filled + len(rows)] = chunks[c][
                        np.searchsorted(ends, rows, side="right")
                    ]
                    filled += len(rows)
                    bar.update(len(rows))
        kept = FeatureBatch(kept.rows, tuple(kept.grid_shapes), tuple(kept.geometries))
        return bank, bank_images, kept

    def _extract(self, sources, images, patch_counts, bar, kept):
        """Full patch features of ``images`` as rows, image after image.

        The features of the images that ``kept`` has a slot for are also
        copied there.
        """
        n_features = self.features.feature_dim
        features = np.empty(
            (int(patch_counts[images].sum()), n_features), dtype=np.float32
        )
        row = 0
        batches = self.features.batches([sources[i] for i in images], self.batch_size)
        images = iter(images)
        for batch in batches:
            for i in range(len(batch)):
                rows = batch.rows[batch.starts[i] : batch.starts[i] + batch.counts[i]]
                slot = kept.slots.get(int(next(images)))
                if slot is not None:
                    start = kept.starts[slot]
                    kept.rows[start : start + len(rows)] = rows
                    kept.grid_shapes[slot] = batch.grid_shapes[i]
                    kept.geometries[slot] = batch.geometries[i]
                features[row : row + len(rows)] = rows
                row += len(rows)
            bar.update(len(batch))
        return features
