"""Image- and pixel-level metrics for anomaly detection, and their scorers.

Image-level functions follow the conventions of
:class:`~skpatchcore.PatchCoreDetector`: labels are +1 for good and -1 for
defective images, and scores are higher for more normal images, as returned
by ``decision_function`` or ``score_samples``.

Pixel-level functions take ground-truth masks (True on defective pixels) and
anomaly maps (higher for more anomalous pixels), one pair per image; images
may have different sizes.
"""

import os
from collections.abc import Mapping
from numbers import Real
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.integrate import trapezoid
from sklearn.metrics import make_scorer, roc_auc_score
from sklearn.utils import check_consistent_length, column_or_1d
from sklearn.utils._param_validation import Interval, validate_params

from .datasets import load_mask

__all__ = [
    "aupro",
    "f1_max",
    "image_auroc",
    "image_auroc_scorer",
    "make_aupro_scorer",
    "pixel_auroc",
    "pro_curve",
]

# Ground-truth regions are 8-connected, as in the official MVTec AD
# evaluation code: pixels touching only at a corner belong to one defect.
_CONNECTIVITY = np.ones((3, 3), dtype=int)


def _check_image_labels(y_true, y_score):
    """Validate +1/-1 labels and finite scores of the same length."""
    y_true = column_or_1d(y_true)
    y_score = column_or_1d(y_score, dtype=np.float64)
    check_consistent_length(y_true, y_score)
    labels = set(np.unique(y_true).tolist())
    if labels != {-1, 1}:
        raise ValueError(
            "y_true must hold both labels +1 (good) and -1 (defective) and no "
            f"other value; got the labels {sorted(labels, key=str)}."
        )
    if not np.isfinite(y_score).all():
        raise ValueError("y_score must not contain NaN or infinity.")
    return y_true.astype(int), y_score


def _check_pixel_inputs(masks, anomaly_maps):
    """Return boolean masks and floating maps, one per image, checked pairwise."""
    maps = []
    for index, anomaly_map in enumerate(anomaly_maps):
        anomaly_map = np.asarray(anomaly_map)
        if anomaly_map.dtype.kind not in "biuf":
            raise TypeError(
                f"anomaly_maps[{index}] must hold numbers; got dtype "
                f"{anomaly_map.dtype}."
            )
        # Float32 maps stay float32: sorting them is much faster than
        # sorting float64 copies.
        if anomaly_map.dtype.kind != "f":
            anomaly_map = anomaly_map.astype(np.float64)
        maps.append(anomaly_map)
    masks = list(masks)
    if len(masks) != len(maps):
        raise ValueError(
            f"Got {len(masks)} masks but {len(maps)} anomaly maps; they must "
            "come in pairs, one per image."
        )
    if not maps:
        raise ValueError("Pixel metrics need at least one image.")
    checked_masks = []
    for index, (mask, anomaly_map) in enumerate(zip(masks, maps)):
        if anomaly_map.ndim != 2:
            raise ValueError(
                f"anomaly_maps[{index}] must be 2-D (height, width); got shape "
                f"{anomaly_map.shape}."
            )
        if not np.isfinite(anomaly_map).all():
            raise ValueError(f"anomaly_maps[{index}] contains NaN or infinity.")
        try:
            checked_masks.append(load_mask(mask, anomaly_map.shape))
        except ValueError as exc:
            raise ValueError(f"masks[{index}]: {exc}") from exc
    return checked_masks, maps


def _split_pixel_scores(masks, maps):
    """Sorted scores of all good pixels and scores of all defective pixels."""
    good = np.concatenate(
        [anomaly_map[~mask] for mask, anomaly_map in zip(masks, maps)]
    )
    defective = np.concatenate(
        [anomaly_map[mask] for mask, anomaly_map in zip(masks, maps)]
    )
    if good.size == 0 or defective.size == 0:
        raise ValueError(
            "Pixel metrics need both defective and good pixels in the masks."
        )
    # Good pixels are the vast majority; a plain sort of them is many times
    # faster than an argsort of all pixels.
    good.sort()
    return good, defective


@validate_params(
    {"y_true": ["array-like"], "y_score": ["array-like"]},
    prefer_skip_nested_validation=True,
)
def image_auroc(y_true, y_score):
    """Area under the ROC curve of image-level anomaly detection.

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        +1 for good images, -1 for defective ones. Both must occur.

    y_score : array-like of shape (n_samples,)
        Scores, higher for more normal images, such as the output of
        :meth:`PatchCoreDetector.decision_function` or
        :meth:`PatchCoreDetector.score_samples`.

    Returns
    -------
    auroc : float
        The probability that a random good image scores higher than a random
        defective one, ties counting one half. 1 is perfect, 0.5 is chance.

    See Also
    --------
    f1_max : Best F1 score over all thresholds.
    pixel_auroc : The same at pixel level.

    Notes
    -----
    The value equals ``sklearn.metrics.roc_auc_score(y_true, y_score)``,
    which takes the larger label, +1, as positive; it equals as well the
    AUROC with defective images as positives and ``-y_score`` as their
    score. This function differs by refusing labels other than +1 and -1:
    with 0/1 labels, 1 meaning defective, ``roc_auc_score`` would silently
    return one minus the AUROC.

    Examples
    --------
    >>> from skpatchcore.metrics import image_auroc
    >>> image_auroc([1, 1, -1, -1], [0.9, 0.4, 0.5, -0.2])
    0.75
    """
    y_true, y_score = _check_image_labels(y_true, y_score)
    return float(roc_auc_score(y_true == 1, y_score))


@validate_params(
    {"y_true": ["array-like"], "y_score": ["array-like"]},
    prefer_skip_nested_validation=True,
)
def f1_max(y_true, y_score):
    """Best F1 score of image-level detection over all thresholds.

    Defective images (-1) are the positive class. An image is predicted
    defective when ``y_score < threshold``, the rule of
    :meth:`PatchCoreDetector.predict` with ``decision_function`` and a
    threshold of 0.

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        +1 for good images, -1 for defective ones. Both must occur.

    y_score : array-like of shape (n_samples,)
        Scores, higher for more normal images.

    Returns
    -------
    f1 : float
        The largest F1 score that any threshold reaches.

    threshold : float
        A threshold reaching it, on the scale of `y_score`: the midpoint
        between the highest score predicted defective and the next higher
        score, or ``inf`` when predicting every image defective is best.
        When several thresholds reach `f1`, the lowest is returned.

    See Also
    --------
    image_auroc : Threshold-free ranking quality.

    Examples
    --------
    >>> from skpatchcore.metrics import f1_max
    >>> f1_max([1, 1, -1, -1], [0.9, 0.4, 0.5, -0.2])
    (0.8, 0.7)
    """
    y_true, y_score = _check_image_labels(y_true, y_score)
    order = np.argsort(y_score)
    sorted_scores = y_score[order]
    is_defective = y_true[order] == -1
    # Predicting the k lowest scores defective is only possible when k ends a
    # run of tied scores.
    ends = np.append(np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1)
    true_positives = np.cumsum(is_defective)[ends]
    n_predicted = ends + 1
    # F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (n predicted + n defective)
    f1 = 2 * true_positives / (n_predicted + is_defective.sum())
    best = int(np.argmax(f1))
    if best == ends.size - 1:
        return float(f1[best]), float(np.inf)
    low = sorted_scores[ends[best]]
    high = sorted_scores[ends[best] + 1]
    # Rounding can put the midpoint of two adjacent floats on the lower one,
    # which would then no longer satisfy low < threshold.
    threshold = max(low + (high - low) / 2, np.nextafter(low, np.inf))
    return float(f1[best]), float(threshold)


@validate_params(
    {"masks": ["array-like"], "anomaly_maps": ["array-like"]},
    prefer_skip_nested_validation=True,
)
def pixel_auroc(masks, anomaly_maps):
    """Area under the ROC curve of pixel-level anomaly segmentation.

    All pixels of all images are pooled into one ranking, so large images
    weigh more than small ones.

    Parameters
    ----------
    masks : sequence of length n_images
        The ground truth of each image: a 2-D boolean array (True on
        defective pixels), the path of a mask image, or None for an image
        without defect. See :func:`~skpatchcore.datasets.load_mask`.

    anomaly_maps : sequence of length n_images
        2-D arrays, each of the shape of its mask, higher for more anomalous
        pixels, such as the output of :meth:`PatchCoreDetector.anomaly_maps`.

    Returns
    -------
    auroc : float
        The probability that a random defective pixel scores higher than a
        random good pixel, ties counting one half.

    See Also
    --------
    aupro : A pixel-level metric that weighs small defects as much as large
        ones.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore.metrics import pixel_auroc
    >>> masks = [np.array([[True, False], [False, False]]), None]
    >>> maps = [np.array([[0.9, 0.1], [0.2, 0.3]]), np.full((3, 3), 0.5)]
    >>> pixel_auroc(masks, maps)
    1.0
    """
    good, defective = _split_pixel_scores(*_check_pixel_inputs(masks, anomaly_maps))
    # Each defective pixel wins against the good pixels below it and ties
    # with the equal ones: (below + (below + equal)) / 2 counts both.
    below = np.searchsorted(good, defective, side="left").sum()
    below_or_equal = np.searchsorted(good, defective, side="right").sum()
    return float((below + below_or_equal) / (2 * good.size * defective.size))


@validate_params(
    {"masks": ["array-like"], "anomaly_maps": ["array-like"]},
    prefer_skip_nested_validation=True,
)
def pro_curve(masks, anomaly_maps):
    """Per-region overlap (PRO) against false positive rate, for all thresholds.

    At a threshold t, pixels whose anomaly score is at least t are predicted
    defective. The false positive rate is the fraction of good pixels, over
    all images, predicted defective. The PRO is the mean, over all connected
    regions of the ground truth in all images, of the fraction of the region
    predicted defective: a small defect counts as much as a large one.

    Parameters
    ----------
    masks : sequence of length n_images
        The ground truth of each image: a 2-D boolean array (True on
        defective pixels), the path of a mask image, or None for an image
        without defect. See :func:`~skpatchcore.datasets.load_mask`.

    anomaly_maps : sequence of length n_images
        2-D arrays, each of the shape of its mask, higher for more anomalous
        pixels.

    Returns
    -------
    fpr : ndarray of shape (n_thresholds,)
        Non-decreasing false positive rates, from 0 to 1.

    pro : ndarray of shape (n_thresholds,)
        Non-decreasing per-region overlaps, from 0 to 1.

    thresholds : ndarray of shape (n_thresholds,)
        Decreasing thresholds, the first ``inf`` for the point (0, 0) where
        nothing is predicted defective. Thresholds that would only add a
        point inside a horizontal run of the curve, where nothing but good
        pixels cross, are left out; the curve is the same.

    See Also
    --------
    aupro : The normalized area under this curve up to a false positive rate.

    Notes
    -----
    Regions are 8-connected (pixels touching at a corner belong to the same
    region), as in the evaluation code published with MVTec AD [1]_.

    Every point of the curve comes from one sort of the good pixels' scores
    and one of the defective pixels', in O(n log n) time for n pixels,
    instead of one pass over all pixels per threshold. 100 maps of 512x512
    pixels take about a second.

    References
    ----------
    .. [1] P. Bergmann, K. Batzner, M. Fauser, D. Sattlegger and C. Steger,
       "The MVTec Anomaly Detection Dataset: A Comprehensive Real-World
       Dataset for Unsupervised Anomaly Detection", International Journal of
       Computer Vision, 129(4), 1038-1059, 2021.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore.metrics import pro_curve
    >>> masks = [np.array([[True, True, False, False]])]
    >>> maps = [np.array([[0.9, 0.2, 0.5, 0.1]])]
    >>> fpr, pro, thresholds = pro_curve(masks, maps)
    >>> fpr
    array([0. , 0. , 0.5, 0.5, 1. ])
    >>> pro
    array([0. , 0.5, 0.5, 1. , 1. ])
    """
    masks, maps = _check_pixel_inputs(masks, anomaly_maps)
    good, defective = _split_pixel_scores(masks, maps)
    # Each defective pixel adds 1 / (size of its region) to the summed
    # overlaps, so that a fully detected region adds 1 whatever its size.
    gains = []
    n_regions = 0
    for mask in masks:
        regions, n_mask_regions = ndimage.label(mask, structure=_CONNECTIVITY)
        region_of_pixel = regions[mask]
        gains.append(1.0 / np.bincount(region_of_pixel)[region_of_pixel])
        n_regions += n_mask_regions
    order = np.argsort(defective)[::-1]
    defective = defective[order]
    summed_overlap = np.cumsum(np.concatenate(gains)[order])

    # The curve turns only where defective pixels cross the threshold; in
    # between, good pixels alone move it along a straight horizontal run.
    # So two points per distinct defective score v suffice: "above" counts
    # the pixels scoring more than v, "at" those scoring v or more.
    ends = np.append(np.flatnonzero(np.diff(defective)), defective.size - 1)
    values = defective[ends]
    pro_at = np.minimum(summed_overlap[ends] / n_regions, 1.0)
    pro_above = np.concatenate([[0.0], pro_at[:-1]])
    fp_at = good.size - np.searchsorted(good, values, side="left")
    fp_above = good.size - np.searchsorted(good, values, side="right")
    # The threshold of an "above" point is the lowest score above v, that of
    # a good pixel whenever the point differs from the previous "at" point.
    lowest_good_above = good[np.minimum(good.size - fp_above, good.size - 1)]
    distinct = fp_above > np.concatenate([[0], fp_at[:-1]])

    fp = np.empty(2 * values.size)
    fp[0::2], fp[1::2] = fp_above, fp_at
    pro = np.empty_like(fp)
    pro[0::2], pro[1::2] = pro_above, pro_at
    thresholds = np.empty(2 * values.size, dtype=good.dtype)
    thresholds[0::2], thresholds[1::2] = lowest_good_above, values
    keep = np.ones(fp.size, dtype=bool)
    keep[0::2] = distinct

    fp = np.concatenate([[0.0], fp[keep]])
    pro = np.concatenate([[0.0], pro[keep]])
    thresholds = np.concatenate([[np.inf], thresholds[keep]])
    if fp[-1] < good.size:
        fp = np.append(fp, good.size)
        pro = np.append(pro, 1.0)
        thresholds = np.append(thresholds, good[0])
    return fp / good.size, pro, thresholds


@validate_params(
    {
        "masks": ["array-like"],
        "anomaly_maps": ["array-like"],
        "fpr_limit": [Interval(Real, 0, 1, closed="right")],
    },
    prefer_skip_nested_validation=True,
)
def aupro(masks, anomaly_maps, *, fpr_limit=0.3):
    """Normalized area under the PRO curve up to a false positive rate.

    This is the segmentation metric of MVTec AD [1]_: the area under
    :func:`pro_curve` for false positive rates from 0 to `fpr_limit`,
    divided by `fpr_limit`. The curve is linearly interpolated at
    `fpr_limit`.

    Parameters
    ----------
    masks : sequence of length n_images
        The ground truth of each image: a 2-D boolean array (True on
        defective pixels), the path of a mask image, or None for an image
        without defect. See :func:`~skpatchcore.datasets.load_mask`.

    anomaly_maps : sequence of length n_images
        2-D arrays, each of the shape of its mask, higher for more anomalous
        pixels.

    fpr_limit : float, default=0.3
        The false positive rate up to which the curve is integrated, in
        (0, 1]. Higher limits reward maps that are only good at flagging
        large parts of good images.

    Returns
    -------
    aupro : float
        Between 0 and 1; 1 when every defective pixel scores above every
        good pixel. A map that does not rank at all (a constant) gets
        ``fpr_limit / 2``.

    See Also
    --------
    pro_curve : The curve itself.
    make_aupro_scorer : Use this metric in a grid search.

    References
    ----------
    .. [1] P. Bergmann, K. Batzner, M. Fauser, D. Sattlegger and C. Steger,
       "The MVTec Anomaly Detection Dataset: A Comprehensive Real-World
       Dataset for Unsupervised Anomaly Detection", International Journal of
       Computer Vision, 129(4), 1038-1059, 2021.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore.metrics import aupro
    >>> masks = [np.array([[True, True, False, False]])]
    >>> aupro(masks, [np.array([[0.9, 0.8, 0.2, 0.1]])])
    1.0
    >>> aupro(masks, [np.zeros((1, 4))])
    0.15
    """
    fpr, pro, _ = pro_curve(masks, anomaly_maps)
    stop = np.searchsorted(fpr, fpr_limit, side="right")
    x, y = fpr[:stop], pro[:stop]
    if stop < fpr.size:
        # fpr[stop - 1] <= fpr_limit < fpr[stop]: close the area at the limit.
        slope = (pro[stop] - y[-1]) / (fpr[stop] - x[-1])
        x = np.append(x, fpr_limit)
        y = np.append(y, y[-1] + slope * (fpr_limit - x[-2]))
    return float(trapezoid(y, x) / fpr_limit)


#: Scorer of :func:`image_auroc` for model selection, ranking images by
#: ``decision_function``: ``GridSearchCV(detector, grid, scoring=image_auroc_scorer)``
#: with ``y`` holding +1 for good and -1 for defective images.
#: ``scoring="roc_auc"`` gives the same value, because for an estimator that
#: is not a classifier scikit-learn passes ``decision_function`` unchanged to
#: ``roc_auc_score``, which takes the larger label, +1, as positive. This
#: scorer adds the check that labels are +1 and -1, so that 0/1 labels cannot
#: silently turn the score into one minus the AUROC.
image_auroc_scorer = make_scorer(image_auroc, response_method="decision_function")


class _AuproScorer:
    """Score an estimator by the AUPRO of its anomaly maps on images given by path."""

    def __init__(self, masks, fpr_limit):
        self._masks = {Path(image): mask for image, mask in masks.items()}
        self._fpr_limit = fpr_limit

    def __call__(self, estimator, X, y=None):
        masks = []
        for image in X:
            if not isinstance(image, (str, os.PathLike)):
                raise TypeError(
                    "The AUPRO scorer finds each image's mask by its path, so "
                    "X must be a sequence of image paths; got an element of "
                    f"type {type(image).__name__}."
                )
            try:
                masks.append(self._masks[Path(image)])
            except KeyError:
                raise ValueError(
                    f"The AUPRO scorer has no mask for the image {image}. Give "
                    "every scored image a mask, None for good images."
                ) from None
        return aupro(masks, estimator.anomaly_maps(X), fpr_limit=self._fpr_limit)

    def __repr__(self):
        n_masks = len(self._masks)
        return f"make_aupro_scorer(<{n_masks} masks>, fpr_limit={self._fpr_limit})"


@validate_params(
    {"masks": [Mapping], "fpr_limit": [Interval(Real, 0, 1, closed="right")]},
    prefer_skip_nested_validation=True,
)
def make_aupro_scorer(masks, *, fpr_limit=0.3):
    """Make a scorer that computes the AUPRO of an estimator's anomaly maps.

    A scorer only receives the estimator, the images ``X`` and the labels
    ``y`` of one cross-validation fold, so pixel-level ground truth cannot
    travel with ``y``. This scorer instead holds the masks of all images,
    keyed by image path, and looks up those of the fold's ``X``. The images
    must therefore be given as file paths, as the loaders of
    :mod:`skpatchcore.datasets` return them by default.

    Parameters
    ----------
    masks : mapping
        Maps each image path (str or path-like) that may be scored to its
        ground truth: a 2-D boolean array, the path of a mask image, or None
        for a good image. Paths are compared as :class:`pathlib.Path`
        objects, so ``"a/b.png"`` and ``Path("a/b.png")`` match, but a
        relative and an absolute path to the same file do not.

    fpr_limit : float, default=0.3
        Passed to :func:`aupro`.

    Returns
    -------
    scorer : callable
        ``scorer(estimator, X, y=None)`` returns
        ``aupro([masks[x] for x in X], estimator.anomaly_maps(X))``; higher
        is better. It raises a ValueError for an image without an entry in
        `masks`, and for a fold without any defective pixel, since AUPRO is
        undefined there.

    See Also
    --------
    aupro : The metric.
    image_auroc_scorer : The image-level scorer.

    Examples
    --------
    >>> from skpatchcore.datasets import load_mvtec_folder
    >>> from skpatchcore.metrics import image_auroc_scorer, make_aupro_scorer
    >>> data = load_mvtec_folder("mvtec_ad/bottle")  # doctest: +SKIP
    >>> scoring = {
    ...     "image_auroc": image_auroc_scorer,
    ...     "aupro": make_aupro_scorer(dict(zip(data.test_images, data.test_masks))),
    ... }  # doctest: +SKIP
    """
    return _AuproScorer(masks, fpr_limit)
