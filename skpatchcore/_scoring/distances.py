"""Patch distances: Euclidean (the paper) or cosine (AnomalyDINO), and image pooling.

The search always measures Euclidean distances. For the cosine distance the
features are scaled to unit length first, so that the coreset, the search
and the maps all see unit vectors, on which ``1 - cos(a, b) = |a - b|^2 / 2``:
the same neighbours, and the distance a cosine search would report.
"""

import math

import torch
import torch.nn.functional as F

from .._feature_batch import FeatureBatch

# Below this length a feature is left as it is rather than blown up.
_EPSILON = 1e-12


def unit_length(features, dim):
    """``features`` scaled to unit length along ``dim`` (all-zero ones stay zero).

    The detector's features and the exported graph's go through here alike.
    """
    return F.normalize(features, dim=dim, eps=_EPSILON)


def from_euclidean(distances, distance):
    """Euclidean distances between (unit, for cosine) features in ``distance``."""
    if distance == "cosine":
        return distances * distances / 2
    return distances


def top_mean(distances, fraction, n_patches=None):
    """Mean of the largest ``fraction`` of each row's patch distances.

    Parameters
    ----------
    distances : torch.Tensor of shape (n_images, n_patches)
        Patch distances of images with equal numbers of patches.

    fraction : float
        In (0, 1]; at least one patch is taken.

    n_patches : int, default=None
        The rows' length when known beforehand, as in a traced graph, which
        would otherwise record a tensor's shape as a constant with a warning.

    Returns
    -------
    scores : torch.Tensor of shape (n_images,)
    """
    n_patches = distances.shape[1] if n_patches is None else n_patches
    k = max(1, math.ceil(fraction * n_patches))
    return torch.topk(distances, k, dim=1).values.mean(dim=1)


class UnitFeatures:
    """A feature stage whose patch features come out with unit length.

    Wraps a :class:`PatchFeatures`; everything but :meth:`batches` is the
    wrapped stage's.
    """

    def __init__(self, features):
        self.features = features

    def __getattr__(self, name):
        return getattr(self.features, name)

    def to(self, device):
        self.features.to(device)
        return self

    def batches(self, sources, batch_size):
        for batch in self.features.batches(sources, batch_size):
            yield FeatureBatch(
                unit_length(torch.from_numpy(batch.rows), 1).numpy(),
                batch.grid_shapes,
                batch.geometries,
            )
