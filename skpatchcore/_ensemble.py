"""Ensembles of PatchCore detectors: one memory bank per backbone, scores combined."""

import functools
import numbers
import os

import numpy as np
from sklearn.base import BaseEstimator, _fit_context, clone
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.metaestimators import _BaseComposition
from sklearn.utils.validation import check_is_fitted

from ._calibration import thresholds
from ._detector import PatchCoreDetector
from ._images import check_images, reusable_sources
from ._novelty_decisions import NoveltyDecisionsMixin
from ._persistence import portable, restore
from ._validation import (
    RUNTIME_PARAMS,
    check_no_bools,
    check_unchanged_since_fit,
    good_images,
)


def _location_scale(values):
    """Mean and standard deviation of ``values``; a scale of 1 if they coincide.

    A spread within rounding of the mean carries no scale, so such a member
    is only centred, as :class:`~sklearn.preprocessing.StandardScaler` does
    with a constant feature.
    """
    mean, std = float(np.mean(values)), float(np.std(values))
    if not std > 10 * np.finfo(np.float64).eps * max(abs(mean), 1.0):
        std = 1.0
    return mean, std


class PatchCoreEnsemble(NoveltyDecisionsMixin, _BaseComposition):
    """Several PatchCore detectors, each with its own memory bank, as one.

    Every detector (for instance one per backbone, or per set of layers) is
    cloned and fitted on the same good images. Their image scores and
    anomaly maps, each on its own scale, are standardised with statistics of
    the detector's own held-out calibration images and averaged; the
    ensemble's thresholds are calibrated on the averaged held-out scores and
    maps of those images, with the same ``contamination`` rules as a single
    detector. The paper reports its best MVTec AD results with an ensemble
    of three backbones (Table 4 of [1]_).

    Parameters
    ----------
    detectors : list of (str, PatchCoreDetector) tuples
        The members, each with a name, as the steps of a
        :class:`~sklearn.pipeline.Pipeline`: ``get_params`` and
        ``set_params`` reach a member's parameters as
        ``<name>__<parameter>`` (``"wrn__coreset_ratio"``), so
        :class:`~sklearn.model_selection.GridSearchCV` can tune them. The
        detectors given are never fitted themselves: fitted clones are kept
        in ``detectors_``. They must share ``max_calibration_images`` and
        ``calibration_holdout``; their
        ``random_state`` and ``contamination`` are not used (see
        ``random_state`` and ``contamination`` below).

    contamination : "auto" or float, default="auto"
        Sets ``offset_`` and ``pixel_threshold_`` from the combined held-out
        scores and maps of the calibration images, as
        :class:`PatchCoreDetector` does from its own: "auto" puts the
        thresholds at the most anomalous calibration image that is not an
        outlier by Tukey's rule; a float ``alpha`` in (0, 0.5] is the
        false-alarm rate: ``predict`` flags an image iff its conformal
        p-value (:meth:`pvalues`, from the combined scores) is at most
        ``alpha``.

    random_state : int, RandomState instance or None, default=None
        Given to every member in place of its own, so that all members draw
        the same calibration sample (see Notes): an int as it is, else an
        int drawn from it. Pass an int for reproducible results.

    memory : str, path-like, joblib.Memory or None, default=None
        Caches the backbone's layer outputs per image on disk, as
        :class:`PatchCoreDetector`'s ``memory`` does; given to every member
        in place of its own. Members with the same backbone, weights,
        layers, normalisation and input geometry (differing in
        ``patch_size``, say) then run it once per image between them.
        None leaves each member its own ``memory``. May change after
        ``fit``; results are identical with and without it.

    Attributes
    ----------
    detectors_ : list of PatchCoreDetector
        The fitted members, in the order of ``detectors``.

    named_detectors_ : dict of str to PatchCoreDetector
        The fitted members by name.

    n_train_images_ : int
        Number of images trained on: those labelled +1 when ``y`` is given.

    score_means_ : ndarray of shape (n_detectors,)
        Mean of each member's held-out calibration scores
        (``calibration_scores_``).

    score_scales_ : ndarray of shape (n_detectors,)
        Standard deviation of each member's held-out calibration scores, or
        1 where they all coincide.

    map_means_ : ndarray of shape (n_detectors,)
        Mean of each member's ``calibration_map_maxima_``.

    map_scales_ : ndarray of shape (n_detectors,)
        Standard deviation of each member's ``calibration_map_maxima_``, or 1
        where they all coincide.

    calibration_indices_ : ndarray of shape (n_calibration_images,)
        Positions, among the training images, of the calibration images
        that every member scored held out.

    calibration_scores_ : ndarray of shape (n_calibration_images,)
        Combined held-out ``score_samples`` of the calibration images,
        against which :meth:`pvalues` ranks new images.

    calibration_map_maxima_ : ndarray of shape (n_calibration_images,)
        Largest value of the combined held-out anomaly map of each
        calibration image, at the image's own resolution, where
        ``predict_masks`` compares maps with ``pixel_threshold_``.

    n_calibration_images_ : int
        Number of calibration images.

    offset_ : float
        Threshold on the combined ``score_samples``: ``decision_function =
        score_samples - offset_``, negative for outliers. Set by
        ``contamination`` at ``fit``; it may be assigned to move the
        threshold.

    pixel_threshold_ : float
        Combined anomaly-map value above which ``predict_masks`` marks a
        pixel. Set and assignable like ``offset_``.

    See Also
    --------
    PatchCoreDetector : One backbone, one memory bank.
    sklearn.ensemble.VotingClassifier : The same composition of named
        estimators, for classifiers.

    Notes
    -----
    Combined scores. Member ``k`` has held-out calibration scores (its
    ``calibration_scores_``) of mean :math:`\\mu_k` and standard deviation
    :math:`\\sigma_k`; for an image with member scores :math:`s_k`, the
    ensemble's ``score_samples`` is the mean over the :math:`K` members of
    :math:`(s_k - \\mu_k) / \\sigma_k`. The members' raw scores are
    distances in different feature spaces and cannot be averaged as they
    are; standardised, each says how many of its own standard deviations an
    image lies from a typical good image, and every member weighs the same.
    Only training images set the statistics, so an image's score does not
    depend on the other images scored with it, and one image can be
    scored alone.

    Combined maps. Member ``k``'s anomaly map, at the image's own resolution,
    is centred and scaled by the mean and standard deviation of its
    ``calibration_map_maxima_`` (the largest held-out map value of each
    calibration image), and the ensemble's map is the mean of these. Masks
    and the pixel threshold concern the pixels that may stand out, the upper
    tail of each map, and the maxima measure that tail: on each member's
    scale, 0 is then the worst pixel of a typical good image and 1 the
    spread of that worst pixel between good images. Statistics over all
    pixels would be set by the background, most of the map, whose spread
    says little about how far anomalous pixels rise, and which differs from
    one member to another relative to the peaks (with ``sigma`` or
    ``patch_size``, for instance).

    Thresholds. A single detector calibrates on held-out scores of a sample
    of its training images. The ensemble's calibration images are those
    held out by every member; the members all draw the same sample, since
    each gets the ensemble's random state and the same images, and they
    share ``max_calibration_images`` (checked). A member leaves out the
    images it cannot score held out (see :class:`PatchCoreDetector`), and
    so does the ensemble. Each calibration image gets the combined score
    and the combined map described above, from the members' held-out
    scores and maps; ``contamination`` then sets ``offset_`` from the
    scores and ``pixel_threshold_`` from the largest value of each map, as
    in :class:`PatchCoreDetector`.

    P-values. The combined score of an image is ranked against the
    combined held-out scores of the calibration images, as
    :meth:`PatchCoreDetector.pvalues` does. The standardisation is set by
    the calibration images themselves, the same for every image, so the
    guarantee of a single detector holds only approximately here; with
    ``calibration_holdout`` shared by the members, the calibration images
    are out of every member's bank.

    Where a member's calibration scores (or map maxima) all coincide, it is
    centred only: its scale is taken as 1.

    There is no ``partial_fit``: after the first call, a detector draws its
    next calibration sample from a random state that its own coreset
    selection has moved on, so the members would no longer hold out the
    same images. Fit the ensemble again on all images instead.

    Every member runs its own backbone on each image, and holds its own
    memory bank: time and memory are the sum of the members'.

    References
    ----------
    .. [1] K. Roth, L. Pemula, J. Zepeda, B. Schölkopf, T. Brox and P. Gehler,
       "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore import PatchCoreDetector, PatchCoreEnsemble
    >>> rng = np.random.default_rng(0)
    >>> good = rng.integers(100, 140, size=(4, 64, 64), dtype=np.uint8)
    >>> scratched = good[:1].copy()
    >>> scratched[0, 30:34, 10:50] = 255
    >>> small = dict(backbone="efficientnet_lite0", image_size=64, resize=None,
    ...              feature_dim=64)
    >>> ensemble = PatchCoreEnsemble(
    ...     [("fine", PatchCoreDetector(patch_size=1, **small)),
    ...      ("coarse", PatchCoreDetector(patch_size=5, **small))],
    ...     random_state=0).fit(good)
    >>> ensemble.predict(scratched)
    array([-1])
    >>> ensemble.anomaly_maps(scratched)[0].shape
    (64, 64)
    >>> ensemble.set_params(coarse__patch_size=3).get_params()["coarse__patch_size"]
    3
    """

    _parameter_constraints = {
        "detectors": [list],
        "contamination": [
            StrOptions({"auto"}),
            Interval(numbers.Real, 0, 0.5, closed="right"),
        ],
        "random_state": ["random_state"],
        "memory": [None, str, os.PathLike, HasMethods("cache")],
    }

    def __init__(
        self, detectors, *, contamination="auto", random_state=None, memory=None
    ):
        self.detectors = detectors
        self.contamination = contamination
        self.random_state = random_state
        self.memory = memory

    def get_params(self, deep=True):
        """Get parameters for this ensemble.

        Parameters
        ----------
        deep : bool, default=True
            If True, also return the members by name and their parameters
            as ``<name>__<parameter>``.

        Returns
        -------
        params : dict
            Parameter names mapped to their values.
        """
        return self._get_params("detectors", deep=deep)

    def set_params(self, **params):
        """Set the parameters of this ensemble and of its members.

        Valid keys are those of :meth:`get_params` with ``deep=True``: a
        member's name replaces that member, ``<name>__<parameter>`` sets one
        of its parameters.

        Parameters
        ----------
        **params : dict
            Parameters of the ensemble and of its members.

        Returns
        -------
        self : object
            The ensemble.
        """
        self._set_params("detectors", **params)
        return self

    def _checked_detectors(self):
        """Names and detectors of ``detectors``, once they are found valid."""
        if not self.detectors:
            raise ValueError(
                "detectors is empty: give a list of (name, PatchCoreDetector) "
                "pairs, at least one."
            )
        names, detectors = [], []
        for position, item in enumerate(self.detectors):
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise TypeError(
                    f"detectors[{position}] is {item!r}; each entry must be a "
                    "(name, PatchCoreDetector) pair."
                )
            name, detector = item
            if not isinstance(name, str) or not name:
                raise TypeError(
                    f"detectors[{position}] is named {name!r}; names must be "
                    "non-empty strings."
                )
            if isinstance(detector, type):
                raise TypeError(
                    f"Detector {name!r} is the class {detector.__name__}; pass "
                    f"an instance, such as {detector.__name__}()."
                )
            if not isinstance(detector, PatchCoreDetector):
                raise TypeError(
                    f"Detector {name!r} has type {type(detector).__name__}; "
                    "every member must be a PatchCoreDetector."
                )
            names.append(name)
            detectors.append(detector)
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(
                f"Detector names must be unique; {repeated} appear more than once."
            )
        for name in names:
            if "__" in name:
                raise ValueError(
                    f"Detector name {name!r} contains '__', which get_params "
                    "and set_params use to reach a member's parameters (as in "
                    "'name__coreset_ratio'): rename it."
                )
            if name in self.get_params(deep=False):
                raise ValueError(
                    f"Detector name {name!r} is also a parameter of "
                    "PatchCoreEnsemble, so set_params could not tell them "
                    "apart: rename it."
                )
        for param in ("max_calibration_images", "calibration_holdout"):
            values = {name: getattr(d, param) for name, d in zip(names, detectors)}
            if len(set(values.values())) > 1:
                raise ValueError(
                    f"The detectors must share {param}, so that they hold out "
                    f"the same calibration images; got {values}."
                )
        return names, detectors

    @_fit_context(prefer_skip_nested_validation=False)
    def fit(self, X, y=None):
        """Fit a clone of every detector on the images, and calibrate.

        Parameters
        ----------
        X : array-like, list of images or folder
            Good images, in any form accepted by
            :meth:`PatchCoreDetector.fit`.

        y : array-like of shape (n_samples,), default=None
            Labels, if given: +1 good, -1 anomalous; images labelled -1 are
            left out of training, as in :meth:`PatchCoreDetector.fit`. None
            trains on every image.

        Returns
        -------
        self : object
            The fitted ensemble.
        """
        names, templates = self._checked_detectors()
        images = reusable_sources(good_images(check_images(X), y))
        seed = self.random_state
        if not isinstance(seed, numbers.Integral):
            seed = int(check_random_state(seed).randint(np.iinfo(np.int32).max))
        own_memories = [t.memory for t in templates]
        members = [
            clone(t).set_params(random_state=seed, memory=self._member_memory(own))
            for t, own in zip(templates, own_memories)
        ]
        # Every member's parameters are checked before the first one is fitted.
        for member in members:
            member._validate_params()
            check_no_bools(member)
        held_out_maps = [m._fit_with_calibration_maps(images) for m in members]

        score_stats = [_location_scale(m.calibration_scores_) for m in members]
        map_stats = [_location_scale(m.calibration_map_maxima_) for m in members]
        score_means, score_scales = np.array(score_stats).T
        map_means, map_scales = np.array(map_stats).T
        common = functools.reduce(
            np.intersect1d, [member.calibration_indices_ for member in members]
        )
        if len(common) == 0:
            raise ValueError(
                "No training image was scored held out by every detector, so "
                "the ensemble's thresholds cannot be calibrated. Fit on more "
                "distinct images or raise the detectors' coreset_ratio."
            )
        rows = [_positions(member.calibration_indices_, common) for member in members]
        scores = np.mean(
            [
                _standardised(m.calibration_scores_[r], mean, scale)
                for m, r, mean, scale in zip(members, rows, score_means, score_scales)
            ],
            axis=0,
        )
        maxima = np.empty(len(common))
        for i in range(len(common)):
            # At the image's own resolution, where the members' maps align.
            maps = [
                member_maps[member_rows[i]]
                for member_maps, member_rows in zip(held_out_maps, rows)
            ]
            maxima[i] = _combine_maps(maps, map_means, map_scales).max()
        offset, pixel_threshold = thresholds(scores, maxima, self.contamination)

        self.detectors_ = members
        self.named_detectors_ = dict(zip(names, members))
        self._own_memories = own_memories
        self.n_train_images_ = len(images)
        self.score_means_, self.score_scales_ = score_means, score_scales
        self.map_means_, self.map_scales_ = map_means, map_scales
        self.calibration_indices_ = common
        self.calibration_scores_, self.calibration_map_maxima_ = scores, maxima
        self.n_calibration_images_ = len(common)
        self.offset_ = offset
        self.pixel_threshold_ = pixel_threshold
        self._fitted_params = self._model_params()
        return self

    @property
    def partial_fit(self):
        """Not available: fit the ensemble again on all images instead.

        Reading it raises an ``AttributeError`` that says why (see the class
        description), so that ``hasattr(ensemble, "partial_fit")`` is False,
        as scikit-learn expects of an estimator that cannot learn
        incrementally.
        """
        raise AttributeError(
            "PatchCoreEnsemble has no partial_fit: a second call would let its "
            "members hold out different calibration images. Fit the ensemble "
            "again on all images, old and new: ensemble.fit(all_images)."
        )

    def _model_params(self):
        """The deep parameters that define the fitted model, by name.

        Members' runtime parameters may change after fit, as a detector's
        may; their ``random_state`` is replaced by the ensemble's.
        """
        params = {}
        for key, value in self.get_params(deep=True).items():
            member, _, name = key.rpartition("__")
            ignored = name in RUNTIME_PARAMS or (member and name == "random_state")
            if not (ignored or key == "detectors" or isinstance(value, BaseEstimator)):
                params[key] = value
        return params

    def _check_unchanged_since_fit(self):
        """Refuse to predict with parameters that no longer describe the model."""
        check_unchanged_since_fit(self._fitted_params, self._model_params())

    def _member_memory(self, own):
        """A member's ``memory``: the ensemble's, or else ``own``, its own."""
        return own if self.memory is None else self.memory

    def _members_images(self, X):
        """``X`` as a list for every fitted member, once the ensemble is checked."""
        check_is_fitted(self)
        self._check_unchanged_since_fit()
        # The ensemble's ``memory`` may have changed since fit.
        for own, member in zip(self._own_memories, self.detectors_):
            member.set_params(memory=self._member_memory(own))
        return reusable_sources(check_images(X))

    def _standardised_scores(self, k, scores):
        """Scores of member ``k`` on the scale of its calibration scores."""
        return _standardised(scores, self.score_means_[k], self.score_scales_[k])

    def score_samples(self, X):
        """Combined normality of each image: mean of standardised member scores.

        Parameters
        ----------
        X : array-like or list of images
            Images in any form accepted by :meth:`fit`.

        Returns
        -------
        scores : ndarray of shape (n_images,)
            Higher is more normal.
        """
        images = self._members_images(X)
        scores = 0.0
        for k, member in enumerate(self.detectors_):
            member_scores = member.score_samples(images)
            scores = scores + self._standardised_scores(k, member_scores)
        return scores / len(self.detectors_)

    def anomaly_maps(self, X, *, return_score_samples=False):
        """Combined anomaly map of each image, at the image's own resolution.

        Parameters
        ----------
        X : array-like or list of images
            Images in any form accepted by :meth:`fit`.

        return_score_samples : bool, default=False
            Also return :meth:`score_samples` of the images, computed in the
            same pass through each member's backbone.

        Returns
        -------
        maps : list of ndarray of shape (height, width)
            Float32 maps, one per image, aligned with the input image: the
            mean of the members' standardised maps; higher is more
            anomalous.

        score_samples : ndarray of shape (n_images,)
            Equal to ``score_samples(X)``. Only returned if
            ``return_score_samples=True``.
        """
        images = self._members_images(X)
        sums, scores = None, 0.0
        # Member after member, so that one member's maps are held at a time
        # beside the running sums.
        for k, member in enumerate(self.detectors_):
            maps, member_scores = member.anomaly_maps(images, return_score_samples=True)
            scores = scores + self._standardised_scores(k, member_scores)
            if sums is None:
                sums = [np.zeros(m.shape) for m in maps]
            for total, member_map in zip(sums, maps):
                total += _standardised(
                    member_map, self.map_means_[k], self.map_scales_[k]
                )
        maps = [(total / len(self.detectors_)).astype(np.float32) for total in sums]
        if return_score_samples:
            return maps, scores / len(self.detectors_)
        return maps

    def __getstate__(self):
        # A member's backbone given as a module is stored as the members
        # store it, so that skops can load the ensemble too.
        state = super().__getstate__().copy()
        if "_fitted_params" in state:
            state["_fitted_params"] = {
                key: portable(value) for key, value in state["_fitted_params"].items()
            }
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if hasattr(self, "_fitted_params"):
            self._fitted_params = {
                key: restore(value) for key, value in self._fitted_params.items()
            }

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        return tags


def _positions(indices, wanted):
    """Where each of ``wanted`` lies in ``indices`` (all of them are there)."""
    where = {int(index): row for row, index in enumerate(indices)}
    return np.array([where[int(index)] for index in wanted], dtype=np.intp)


def _combine_maps(maps, means, scales):
    """Mean of ``(map - mean) / scale`` over the members' maps of one image."""
    total = np.zeros(maps[0].shape)
    for member_map, mean, scale in zip(maps, means, scales):
        total += _standardised(member_map, mean, scale)
    return (total / len(maps)).astype(np.float32)


def _standardised(values, mean, scale):
    """``values`` on the scale of a member's calibration, in float64.

    Every combination goes through here, so that calibration and prediction
    round alike.
    """
    return (np.asarray(values, dtype=np.float64) - mean) / scale
