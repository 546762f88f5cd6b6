"""Locally aware patch features from layer maps (paper §3.1, eq. 1-3)."""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def adaptive_pool_matrix(n_in, n_out):
    """Matrix of 1-D adaptive average pooling from ``n_in`` to ``n_out`` values.

    Row ``i`` averages inputs ``floor(i n_in / n_out)`` to
    ``ceil((i + 1) n_in / n_out) - 1``, which is what
    ``torch.nn.functional.adaptive_avg_pool1d`` computes; as a matrix it can be
    folded with the other linear steps into a single channel projection.
    """
    matrix = np.zeros((n_out, n_in), dtype=np.float64)
    for i in range(n_out):
        start = (i * n_in) // n_out
        stop = -((-(i + 1) * n_in) // n_out)
        matrix[i, start:stop] = 1.0 / (stop - start)
    return matrix


def channel_projection(layer_channels, feature_dim):
    """The linear map from the layers' stacked channels to patch features.

    When the layers have at most ``feature_dim`` channels in all, they are
    kept as they are (None: no projection), since pooling could only repeat
    them. Otherwise each layer is adaptively average-pooled over its channels
    to ``feature_dim`` values, the layers are concatenated, and the
    concatenation is pooled to ``feature_dim`` again; all three steps are
    linear, so they fold into one ``(feature_dim, sum(layer_channels))``
    matrix.
    """
    if sum(layer_channels) <= feature_dim:
        return None
    per_layer = [adaptive_pool_matrix(c, feature_dim) for c in layer_channels]
    merge = adaptive_pool_matrix(feature_dim * len(layer_channels), feature_dim)
    blocks = [
        merge[:, i * feature_dim : (i + 1) * feature_dim] @ pool
        for i, pool in enumerate(per_layer)
    ]
    return np.concatenate(blocks, axis=1).astype(np.float32)


class PatchAggregator(nn.Module):
    """Layer maps to one map of patch features.

    Each layer's map is averaged over every ``patch_size x patch_size``
    neighbourhood at ``patch_stride``, the deeper maps are upsampled
    bilinearly onto the first layer's grid, and the stacked channels are
    merged by :func:`channel_projection`. The detector's features and the
    exported graph both go through this module.

    Parameters
    ----------
    layer_channels : tuple of int
        Channels of each tapped layer, shallowest first.

    feature_dim : int
        Largest length of a patch feature.

    patch_size, patch_stride : int
        Side and stride of the neighbourhood average.
    """

    def __init__(self, layer_channels, feature_dim, patch_size, patch_stride):
        super().__init__()
        self.patch_size = int(patch_size)
        self.patch_stride = int(patch_stride)
        projection = channel_projection(layer_channels, feature_dim)
        if projection is not None:
            projection = torch.from_numpy(projection)
        self.register_buffer("projection", projection)
        self.feature_dim = (
            sum(layer_channels) if projection is None else int(projection.shape[0])
        )

    def pool(self, feature_map):
        """Neighbourhood averaging of one layer's map, at ``patch_stride``."""
        # Zero padding counted in the mean, as in the paper's reference
        # code: it shrinks the one-patch frame, where the backbone's own
        # padding makes features least reliable, and so damps its scores
        # (docs/results.rst, "A fix found by this table").
        return F.avg_pool2d(
            feature_map,
            kernel_size=self.patch_size,
            stride=self.patch_stride,
            padding=self.patch_size // 2,
            count_include_pad=True,
        )

    def forward(self, maps, grid_shape=None):
        """Patch features ``(n_images, n_features, grid_height, grid_width)``.

        ``grid_shape`` fixes the grid the deeper maps are aligned on, for a
        traced graph; None takes the first layer's pooled grid, which it is.
        """
        aggregated = [self.pool(feature_map) for feature_map in maps]
        grid = aggregated[0].shape[2:] if grid_shape is None else grid_shape
        aligned = [aggregated[0]] + [
            F.interpolate(m, size=grid, mode="bilinear", align_corners=False)
            for m in aggregated[1:]
        ]
        stacked = torch.cat(aligned, dim=1)
        if self.projection is None:
            return stacked
        return torch.einsum("dc,nchw->ndhw", self.projection, stacked)
