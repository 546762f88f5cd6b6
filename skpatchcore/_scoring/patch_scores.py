"""Scores of a batch of patch features against a memory bank (paper §3.3)."""

import numpy as np
import torch

from .distances import from_euclidean, top_mean
from .reweighting import reweighted_scores, support_rows


def score_batch(
    batch,
    search,
    n_reweight_neighbors,
    exclude=None,
    *,
    distance="euclidean",
    image_score="reweighted",
):
    """Image scores and patch distances of a :class:`FeatureBatch`.

    Parameters
    ----------
    batch : FeatureBatch
        Patch features of the images, square or of their own shapes alike.

    search : MemoryBank
        The bank and its search.

    n_reweight_neighbors : int
        ``b`` of eq. 7.

    exclude : tuple of (ndarray, ndarray), default=None
        ``(images, bank_images)`` when the batch holds training images, each
        to be scored without the bank entries taken from it: ``images[i]``
        is the training image of the batch's ``i``-th image, and
        ``bank_images`` the training image of each bank entry.

    distance : {"euclidean", "cosine"}, default="euclidean"
        What the patch distances measure (:mod:`.distances`); the features
        and the bank must be unit vectors for "cosine".

    image_score : {"reweighted", "max"} or float, default="reweighted"
        Eq. 7, the largest patch distance, or the mean of the largest
        fraction of them.

    Returns
    -------
    scores : ndarray of shape (n_images,)
        Anomaly scores, float64, higher is more anomalous; infinite where no
        bank entry was left to compare with.

    distances : ndarray of shape (n_patches,)
        Float32 distance of each patch to its nearest bank entry, in the
        batch's row order (``batch.per_image`` cuts them into grids).
    """
    patch_groups = support_groups = None
    if exclude is not None:
        images, bank_images = exclude
        patch_groups = (np.repeat(images, batch.counts), bank_images)
        support_groups = (images, bank_images)
    distances, nearest = search.kneighbors(batch.rows, 1, patch_groups)
    distances = from_euclidean(distances[:, 0], distance)
    per_image = np.split(distances, batch.starts[1:])
    # Without any bank entry left to compare with, a distance is infinite.
    unreachable = np.array([np.isinf(d).any() for d in per_image], dtype=bool)
    if image_score != "reweighted":
        fraction = 0.0 if image_score == "max" else image_score
        scores = np.array(
            [
                float(top_mean(torch.from_numpy(d)[None].double(), fraction)[0])
                for d in per_image
            ]
        )
        scores[unreachable] = np.inf
        return scores, distances
    worst = batch.starts + np.array([np.argmax(d) for d in per_image], dtype=np.int64)
    centers = nearest[worst, 0]
    n_support = min(n_reweight_neighbors, len(search))
    if n_support == 1:
        support = centers[:, None]
    else:
        neighbour_distances, neighbours = search.kneighbors(
            search.features[centers], n_support, support_groups
        )
        support = support_rows(
            torch.from_numpy(centers),
            torch.from_numpy(neighbours),
            torch.from_numpy(neighbour_distances),
            n_support,
        ).numpy()
    support_distances = search.exact_distances(batch.rows[worst], support)
    support_distances = from_euclidean(support_distances, distance)
    scores = reweighted_scores(torch.from_numpy(support_distances), n_support).numpy()
    scores[unreachable] = np.inf
    return scores, distances
