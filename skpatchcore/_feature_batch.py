"""The one type in which patch features travel through the engine."""

import functools
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FeatureBatch:
    """Patch features of several images, as one flat array of rows.

    Square inputs and ``resize="keep_aspect"`` inputs (a grid of its own
    shape per image) take the same path: every stage reads the rows of an
    image through its grid shape and offset, never through an array axis.

    Parameters
    ----------
    rows : ndarray of shape (n_patches, n_features)
        Float32 patch features of all images, image after image, each
        image's grid row-major.

    grid_shapes : tuple of (int, int)
        ``(grid_height, grid_width)`` of each image.

    geometries : tuple of Geometry
        Where each image's model input sits in the image, to map its anomaly
        map back onto it.
    """

    rows: np.ndarray
    grid_shapes: tuple
    geometries: tuple

    def __post_init__(self):
        if len(self.grid_shapes) != len(self.geometries):
            raise ValueError("one grid shape and one geometry per image are needed")
        if int(self.counts.sum()) != len(self.rows):
            raise ValueError(
                f"the grids hold {int(self.counts.sum())} patches, the rows "
                f"{len(self.rows)}"
            )

    def __len__(self):
        return len(self.grid_shapes)

    # Derived from the grids once: the stages read them per image.
    @functools.cached_property
    def counts(self):
        """Patches of each image."""
        return np.array([math.prod(s) for s in self.grid_shapes], dtype=np.int64)

    @functools.cached_property
    def starts(self):
        """Row of each image's first patch."""
        counts = self.counts
        return np.cumsum(counts) - counts

    def per_image(self, values):
        """``values`` of one entry per row, cut into one grid per image."""
        pieces = np.split(np.asarray(values), self.starts[1:])
        return [
            piece.reshape(*shape, *piece.shape[1:])
            for piece, shape in zip(pieces, self.grid_shapes)
        ]

    def grids(self):
        """Each image's features as a ``(grid_height, grid_width, n_features)`` view."""
        return self.per_image(self.rows)

    def select(self, images):
        """The batch of ``images`` (positions in this batch), in their order."""
        images = np.asarray(images, dtype=np.int64)
        starts, counts = self.starts, self.counts
        rows = [self.rows[starts[i] : starts[i] + counts[i]] for i in images]
        return FeatureBatch(
            np.concatenate(rows) if len(rows) else self.rows[:0],
            tuple(self.grid_shapes[i] for i in images),
            tuple(self.geometries[i] for i in images),
        )
