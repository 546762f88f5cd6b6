"""Anomaly maps: patch scores on the feature grid to pixels of each original image."""

import functools

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter1d

from .._images import image_size_pair


@functools.lru_cache(maxsize=32)
def axis_operator(grid_length, input_length, sigma):
    """Upsampling then smoothing along one axis, as one matrix.

    Bilinear upsampling and the Gaussian filter both act on each axis
    separately and linearly, so on one axis they are together a matrix from
    grid positions to input pixels, and a whole map is ``rows @ grid @
    columns.T``. Its columns are the upsampled and smoothed unit vectors,
    computed by ``torch.nn.functional.interpolate`` and
    ``scipy.ndimage.gaussian_filter1d`` themselves, so borders and kernels
    are theirs by construction, and two small products replace an upsample
    and a filter per map (docs/results.rst, "Prediction stages": maps).

    Parameters
    ----------
    grid_length : int
        Patch-score grid positions along the axis.

    input_length : int
        Model-input pixels along the axis.

    sigma : float
        Standard deviation of the Gaussian in pixels; 0 for none.

    Returns
    -------
    operator : torch.Tensor of shape (input_length, grid_length)
        Float32, computed in float64.
    """
    unit_vectors = torch.eye(grid_length, dtype=torch.float64)[None]
    operator = F.interpolate(
        unit_vectors, size=input_length, mode="linear", align_corners=False
    )[0].T.numpy()
    if sigma > 0:
        operator = gaussian_filter1d(
            operator, sigma=sigma, axis=0, mode="reflect", truncate=4.0
        )
    return torch.from_numpy(np.ascontiguousarray(operator, dtype=np.float32))


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
    grids = torch.from_numpy(np.ascontiguousarray(patch_scores, dtype=np.float32))
    height, width = image_size_pair(input_shape)
    rows = axis_operator(grids.shape[1], height, float(sigma))
    columns = axis_operator(grids.shape[2], width, float(sigma))
    return torch.matmul(torch.matmul(rows, grids), columns.T).numpy()


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


def input_maps(distances, batch, sigma):
    """Anomaly maps on the model inputs of a batch's images.

    Parameters
    ----------
    distances : ndarray of shape (n_patches,)
        Patch distances in the batch's row order.

    batch : FeatureBatch
        Gives each image's grid and model-input shape.

    sigma : float
        As in :func:`model_input_maps`.

    Returns
    -------
    maps : list of ndarray of shape (crop_height, crop_width)
        Float32, one per image.
    """
    grids = batch.per_image(distances)
    maps = [None] * len(batch)
    by_shape = {}
    for i, (grid, geometry) in enumerate(zip(grids, batch.geometries)):
        key = (grid.shape, geometry.crop_height, geometry.crop_width)
        by_shape.setdefault(key, []).append(i)
    # Images of one shape share the operators: one product for all of them.
    for (_, height, width), images in by_shape.items():
        shaped = model_input_maps(
            np.stack([grids[i] for i in images]), (height, width), sigma
        )
        for i, image_map in zip(images, shaped):
            maps[i] = image_map
    return maps


def image_maps(distances, batch, sigma):
    """Anomaly maps of a batch's images, each at its own resolution."""
    return [
        to_original_geometry(m, g)
        for m, g in zip(input_maps(distances, batch, sigma), batch.geometries)
    ]
