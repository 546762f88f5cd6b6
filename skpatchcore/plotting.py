"""Figures of anomaly maps, of the hardest images of a test set, and of
the false-alarm rates of p-values.

matplotlib is an optional dependency, imported only when a function is
called: ``pip install "skpatchcore[plot]"``.
"""

import os
from numbers import Integral, Real

import numpy as np
from sklearn.utils._param_validation import Interval, StrOptions, validate_params
from sklearn.utils.validation import check_is_fitted

from ._conformal import pvalues as conformal_pvalues
from ._detector import PatchCoreDetector
from ._images import input_geometry
from ._reliability_plot import plot_reliability
from .datasets import _read_image, load_mask
from .metrics import _check_image_labels

__all__ = ["plot_anomaly_map", "plot_extremes", "plot_reliability"]

_MASK_STYLE = {"colors": "lime", "linestyles": "solid"}
_PRED_MASK_STYLE = {"colors": "white", "linestyles": "dashed"}
# The border band outside the model's centre crop: grey, hatched.
_UNSEEN_STYLE = {"facecolor": (0.5, 0.5, 0.5, 0.75), "edgecolor": "white"}
_UNSEEN_HATCH = "///"
_UNSEEN_LABEL = "outside the crop: not seen"
# With a threshold, map values below it fade from transparent to this pale
# blue, and values above it take the hot colormap.
_CALM_RGB = (0.55, 0.75, 1.0)
_CALM_MAX_ALPHA = 0.4
_COLORBAR_LABEL = "anomaly score"


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


def _fitted_settings(detector, threshold, image_threshold=None):
    """The pixel and image thresholds and the detector's ``(image_size, resize)``.

    Both thresholds are anomaly scores, higher for more anomalous: the image
    one defaults to ``-offset_``, which ``score_samples`` is compared with.
    """
    if detector is None:
        return threshold, image_threshold, None
    check_is_fitted(detector)
    detector._check_unchanged_since_fit("plot")
    if threshold is None:
        threshold = detector.pixel_threshold_
    if image_threshold is None:
        image_threshold = -float(detector.offset_)
    return threshold, image_threshold, (detector.image_size, detector.resize)


def _unseen_band(shape, input_size):
    """The pixels outside the model's crop window, and that window.

    Returns ``(unseen, window)``: a boolean mask of the image's pixels whose
    centre lies outside the window, and the window's ``(top, bottom, left,
    right)`` edges in pixels of the image; ``(None, None)`` if the model saw
    the whole image or no geometry is known.
    """
    if input_size is None:
        return None, None
    height, width = shape
    geometry = input_geometry(height, width, *input_size)
    top = geometry.top * height / geometry.resized_height
    bottom = (geometry.top + geometry.crop_height) * height / geometry.resized_height
    left = geometry.left * width / geometry.resized_width
    right = (geometry.left + geometry.crop_width) * width / geometry.resized_width
    rows = np.arange(height) + 0.5
    columns = np.arange(width) + 0.5
    seen = ((rows >= top) & (rows <= bottom))[:, None] & (
        (columns >= left) & (columns <= right)
    )[None, :]
    if seen.all():
        return None, None
    return ~seen, (top, bottom, left, right)


def _color_range(maps, unseen_bands, threshold, vmin, vmax):
    """``vmin``, ``vmax``: the given ones, or the range of the seen map values.

    A computed bound is widened to include the threshold, so that the colour
    scale always shows where the threshold lies.
    """
    values = [
        anomaly_map if unseen is None else anomaly_map[~unseen]
        for anomaly_map, unseen in zip(maps, unseen_bands)
    ]
    values = [value for value in values if value.size]
    low = [float(value.min()) for value in values]
    high = [float(value.max()) for value in values]
    if threshold is not None:
        low.append(float(threshold))
        high.append(float(threshold))
    if vmin is None:
        vmin = min(low, default=0.0)
    if vmax is None:
        vmax = max(high, default=1.0)
    return vmin, vmax


def _colormap(cmap, threshold, vmin, vmax):
    """``cmap``, or with a threshold a calm part below it and a hot part above."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    if threshold is None:
        return colormaps.get_cmap("jet" if cmap is None else cmap)
    n_colors = 512
    fraction = (threshold - vmin) / (vmax - vmin) if vmax > vmin else 0.5
    n_calm = int(round(np.clip(fraction, 0.0, 1.0) * n_colors))
    calm = np.empty((n_calm, 4))
    calm[:, :3] = _CALM_RGB
    calm[:, 3] = np.linspace(0.0, _CALM_MAX_ALPHA, n_calm)
    if cmap is None:
        hot = colormaps["YlOrRd"](np.linspace(0.3, 1.0, n_colors - n_calm))
    else:
        hot = colormaps.get_cmap(cmap)(np.linspace(0.0, 1.0, n_colors - n_calm))
    return ListedColormap(np.vstack([calm, hot]), name="below_threshold_calm")


def _draw_unseen_band(ax, shape, window):
    from matplotlib.patches import PathPatch
    from matplotlib.path import Path

    height, width = shape
    # imshow puts pixel centres on integers: edges are half a pixel off.
    top, bottom, left, right = (edge - 0.5 for edge in window)
    outer = [(-0.5, -0.5), (width - 0.5, -0.5), (width - 0.5, height - 0.5)]
    outer += [(-0.5, height - 0.5), (-0.5, -0.5)]
    # The window, the other way round, is the hole.
    hole = [(left, top), (left, bottom), (right, bottom), (right, top), (left, top)]
    codes = [Path.MOVETO] + [Path.LINETO] * 3 + [Path.CLOSEPOLY]
    ax.add_patch(
        PathPatch(
            Path(outer + hole, codes * 2),
            hatch=_UNSEEN_HATCH,
            linewidth=0,
            label=_UNSEEN_LABEL,
            **_UNSEEN_STYLE,
        )
    )


def _legend_handles(ground_truth, predicted, unseen):
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = []
    for shown, style, label in (
        (ground_truth, _MASK_STYLE, "ground truth"),
        (predicted, _PRED_MASK_STYLE, "predicted mask"),
    ):
        if shown:
            handles.append(
                Line2D(
                    [],
                    [],
                    color=style["colors"],
                    linestyle=style["linestyles"],
                    linewidth=1.5,
                    label=label,
                )
            )
    if unseen:
        handles.append(Patch(hatch=_UNSEEN_HATCH, label=_UNSEEN_LABEL, **_UNSEEN_STYLE))
    return handles


def _add_legend(ax, handles):
    # Below the axes, on a dark box where the white outline shows.
    return ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(0.0, -0.02),
        fontsize="small",
        facecolor="0.3",
        edgecolor="none",
        framealpha=1.0,
        labelcolor="white",
    )


def _add_colorbar(figure, mappable, ax, threshold):
    colorbar = figure.colorbar(mappable, ax=ax, label=_COLORBAR_LABEL)
    if threshold is not None:
        colorbar.ax.axhline(threshold, color="black", linewidth=2)
        colorbar.set_label(
            f"{_COLORBAR_LABEL} (black line: pixel threshold {threshold:.3g})"
        )
    return colorbar


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
        "threshold": [Real, None],
        "detector": [PatchCoreDetector, None],
        "colorbar": ["boolean", None],
        "legend": ["boolean", None],
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
    cmap=None,
    vmin=None,
    vmax=None,
    threshold=None,
    detector=None,
    colorbar=None,
    legend=None,
):
    """Draw an image with its anomaly map overlaid and mask outlines.

    The ground-truth mask is outlined by a solid lime line and the predicted
    mask by a dashed white line. With a `threshold`, map values below it are
    drawn in a pale, translucent blue that fades out towards the lowest
    values, and values above it in hot colours, so that a normal image looks
    calm. With a fitted `detector`, the border band that the model never saw
    (outside its centre crop, where the map is extrapolated) is greyed out
    and hatched instead of showing the map.

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

    cmap : str or matplotlib Colormap, default=None
        Colormap of the anomaly map; with a threshold, the colormap of the
        values above it. None uses ``"jet"``, or ``"YlOrRd"`` above a
        threshold.

    vmin : float, default=None
        Anomaly score mapped to the low end of the colour scale. None uses
        the smallest value of the map outside the unseen band, or the
        threshold if it is smaller. Give `vmin` and `vmax` to show several
        maps on one scale, as :func:`plot_extremes` does.

    vmax : float, default=None
        Anomaly score mapped to the high end of the colour scale. None uses
        the largest value of the map outside the unseen band, or the
        threshold if it is larger.

    threshold : float, default=None
        Anomaly score where the colours turn from calm to hot, such as
        :attr:`PatchCoreDetector.pixel_threshold_`. None takes the
        ``pixel_threshold_`` of `detector`, if given, else draws the whole
        scale with `cmap`.

    detector : PatchCoreDetector, default=None
        The fitted detector that computed the map. Its ``pixel_threshold_``
        is the default `threshold`, and its ``resize`` and ``image_size``
        tell which border band of the image was outside the model's centre
        crop. None assumes the model saw the whole image.

    colorbar : bool, default=None
        Whether to add a colorbar, labelled, with the threshold marked by a
        black line. None adds one only if `ax` is None.

    legend : bool, default=None
        Whether to add a legend of the outlines and of the unseen band below
        the axes, if any of them is drawn. None adds one only if `ax` is
        None.

    Returns
    -------
    ax : matplotlib Axes
        The axes drawn on. ``ax.images[-1]`` is the anomaly map, for a
        colorbar.

    Raises
    ------
    ValueError
        If the image is not 2-D grayscale or colour, if the anomaly map or a
        mask does not have the image's height and width, or if the
        parameters of `detector` changed since it was fitted.

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
    >>> ax = plot_anomaly_map(image, anomaly_map, mask=anomaly_map > 0.5,
    ...                       threshold=0.5)
    >>> ax.images[-1].get_clim()
    (0.0, 1.0)
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
    threshold, _, input_size = _fitted_settings(detector, threshold)
    unseen, window = _unseen_band(shape, input_size)
    vmin, vmax = _color_range([anomaly_map], [unseen], threshold, vmin, vmax)

    created = ax is None
    if created:
        _, ax = plt.subplots(layout="constrained")
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
    ax.imshow(
        anomaly_map if unseen is None else np.ma.masked_array(anomaly_map, unseen),
        cmap=_colormap(cmap, threshold, vmin, vmax),
        alpha=alpha,
        vmin=vmin,
        vmax=vmax,
    )
    for outline, style in outlines:
        ax.contour(outline.astype(float), levels=[0.5], linewidths=1.5, **style)
    if unseen is not None:
        _draw_unseen_band(ax, shape, window)
    ax.set_axis_off()
    if colorbar or (colorbar is None and created):
        _add_colorbar(ax.figure, ax.images[-1], ax, threshold)
    handles = _legend_handles(mask is not None, pred_mask is not None, window)
    if handles and (legend or (legend is None and created)):
        _add_legend(ax, handles)
    return ax


# The rows of plot_extremes: (name in the figure title, label of its images).
_FALSE_ALARMS = ("likeliest false alarms", "good")
_MISSES = ("likeliest misses", "defective")
_CATCHES = ("clearest catches", "defective")


def _pick(indices, anomaly_scores, highest_first, n, exclude=()):
    """The ``n`` of ``indices`` with the highest (or lowest) anomaly scores."""
    indices = np.setdiff1d(indices, np.asarray(exclude, dtype=int))
    keys = -anomaly_scores[indices] if highest_first else anomaly_scores[indices]
    return indices[np.argsort(keys, kind="stable")][:n]


def _panel_title(label, i, anomaly_score, image_threshold, note):
    """Two or three lines: the image and its verdict, its score, the note."""
    first = f"{label} #{i}"
    # "#": trailing zeros kept, so that 34.0 does not read as 34 beside 34.3.
    second = f"anomaly score {anomaly_score:#.3g}"
    if image_threshold is not None:
        flagged = anomaly_score > image_threshold
        first += ": flagged" if flagged else ": not flagged"
        second += f" (threshold {image_threshold:#.3g})"
    lines = [first, second] + ([] if note is None else [str(note)])
    return "\n".join(lines)


def _shows_no_catch(misses, anomaly_scores, image_threshold, maps, bands, threshold):
    """Whether the likeliest misses show nothing that the detector flags.

    With an image threshold, no image of the row is flagged; else, with a
    pixel threshold, no seen pixel of their maps exceeds it.
    """
    if image_threshold is not None:
        return not np.any(anomaly_scores[misses] > image_threshold)
    if threshold is not None:
        return not any(
            np.any((maps[i] if bands[i] is None else maps[i][~bands[i]]) > threshold)
            for i in misses
        )
    return False


@validate_params(
    {
        "images": ["array-like"],
        "y_true": ["array-like"],
        "scores": ["array-like"],
        "anomaly_maps": ["array-like"],
        "masks": ["array-like", None],
        "n": [Interval(Integral, 1, None, closed="left")],
        "figsize": [tuple, None],
        "threshold": [Real, None],
        "detector": [PatchCoreDetector, None],
        "image_threshold": [Real, None],
        "show_catches": ["boolean", StrOptions({"auto"})],
        "notes": ["array-like", None],
    },
    prefer_skip_nested_validation=True,
)
def plot_extremes(
    images,
    y_true,
    scores,
    anomaly_maps,
    *,
    masks=None,
    n=4,
    figsize=None,
    threshold=None,
    detector=None,
    image_threshold=None,
    show_catches="auto",
    notes=None,
):
    """Show the likeliest false alarms and the likeliest misses of a test set.

    The top row holds the `n` good images with the highest anomaly scores,
    the likeliest false alarms; the next row the `n` defective images with
    the lowest anomaly scores, the likeliest misses. A third row, the
    clearest catches, holds the defective images with the highest anomaly
    scores, when `show_catches` asks for it. All values shown are anomaly
    scores, higher for more anomalous images and pixels: an image's is
    ``-scores``, its map's are the map values. Each panel is titled with its
    image's anomaly score and, given an image threshold, whether the image
    is flagged (its anomaly score exceeds the threshold, i.e. ``predict``
    returns -1).

    Each panel shows its anomaly map and its ground-truth outline when
    `masks` is given. All maps share one colour scale, shown by a colorbar
    with the pixel threshold; with that threshold, map values below it look
    calm and values above it hot (see :func:`plot_anomaly_map`). A legend
    names the outlines and the border band that the model never saw.

    Parameters
    ----------
    images : sequence of length n_images
        Images as arrays or file paths, as :mod:`skpatchcore.datasets`
        returns them. Only the images shown are read.

    y_true : array-like of shape (n_images,)
        +1 for good images, -1 for defective ones. Both must occur.

    scores : array-like of shape (n_images,)
        Image scores, higher for more normal images, such as
        :meth:`PatchCoreDetector.score_samples`. The panels show their
        negation, the anomaly score.

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
        Figure size in inches. None gives 2.5 inches per column, and one
        more for the colorbar, and 3.1 inches per row.

    threshold : float, default=None
        Pixel threshold: the anomaly score of a map where the colours turn
        from calm to hot, such as :attr:`PatchCoreDetector.pixel_threshold_`.
        None takes the ``pixel_threshold_`` of `detector`, if given, else
        colours the whole scale alike.

    detector : PatchCoreDetector, default=None
        The fitted detector that computed the scores and maps. Its
        ``pixel_threshold_`` is the default `threshold`, its ``-offset_``
        the default `image_threshold`, and its ``resize`` and ``image_size``
        tell which border band of each image was outside the model's centre
        crop: that band is greyed out and left out of the colour scale.

    image_threshold : float, default=None
        Image threshold: the anomaly score above which an image is flagged.
        None takes ``-detector.offset_``, which matches `scores` from
        ``score_samples`` (pass 0 with scores from ``decision_function``),
        or, without `detector`, shows no verdict.

    show_catches : bool or "auto", default="auto"
        Whether to add the row of clearest catches, so that the figure also
        shows what the detector finds. "auto" adds it when the likeliest
        misses show no catch: none of them is flagged, or without an image
        threshold, none of their maps exceeds the pixel threshold.

    notes : sequence of length n_images, default=None
        One more line under the title of each image shown. None shows each
        image's conformal p-value (as :meth:`PatchCoreDetector.pvalues`
        gives it) when `detector` is given and `image_threshold` is None,
        so that `scores` are ``score_samples``; otherwise no line.

    Returns
    -------
    fig : matplotlib Figure
        The figure, with ``2 * n`` axes of images (``3 * n`` with the
        clearest catches), row by row, followed by the colorbar's.

    Raises
    ------
    ValueError
        If the inputs differ in length, `y_true` is not made of +1 and -1,
        or the parameters of `detector` changed since it was fitted.

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
    ...                     [-0.5, -0.1, -0.3, -0.2, -0.9, -0.7], maps, n=2,
    ...                     threshold=0.8, image_threshold=0.6)
    >>> print(fig.axes[0].get_title())
    good #0: not flagged
    anomaly score 0.500 (threshold 0.600)
    >>> len(fig.axes)
    5
    """
    plt = _import_pyplot()
    y_true, scores = _check_image_labels(y_true, scores)
    lengths = {"images": len(images), "anomaly_maps": len(anomaly_maps)}
    for name, sequence in (("masks", masks), ("notes", notes)):
        if sequence is not None:
            lengths[name] = len(sequence)
    for name, length in lengths.items():
        if length != y_true.size:
            raise ValueError(
                f"{name} has {length} elements but y_true has {y_true.size}."
            )
    # Only on the scale of score_samples, which the calibration scores share.
    show_pvalues = notes is None and image_threshold is None
    threshold, image_threshold, input_size = _fitted_settings(
        detector, threshold, image_threshold
    )
    calibration = getattr(detector, "calibration_scores_", None)
    if show_pvalues and calibration is not None:
        notes = [f"p-value {p:.3g}" for p in conformal_pvalues(calibration, scores)]
    anomaly_scores = -scores
    good = np.flatnonzero(y_true == 1)
    defective = np.flatnonzero(y_true == -1)
    rows = [
        (_FALSE_ALARMS, _pick(good, anomaly_scores, True, n)),
        (_MISSES, _pick(defective, anomaly_scores, False, n)),
    ]
    shown_maps, unseen_bands = {}, {}

    def read_maps(indices):
        for i in indices:
            shown_maps[i] = np.asarray(anomaly_maps[i], dtype=np.float64)
            unseen_bands[i] = _unseen_band(shown_maps[i].shape[:2], input_size)[0]

    for _, indices in rows:
        read_maps(indices)
    if show_catches == "auto":
        show_catches = _shows_no_catch(
            rows[1][1],
            anomaly_scores,
            image_threshold,
            shown_maps,
            unseen_bands,
            threshold,
        )
    if show_catches:
        catches = _pick(defective, anomaly_scores, True, n, exclude=rows[1][1])
        if catches.size:
            rows.append((_CATCHES, catches))
            read_maps(catches)
    shown = list(shown_maps)
    vmin, vmax = _color_range(
        [shown_maps[i] for i in shown],
        [unseen_bands[i] for i in shown],
        threshold,
        None,
        None,
    )

    fig, axes = plt.subplots(
        len(rows),
        n,
        figsize=(2.5 * n + 1.0, 3.1 * len(rows)) if figsize is None else figsize,
        squeeze=False,
        layout="constrained",
    )
    for row, ((_, label), indices) in enumerate(rows):
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
                threshold=threshold,
                detector=detector,
                colorbar=False,
                legend=False,
            )
            note = None if notes is None else notes[i]
            ax.set_title(
                _panel_title(label, i, anomaly_scores[i], image_threshold, note),
                fontsize="small",
            )
    _add_colorbar(fig, axes[0, 0].images[-1], axes, threshold)
    handles = _legend_handles(
        masks is not None and any(masks[i] is not None for i in shown),
        False,
        any(unseen_bands[i] is not None for i in shown),
    )
    if handles:
        _add_legend(axes[-1, 0], handles)
    positions = ["top", "middle", "bottom"] if len(rows) == 3 else ["top", "bottom"]
    names = [
        f"{name} ({position})" for ((name, _), _), position in zip(rows, positions)
    ]
    fig.suptitle(", ".join(names).capitalize())
    return fig
