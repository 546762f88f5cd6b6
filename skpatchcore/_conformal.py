"""Conformal p-values and the thresholds that decide at a chosen rate.

Engine-free arithmetic on held-out calibration values, used by every
estimator. A good image whose score is exchangeable with those of the ``n``
calibration images gets a p-value ``(1 + k) / (n + 1)``, ``k`` the
calibration images at least as anomalous as it; then ``P(p <= alpha) <=
alpha`` for every ``alpha`` (Bates et al., "Testing for outliers with
conformal p-values", Annals of Statistics 2023). The ``1 +`` counts the
image itself among ``n + 1`` exchangeable values: without it the rate is
exceeded.
"""

import numpy as np


def pvalues(calibration_scores, scores):
    """Conformal p-value of each of ``scores`` (higher is more normal).

    Parameters
    ----------
    calibration_scores : ndarray of shape (n_calibration,)
        Held-out ``score_samples`` of the calibration images.

    scores : ndarray of shape (n_images,)
        ``score_samples`` of the images to test.

    Returns
    -------
    pvalues : ndarray of shape (n_images,)
        ``(1 + #{calibration scores <= score}) / (n_calibration + 1)``.
    """
    calibration = np.sort(np.asarray(calibration_scores, dtype=np.float64))
    at_most = np.searchsorted(calibration, np.asarray(scores), side="right")
    return (1.0 + at_most) / (len(calibration) + 1.0)


def n_rejectable(n_calibration, alpha):
    """How many calibration images may be more anomalous than a flagged one.

    The largest ``k`` with ``(1 + k) / (n_calibration + 1) <= alpha``, plus
    one; 0 when even ``k = 0`` gives a p-value above ``alpha``. Computed with
    the same floating-point division as :func:`pvalues`, so that a threshold
    built on it flags exactly the p-values ``<= alpha``.
    """
    grid = (1.0 + np.arange(n_calibration + 1)) / (n_calibration + 1.0)
    return int(np.count_nonzero(grid <= alpha))


def score_threshold(calibration_scores, alpha):
    """``offset_`` such that ``score < offset_`` iff the p-value is ``<= alpha``.

    With ``m = n_rejectable(n, alpha)``: an image's p-value is ``<= alpha``
    iff fewer than ``m`` calibration scores are ``<= `` its score, iff its
    score is below the ``m``-th smallest calibration score.
    """
    # -inf and inf pad the ends: m = 0 flags nothing, m = n + 1 (alpha = 1)
    # everything.
    calibration = np.sort(np.r_[-np.inf, calibration_scores, np.inf])
    return float(calibration[n_rejectable(len(calibration) - 2, alpha)])


def map_threshold(calibration_maxima, alpha):
    """``pixel_threshold_`` such that a good image has any pixel above it
    with probability at most ``alpha``.

    An image has a pixel above the threshold iff its largest map value is;
    that largest value, against those of the calibration images, has a
    conformal p-value ``(1 + #{calibration maxima >= it}) / (n + 1)``, and
    the threshold is the ``m``-th largest calibration maximum (``m =
    n_rejectable(n, alpha)``), so that a map is flagged iff that p-value is
    ``<= alpha``.
    """
    maxima = np.sort(np.r_[-np.inf, calibration_maxima, np.inf])[::-1]
    return float(maxima[n_rejectable(len(maxima) - 2, alpha)])
