"""Labels and masks of a fitted novelty detector, from its scores and thresholds."""

import numpy as np
from sklearn.base import OutlierMixin
from sklearn.utils._available_if import available_if

from ._conformal import pvalues


def _novelty_only(detector):
    raise AttributeError(
        f"fit_predict is not available: {type(detector).__name__} is a novelty "
        "detector. Fit it on good images, then call predict on new images."
    )


class NoveltyDecisionsMixin(OutlierMixin):
    """``decision_function``, ``predict`` and ``predict_masks`` of a detector.

    The detector provides ``score_samples``, ``anomaly_maps`` and the fitted
    thresholds ``offset_`` and ``pixel_threshold_``. ``fit_predict`` is
    hidden: like ``LocalOutlierFactor(novelty=True)``, the thresholds are set
    for images the detector has not seen, so labelling its own training
    images has no meaning.
    """

    def decision_function(self, X):
        """Shifted normality: negative for outliers, non-negative for inliers.

        Parameters
        ----------
        X : array-like or list of images
            Images in any form accepted by :meth:`fit`.

        Returns
        -------
        scores : ndarray of shape (n_images,)
            ``score_samples(X) - offset_``.
        """
        return self.score_samples(X) - self.offset_

    def predict(self, X):
        """Label each image +1 (normal) or -1 (anomalous).

        Parameters
        ----------
        X : array-like or list of images
            Images in any form accepted by :meth:`fit`.

        Returns
        -------
        labels : ndarray of shape (n_images,)
            +1 where ``decision_function(X) >= 0``, else -1.
        """
        return np.where(self.decision_function(X) >= 0, 1, -1)

    def pvalues(self, X):
        """Conformal p-value of each image: how unusual it is among good images.

        ``(1 + k) / (n + 1)``, where ``n`` is ``n_calibration_images_`` and
        ``k`` the number of calibration images whose held-out score is at
        least as anomalous (``calibration_scores_ <= score_samples``). A
        p-value of 0.01 reads "as unusual as about 1 good image in 100". For
        a good image exchangeable with the calibration images, ``P(p <=
        alpha) <= alpha`` for every ``alpha``; with a float
        ``contamination``, ``predict`` flags exactly the images whose
        p-value is ``<= contamination``. The smallest p-value is ``1 / (n +
        1)``.

        Parameters
        ----------
        X : array-like or list of images
            Images in any form accepted by :meth:`fit`.

        Returns
        -------
        pvalues : ndarray of shape (n_images,)
            In ``(0, 1]``; small for anomalous images.
        """
        return pvalues(self.calibration_scores_, self.score_samples(X))

    @available_if(_novelty_only)
    def fit_predict(self, X, y=None):
        """Not available: fit on good images, then predict new ones.

        PatchCore is a novelty detector, like
        ``LocalOutlierFactor(novelty=True)``: its threshold is set for images
        it has not seen, so labelling its own training images has no meaning.
        Accessing this method raises an AttributeError.

        Parameters
        ----------
        X : array-like or list of images
            Unused.

        y : None
            Ignored. Not used, present for API consistency by convention.
        """

    def predict_masks(self, X):
        """Mark the pixels whose anomaly-map value exceeds ``pixel_threshold_``.

        Parameters
        ----------
        X : array-like or list of images
            Images in any form accepted by :meth:`fit`.

        Returns
        -------
        masks : list of ndarray of shape (height, width)
            Boolean masks, one per image, True where anomalous.
        """
        return [m > self.pixel_threshold_ for m in self.anomaly_maps(X)]
