"""Vision transformer tokens as feature maps on their patch grid.

A vision transformer's blocks return sequences of tokens ``(N, L, C)``: a
few prefix tokens (class, register and distillation tokens) and one token
per input patch, row by row. :class:`TokenGrid` keeps the patch tokens and
lays them out as a map ``(N, C, H / p, W / p)`` on the grid of ``p x p``
patches, so that the paper's aggregation treats them as it treats the
maps of a convolutional network. Both the extractor's network
(:class:`~skpatchcore._features.taps.LayerTaps`) and the export graph
(:class:`~skpatchcore._engine.dense.ScoringGraph`) convert through it.
"""

import math

import torch.nn.functional as F
from torch import nn


def _pair(value):
    """``(height, width)`` from an int or a pair."""
    if isinstance(value, int):
        return value, value
    height, width = value
    return int(height), int(width)


def _nearest_multiple(length, multiple):
    """The positive multiple of ``multiple`` nearest to ``length``."""
    return max(1, math.floor(length / multiple + 0.5)) * multiple


class TokenGrid(nn.Module):
    """Converts a vision transformer's token sequences to patch-grid maps.

    Parameters
    ----------
    patch_size : int or tuple of int
        Side of the transformer's square patches, or their ``(height,
        width)``, in input pixels: the stride of its patch grid.
    n_prefix_tokens : int
        Tokens before the patch tokens in each sequence.
    """

    def __init__(self, patch_size, n_prefix_tokens):
        super().__init__()
        self.patch_size = _pair(patch_size)
        self.n_prefix_tokens = int(n_prefix_tokens)

    @property
    def input_multiple(self):
        """Length that every side of an input is a multiple of, once fitted."""
        return math.lcm(*self.patch_size)

    def fit_input(self, images):
        """Resize ``images`` so that each side is a multiple of the patch size.

        The patch embedding of a transformer drops the pixels of a partial
        last patch, which would shift the grid against the input, and the
        anomaly maps against the image. Each side is resized instead to its
        nearest multiple (a 224-pixel side stays 224 for 14- and 16-pixel
        patches), so that the grid covers the whole input evenly.

        Parameters
        ----------
        images : torch.Tensor of shape (n_images, channels, height, width)
            Input of the transformer.

        Returns
        -------
        torch.Tensor
            ``images``, or its bilinear resize to the nearest multiples.
        """
        height, width = (int(side) for side in images.shape[-2:])
        size = tuple(
            _nearest_multiple(side, patch)
            for side, patch in zip((height, width), self.patch_size)
        )
        if size == (height, width):
            return images
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False)

    def grid_shape(self, input_shape):
        """Patch grid ``(rows, columns)`` of an input of :meth:`fit_input`."""
        return tuple(
            int(side) // patch for side, patch in zip(input_shape, self.patch_size)
        )

    def forward(self, tokens, input_shape):
        """The patch tokens of one layer as a map on the patch grid.

        Parameters
        ----------
        tokens : torch.Tensor of shape (n_images, n_tokens, channels)
            A layer's output: the prefix tokens, then one token per patch,
            row by row. A map ``(n_images, rows, columns, channels)``, as
            timm's patch embedding returns with dynamic image sizes, is
            taken too.
        input_shape : tuple of int
            ``(height, width)`` of the input the layer saw, after
            :meth:`fit_input`.

        Returns
        -------
        torch.Tensor of shape (n_images, channels, rows, columns)
            The patch tokens on their grid; the prefix tokens are dropped.

        Raises
        ------
        ValueError
            If ``tokens`` has neither layout for this grid.
        """
        rows, columns = self.grid_shape(input_shape)
        if tokens.ndim == 4 and tuple(tokens.shape[1:3]) == (rows, columns):
            return tokens.permute(0, 3, 1, 2)
        if tokens.ndim != 3 or tokens.shape[1] != self.n_prefix_tokens + rows * columns:
            raise ValueError(
                f"A layer of the vision transformer returns a tensor of shape "
                f"{tuple(tokens.shape)}, where a sequence of "
                f"{self.n_prefix_tokens} prefix tokens and {rows} x {columns} "
                "patch tokens (n_images, n_tokens, channels) was expected: tap "
                "its blocks, such as 'blocks.8', or its final 'norm'."
            )
        patches = tokens[:, self.n_prefix_tokens :]
        return patches.unflatten(1, (rows, columns)).permute(0, 3, 1, 2)


def token_grid_of(module):
    """The :class:`TokenGrid` of a timm-style vision transformer, else None.

    Parameters
    ----------
    module : torch.nn.Module
        A backbone.

    Returns
    -------
    TokenGrid or None
        For a module with an int ``num_prefix_tokens`` and a
        ``patch_embed`` with a ``patch_size``, as timm's
        ``VisionTransformer`` and ``Eva`` (DINOv2, DINOv3, DeiT, EVA-02,
        ...) have; None for any other module, whose layers return maps.
    """
    prefix = getattr(module, "num_prefix_tokens", None)
    patch_size = getattr(getattr(module, "patch_embed", None), "patch_size", None)
    if not isinstance(prefix, int) or isinstance(prefix, bool) or patch_size is None:
        return None
    return TokenGrid(patch_size, prefix)
