"""Figures of anomaly maps and of the hardest images of a test set.

matplotlib is an optional dependency, imported only when a function is
called: ``pip install "skpatchcore[plot]"``.
"""

import os
from numbers import Integral, Real

import numpy as np
from sklearn.utils._param_validation import Interval, validate_params

from .datasets import _read_image, load_mask
from .metrics import _check_image_labels

__all__ = ["plot_anomaly_map", "plot_extremes"]

_MASK_STYLE = {"colors": "lime", "linestyles": "solid"}
_PRED_MASK_STYLE = {"colors": "white", "linestyles": "dashed"}


def _import_pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(
            'Plotting needs matplotlib: pip install "skpatchcore[plot]"'
        ) from exc
    return plt


def _as_image(image):
    if isinstance(image, (str, os.PathLike)):
        return _read_image(image)
    image = np.asarray(image)
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4)):
        return image
    raise ValueError(
        "image must have shape (height, width), (height, width, 3) or "
        f"(height, width, 4); got shape {image.shape}."
    )


@validate_params(
    {
        "image": [str, os.PathLike, "array-like"],
        "anomaly_map": ["array-like"],
        "mask": [str, os.PathLike, "array-like", None],
        "pred_mask": ["array-like", None],
        "ax": "no_validation",
        "alpha": [Interval(Real, 0, 1, closed="both")],
        "cmap": "no_validation",
        "vmin": [Real, None],
        "vmax": [Real, None],
    },
    prefer_skip_nested_validation=True,
)
def plot_anomaly_map(
    image,
    anomaly_map,
    *,
    mask=None,
    pred_mask=None,
    ax=None,
    alpha=0.5,
    cmap="jet",
    vmin=None,
    vmax=None,
):
    """Draw an image with its anomaly map overlaid and mask outlines.

    The ground-truth mask is outlined by a solid lime line and the predicted
    mask by a dashed white line.

    Parameters
    ----------
    image : str, path-like or array-like of shape (height, width) or \
            (height, width, 3)
        The image, or the path of an image file. Grayscale images are shown
        in gray; RGBA images are accepted as well.

    anomaly_map : array-like of shape (height, width)
        Per-pixel anomaly scores, higher for more anomalous pixels, such as
        one element of :meth:`PatchCoreDetector.anomaly_maps`.

    mask : str, path-like or array-like of shape (height, width), default=None
        Ground truth, True or non-zero on defective pixels, or the path of a
        mask image. None draws no ground-truth outline.

    pred_mask : array-like of shape (height, width), default=None
        Predicted defective pixels, for example ``anomaly_map > threshold``.
        None draws no predicted outline.

    ax : matplotlib Axes, default=None
        Axes to draw on. None creates a new figure.

    alpha : float, default=0.5
        Opacity of the anomaly map over the image.

    cmap : str or matplotlib Colormap, default="jet"
        Colormap of the anomaly map.

    vmin : float, default=None
        Anomaly score mapped to the low end of the colormap. None uses the
        map's minimum. Give `vmin` and `vmax` to show several maps on one
        scale.

    vmax : float, default=None
        Anomaly score mapped to the high end of the colormap. None uses the
        map's maximum.

    Returns
    -------
    ax : matplotlib Axes
        The axes drawn on. ``ax.images[-1]`` is the anomaly map, for a
        colorbar.

    Raises
    ------
    ValueError
        If the image is not 2-D grayscale or colour, or if the anomaly map or
        a mask does not have the image's height and width.

    See Also
    --------
    plot_extremes : A grid of the hardest good and defective images.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import numpy as np
    >>> from skpatchcore.plotting import plot_anomaly_map
    >>> image = np.zeros((32, 32), dtype=np.uint8)
    >>> anomaly_map = np.zeros((32, 32))
    >>> anomaly_map[8:16, 8:16] = 1.0
    >>> ax = plot_anomaly_map(image, anomaly_map, mask=anomaly_map > 0.5)
    """
    plt = _import_pyplot()
    image = _as_image(image)
    shape = image.shape[:2]
    anomaly_map = np.asarray(anomaly_map, dtype=np.float64)
    if anomaly_map.shape != shape:
        raise ValueError(
            f"anomaly_map has shape {anomaly_map.shape} but the image has "
            f"height and width {shape}."
        )
    outlines = []
    for name, outline, style in (
        ("mask", mask, _MASK_STYLE),
        ("pred_mask", pred_mask, _PRED_MASK_STYLE),
    ):
        if outline is not None:
            try:
                outlines.append((load_mask(outline, shape), style))
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from exc

    if ax is None:
        _, ax = plt.subplots()
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
    ax.imshow(anomaly_map, cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax)
    for outline, style in outlines:
        ax.contour(outline.astype(float), levels=[0.5], linewidths=1.5, **style)
    ax.set_axis_off()
    return ax


@validate_params(
    {
        "images": ["array-like"],
        "y_true": ["array-like"],
        "scores": ["array-like"],
        "anomaly_maps": ["array-like"],
        "masks": ["array-like", None],
        "n": [Interval(Integral, 1, None, closed="left")],
        "figsize": [tuple, None],
    },
    prefer_skip_nested_validation=True,
)
def plot_extremes(
    images, y_true, scores, anomaly_maps, *, masks=None, n=4, figsize=None
):
    """Show the good images that look most defective and the reverse.

    The top row holds the `n` good images with the lowest scores, the
    likeliest false alarms; the bottom row the `n` defective images with the
    highest scores, the likeliest misses. Each shows its anomaly map, all on
    one colour scale, and its ground-truth outline when `masks` is given.

    Parameters
    ----------
    images : sequence of length n_images
        Images as arrays or file paths, as :mod:`skpatchcore.datasets`
        returns them. Only the images shown are read.

    y_true : array-like of shape (n_images,)
        +1 for good images, -1 for defective ones. Both must occur.

    scores : array-like of shape (n_images,)
        Image scores, higher for more normal images, such as
        :meth:`PatchCoreDetector.decision_function`.

    anomaly_maps : sequence of length n_images
        Per-pixel anomaly scores of each image at its own size, such as
        :meth:`PatchCoreDetector.anomaly_maps`.

    masks : sequence of length n_images, default=None
        Ground truth of each image: a boolean array, the path of a mask
        image, or None for no outline. None draws no outlines.

    n : int, default=4
        Number of images per row. A row with fewer images leaves its last
        axes empty.

    figsize : tuple of (float, float), default=None
        Figure size in inches. None gives 2.5 inches per column.

    Returns
    -------
    fig : matplotlib Figure
        The figure, with ``2 * n`` axes.

    Raises
    ------
    ValueError
        If the inputs differ in length, or `y_true` is not made of +1 and -1.

    See Also
    --------
    plot_anomaly_map : Draw one image.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import numpy as np
    >>> from skpatchcore.plotting import plot_extremes
    >>> rng = np.random.RandomState(0)
    >>> images = list(rng.randint(0, 255, size=(6, 16, 16), dtype=np.uint8))
    >>> maps = list(rng.rand(6, 16, 16))
    >>> fig = plot_extremes(images, [1, 1, 1, -1, -1, -1],
    ...                     [0.5, 0.1, 0.3, -0.2, 0.2, -0.5], maps, n=2)
    >>> len(fig.axes)
    4
    """
    plt = _import_pyplot()
    y_true, scores = _check_image_labels(y_true, scores)
    lengths = {"images": len(images), "anomaly_maps": len(anomaly_maps)}
    if masks is not None:
        lengths["masks"] = len(masks)
    for name, length in lengths.items():
        if length != y_true.size:
            raise ValueError(
                f"{name} has {length} elements but y_true has {y_true.size}."
            )

    good = np.flatnonzero(y_true == 1)
    defective = np.flatnonzero(y_true == -1)
    rows = [
        ("good", good[np.argsort(scores[good], kind="stable")][:n]),
        ("defective", defective[np.argsort(-scores[defective], kind="stable")][:n]),
    ]
    shown = np.concatenate([indices for _, indices in rows])
    shown_maps = {i: np.asarray(anomaly_maps[i], dtype=np.float64) for i in shown}
    vmin = min(anomaly_map.min() for anomaly_map in shown_maps.values())
    vmax = max(anomaly_map.max() for anomaly_map in shown_maps.values())

    fig, axes = plt.subplots(
        2, n, figsize=(2.5 * n, 5.6) if figsize is None else figsize, squeeze=False
    )
    for row, (label, indices) in enumerate(rows):
        for column, ax in enumerate(axes[row]):
            if column >= indices.size:
                ax.set_axis_off()
                continue
            i = indices[column]
            plot_anomaly_map(
                images[i],
                shown_maps[i],
                mask=None if masks is None else masks[i],
                ax=ax,
                vmin=vmin,
                vmax=vmax,
            )
            ax.set_title(f"{label} #{i}\nscore {scores[i]:.3g}", fontsize="small")
    fig.suptitle(
        "Lowest-scored good images (top), highest-scored defective images (bottom)"
    )
    return fig
