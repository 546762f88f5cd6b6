"""Cross-validation for novelty detectors that must be fitted on normal images."""

import numbers

import numpy as np
from sklearn.model_selection import StratifiedKFold, check_cv
from sklearn.utils import check_array

__all__ = ["NoveltyCV"]


class NoveltyCV:
    """Cross-validator whose training folds keep only normal (+1) samples.

    A novelty detector such as :class:`~skpatchcore.PatchCoreDetector` must
    be fitted on good images only, but a model-selection score such as ROC
    AUC needs test folds with both classes. ``NoveltyCV`` wraps any
    cross-validator (stratified k-fold by default): each test fold is left
    as it is, and the anomalous (-1) samples are dropped from each training
    fold, where they would otherwise enter the memory bank.

    :meth:`PatchCoreDetector.fit <skpatchcore.PatchCoreDetector.fit>`
    itself leaves out the images that ``y`` labels -1, so a plain splitter and
    ``GridSearchCV(..., refit=True)`` also train on good images only;
    ``NoveltyCV`` states it in the folds, and serves detectors whose ``fit``
    ignores ``y``.

    Parameters
    ----------
    cv : int or cross-validation generator, default=5
        An int is the number of folds of a
        :class:`~sklearn.model_selection.StratifiedKFold`; otherwise any
        object with ``split`` and ``get_n_splits``.

    See Also
    --------
    sklearn.model_selection.StratifiedKFold : The default splitter.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore.model_selection import NoveltyCV
    >>> y = np.array([1, 1, 1, 1, -1, -1])
    >>> for train, test in NoveltyCV(2).split(np.zeros(6), y):
    ...     print(train, test)
    [2 3] [0 1 4]
    [0 1] [2 3 5]

    A grid search over PatchCore parameters then reads::

        search = GridSearchCV(
            PatchCoreDetector(), {"patch_size": [1, 3, 5]},
            scoring="roc_auc", cv=NoveltyCV(3),
        ).fit(images, labels)
        best = search.best_estimator_  # refitted on the +1 images only
    """

    def __init__(self, cv=5):
        self.cv = cv

    def _splitter(self):
        if isinstance(self.cv, numbers.Integral):
            return StratifiedKFold(self.cv)
        return check_cv(self.cv, classifier=True)

    def split(self, X, y, groups=None):
        """Yield ``(train, test)`` index arrays; train holds only +1 samples.

        Parameters
        ----------
        X : array-like or list of images
            Only its length is used.

        y : array-like of shape (n_samples,)
            Labels: +1 normal, -1 anomalous.

        groups : array-like of shape (n_samples,), default=None
            Passed to the wrapped splitter.

        Yields
        ------
        train : ndarray
            Indices of the normal samples of the training fold.

        test : ndarray
            Indices of the test fold.
        """
        if y is None:
            raise ValueError("NoveltyCV needs the labels y (+1 normal, -1 anomalous).")
        y = check_array(y, ensure_2d=False, dtype=None)
        labels = set(np.unique(y).tolist())
        if not labels <= {-1, 1}:
            raise ValueError(
                "NoveltyCV expects labels +1 (normal) and -1 (anomalous); "
                f"got {sorted(labels)}."
            )
        indices = np.arange(len(y))
        for train, test in self._splitter().split(indices, y, groups):
            normal_train = train[y[train] == 1]
            if len(normal_train) == 0:
                raise ValueError("A training fold holds no normal (+1) sample.")
            yield normal_train, test

    def get_n_splits(self, X=None, y=None, groups=None):
        """Number of splits of the wrapped cross-validator.

        Parameters
        ----------
        X, y, groups : object
            Passed to the wrapped splitter.

        Returns
        -------
        n_splits : int
            The number of (train, test) pairs.
        """
        return self._splitter().get_n_splits(X, y, groups)

    def __repr__(self):
        return f"NoveltyCV(cv={self.cv!r})"
