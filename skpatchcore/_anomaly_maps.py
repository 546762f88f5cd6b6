"""Anomaly maps: patch scores on the feature grid to pixels of each original image."""

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from ._images import image_size_pair


def model_input_maps(patch_scores, input_shape, sigma):
    """Upsample patch-score grids to the model input and smooth them.

    Parameters
    ----------
    patch_scores : ndarray of shape (n_images, grid_height, grid_width)
        Nearest-neighbour distance of each patch.

    input_shape : int or tuple of int
        ``(height, width)`` of the model input, or the side of a square one.

    sigma : float
        Standard deviation, in model-input pixels, of the Gaussian smoothing
        (truncated at 4 sigma, mirrored at the borders); 0 disables it.

    Returns
    -------
    maps : ndarray of shape (n_images, height, width)
        Float32 maps; higher is more anomalous.
    """
    grid = torch.from_numpy(np.ascontiguousarray(patch_scores, dtype=np.float32))
    upsampled = F.interpolate(
        grid[:, None],
        size=image_size_pair(input_shape),
        mode="bilinear",
        align_corners=False,
    )[:, 0].numpy()
    if sigma > 0:
        upsampled = np.stack(
            [
                gaussian_filter(m, sigma=sigma, mode="reflect", truncate=4.0)
                for m in upsampled
            ]
        )
    return upsampled


def to_original_geometry(input_map, geometry):
    """Place a model-input map back onto its original image.

    The crop window is set back at its place in the resized image, the band
    outside the crop (never seen by the backbone) takes the value of the
    nearest scored pixel, and the result is resized bilinearly to the
    original height and width, the inverse of the input resize.

    Parameters
    ----------
    input_map : ndarray of shape (crop_height, crop_width)
        Map on the model input.

    geometry : Geometry
        How that input was cut from the original image.

    Returns
    -------
    map : ndarray of shape (height, width)
        Float32 map aligned with the original image.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(input_map, dtype=np.float32))[
        None, None
    ]
    pad = (
        geometry.left,
        geometry.resized_width - geometry.left - geometry.crop_width,
        geometry.top,
        geometry.resized_height - geometry.top - geometry.crop_height,
    )
    if any(pad):
        tensor = F.pad(tensor, pad, mode="replicate")
    if (geometry.resized_height, geometry.resized_width) != (
        geometry.height,
        geometry.width,
    ):
        tensor = F.interpolate(
            tensor,
            size=(geometry.height, geometry.width),
            mode="bilinear",
            align_corners=False,
        )
    return tensor[0, 0].numpy()
