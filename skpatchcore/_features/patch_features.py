"""The feature stage of the engine: images to batches of patch features."""

import math

import numpy as np
import torch

from .._feature_batch import FeatureBatch
from .._images import (
    image_size_pair,
    input_geometry,
    load_image,
    source_shape,
    to_model_input,
)
from .aggregation import PatchAggregator
from .batch_norm_folding import fold_batch_norms
from .feature_cache import image_keys, network_digest

# Devices whose backbone pass runs under bfloat16 autocast: a GPU's tensor
# cores run it several times faster than float32. The maps are float32 again
# before aggregation, so the bank and every distance stay float32. Not the
# CPU, where bfloat16 convolutions gained nothing and features would differ
# from the float32 ones users have fitted with.
_BFLOAT16_DEVICES = ("cuda",)

# Input pixels per backbone pass on the CPU and per thread, whatever the
# batch size: the activations of a few images stay in the caches, where a
# pass of 16 images maps its early expanded maps afresh from the system on
# every pass (docs/results.rst, "Prediction stages": images per pass).
_CPU_PIXELS_PER_THREAD = 2 * 224 * 224


class PatchFeatures:
    """A tapped backbone and the paper's aggregation, on one device.

    Knows nothing of scikit-learn: :class:`PatchFeatureExtractor` validates
    the parameters, loads the backbone and builds this.

    Parameters
    ----------
    network : LayerTaps
        The backbone, tapped at ``layers``, with its own parameters.

    layers : tuple of str
        Tapped layers, shallowest first.

    mean, std : tuple of float
        Normalisation of ``[0, 1]`` RGB input.

    patch_size, patch_stride, feature_dim : int
        Of the aggregation (:class:`PatchAggregator`).

    image_size, resize, max_image_size
        The input geometry, as the estimators' parameters of those names.

    device : torch.device
        Where the backbone runs.

    Attributes
    ----------
    network : LayerTaps
        The network with its own parameters, channels-last on ``device``.

    layer_channels : tuple of int
    grid_shape : tuple of int or None
        None with ``resize="keep_aspect"``.
    size_multiple : int or None
        Set with ``resize="keep_aspect"``.
    feature_dim : int
    cache : FeatureCache or None
        Where the layer maps of each backbone pass are looked up and stored;
        None (the default) runs the backbone on every call. The estimators
        set it from their ``memory`` parameter before each use.
    """

    def __init__(
        self,
        network,
        layers,
        mean,
        std,
        *,
        patch_size,
        patch_stride,
        feature_dim,
        image_size,
        resize,
        max_image_size,
        device,
    ):
        self.layers = tuple(layers)
        self.mean, self.std = tuple(mean), tuple(std)
        self.patch_size, self.patch_stride = patch_size, patch_stride
        self.image_size, self.resize = image_size, resize
        self.max_image_size = max_image_size
        self.device = device
        self._set_network(network)
        self.layer_channels = self.grid_shape = self.size_multiple = None
        self.feature_dim = self.aggregator = self._grid_growth = None
        self._requested_dim = feature_dim
        self.cache = None
        self._network_digest = None

    @property
    def keep_aspect(self):
        return isinstance(self.resize, str)

    def _set_network(self, network):
        # Channels-last convolutions (oneDNN on CPU, cuDNN on GPU) are faster
        # and change features in their last float32 bits only.
        self.network = network.to(self.device, memory_format=torch.channels_last)
        self.network.eval()
        # Features are computed by a copy with batch norms folded into the
        # convolutions; ``network`` keeps the backbone's own parameters,
        # which is what a saved extractor stores and loads.
        probe = torch.rand(
            1,
            3,
            *image_size_pair(self.image_size),
            generator=torch.Generator().manual_seed(0),
        ).to(self.device, memory_format=torch.channels_last)
        self._folded = fold_batch_norms(
            self.network, probe, [f"backbone.{name}" for name in self.layers]
        )

    def probe(self):
        """Learn the layers' channels and patch grids from blank images."""
        blank = torch.zeros(1, 3, *image_size_pair(self.image_size), device=self.device)
        with torch.inference_mode():
            maps = self.layer_maps(blank)
        if min(min(m.shape[2:]) for m in maps) < 1:
            raise RuntimeError("a layer map is empty")
        self._set_aggregator(tuple(int(m.shape[1]) for m in maps))
        with torch.inference_mode():
            pooled = self.aggregator(maps)
        self.grid_shape = tuple(int(s) for s in pooled.shape[2:])
        if self.keep_aspect:
            self._probe_growth()
            self.grid_shape = None
        return self

    def restore_grids(self, layer_channels, grid_shape, size_multiple, grid_growth):
        """Take the facts :meth:`probe` learnt from a saved extractor."""
        self._set_aggregator(tuple(layer_channels))
        self.grid_shape, self.size_multiple = grid_shape, size_multiple
        self._grid_growth = grid_growth
        return self

    def grid_facts(self):
        """What :meth:`restore_grids` takes, for saving."""
        return (
            self.layer_channels,
            self.grid_shape,
            self.size_multiple,
            self._grid_growth,
        )

    def _set_aggregator(self, layer_channels):
        self.layer_channels = layer_channels
        self.aggregator = PatchAggregator(
            layer_channels, self._requested_dim, self.patch_size, self.patch_stride
        ).to(self.device)
        self.feature_dim = self.aggregator.feature_dim

    def _probe_growth(self):
        """Learn how the patch grids grow with the input (keep-aspect mode).

        One blank image ``side`` pixels high and ``2 * side`` wide gives each
        layer's patch grid at both lengths: if ``side`` more pixels add ``n``
        grid positions, the layer's grid stride is ``side / n``. The first
        layer's grid, which the features follow, grows linearly between such
        lengths. ``side`` is a power of two times the length the network
        rounds its input to (a vision transformer's patch size, else 1), so
        that no rounding blurs the strides.
        """
        unit = self.network.input_multiple
        # A transformer's grid is its input's sides over the patch size at
        # any size: a small probe spares attention over a large blank image.
        length = max(64, int(self.image_size)) if unit == 1 else 64
        side = unit << (-(-length // unit) - 1).bit_length()
        blank = torch.zeros(1, 3, side, 2 * side, device=self.device)
        try:
            with torch.inference_mode():
                grids = [
                    self.aggregator.pool(m).shape[2:] for m in self.layer_maps(blank)
                ]
        except RuntimeError as exc:
            raise ValueError(
                f"resize='keep_aspect' runs a blank {side} x {2 * side} image "
                "through the backbone to learn its strides, and the backbone "
                f"cannot take it: {str(exc).splitlines()[0]}"
            ) from exc
        # A layer whose grid does not grow (adaptive pooling) sets no stride.
        strides = [side / (long - short) for short, long in grids if long > short]
        self.size_multiple = max(1, round(max(strides, default=1)))
        short, long = grids[0]
        self._grid_growth = (side, int(short), int(long))

    def to(self, device):
        """Move the backbone and the aggregation to ``device``; returns self."""
        if device != self.device:
            self.device = device
            # Folding does not depend on the device: both copies just move.
            for network in (self.network, self._folded):
                network.to(device, memory_format=torch.channels_last)
            self.aggregator = self.aggregator.to(device)
        return self

    def input_settings(self):
        """Keywords of ``input_geometry`` besides ``image_size`` and ``resize``."""
        return dict(
            size_multiple=self.size_multiple or 1, max_image_size=self.max_image_size
        )

    def model_input(self, source):
        """One validated image source as ``(tensor (3, h, w), geometry)``.

        The tensor is the resized (and cropped) RGB image in [0, 1], before
        normalisation, which :meth:`extract` applies.
        """
        return to_model_input(
            load_image(source), self.image_size, self.resize, **self.input_settings()
        )

    def geometry(self, height, width):
        """Where the model input of an image of ``height x width`` lies in it."""
        return input_geometry(
            height, width, self.image_size, self.resize, **self.input_settings()
        )

    def input_grid(self, height, width):
        """Patch grid of a model input of ``height x width`` pixels."""
        if self.grid_shape is not None:
            return self.grid_shape
        side, at_side, at_double = self._grid_growth
        return tuple(
            at_side + (length - side) * (at_double - at_side) // side
            for length in (height, width)
        )

    def patch_counts(self, sources):
        """Number of patch features of each validated image source."""
        if self.grid_shape is not None:
            return np.full(len(sources), math.prod(self.grid_shape), dtype=np.int64)
        counts = []
        # Only the files' headers are read here.
        for source in sources:
            geometry = self.geometry(*source_shape(source))
            counts.append(
                math.prod(self.input_grid(geometry.crop_height, geometry.crop_width))
            )
        return np.array(counts, dtype=np.int64)

    def layer_maps(self, batch):
        """The tapped layers' float32 maps of a normalised batch."""
        with torch.autocast(
            self.device.type,
            dtype=torch.bfloat16,
            enabled=self.device.type in _BFLOAT16_DEVICES,
        ):
            outputs = self._folded(batch)
        maps = [outputs[name] for name in self.layers]
        for name, feature_map in zip(self.layers, maps):
            if not isinstance(feature_map, torch.Tensor):
                raise ValueError(
                    f"Layer {name!r} returns a {type(feature_map).__name__}, not a "
                    "tensor; a feature map (N, C, H, W) is needed."
                )
            if feature_map.ndim != 4:
                raise ValueError(
                    f"Layer {name!r} returns a tensor of shape "
                    f"{tuple(feature_map.shape)}; a feature map (N, C, H, W) is needed."
                )
        return [feature_map.float() for feature_map in maps]

    def extract(self, batch):
        """Patch features (N, h, w, feature_dim) of [0, 1] RGB tensors of one shape."""
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        per_pass = len(batch)
        if self.device.type == "cpu":
            pixels = _CPU_PIXELS_PER_THREAD * torch.get_num_threads()
            per_pass = max(1, pixels // math.prod(batch.shape[2:]))
        with torch.inference_mode():
            inputs = batch.to(self.device, memory_format=torch.channels_last)
            inputs = (inputs - mean) / std
            features = torch.cat(
                [
                    self.aggregator(self._pass_maps(images, pixels))
                    for images, pixels in zip(
                        inputs.split(per_pass), batch.split(per_pass)
                    )
                ]
            )
        return features.permute(0, 2, 3, 1).float().cpu().numpy()

    def _pass_maps(self, images, pixels):
        """:meth:`layer_maps` of one pass, through the cache when there is one.

        ``pixels`` are the pass's ``[0, 1]`` inputs, which key the cache.
        """
        if self.cache is None:
            return self.layer_maps(images)
        keys = image_keys(self._cache_setting(len(images)), pixels)
        return self.cache.layer_maps(
            keys, lambda: self.layer_maps(images), self.device
        )

    def _cache_setting(self, n_images):
        """All that the layer maps of a pass depend on besides its pixels."""
        if self._network_digest is None:
            # Once per engine: it reads every weight of the network.
            self._network_digest = network_digest(self.network)
        device = self.device.type
        if device == "cuda":
            device = torch.cuda.get_device_name(self.device)
        elif device == "cpu":
            device = f"cpu, {torch.get_num_threads()} threads"
        return repr(
            (
                self._network_digest,
                self.layers,
                self.mean,
                self.std,
                self.image_size,
                self.resize,
                self.max_image_size,
                self.size_multiple,
                device,
                self.device.type in _BFLOAT16_DEVICES,
                torch.__version__,
                n_images,
            )
        )

    def batches(self, sources, batch_size):
        """Yield the :class:`FeatureBatch` of each ``batch_size`` validated sources.

        Images are loaded one batch at a time; within a batch, the images of
        each model-input shape go through the backbone together.
        """
        for start in range(0, len(sources), batch_size):
            inputs, geometries = [], []
            for source in sources[start : start + batch_size]:
                tensor, geometry = self.model_input(source)
                inputs.append(tensor)
                geometries.append(geometry)
            yield self._features_of(inputs, geometries)

    def _features_of(self, inputs, geometries):
        by_shape = {}
        for index, tensor in enumerate(inputs):
            by_shape.setdefault(tuple(tensor.shape), []).append(index)
        grids = [None] * len(inputs)
        for (_, height, width), indices in by_shape.items():
            features = self.extract(torch.stack([inputs[i] for i in indices]))
            expected = self.input_grid(height, width)
            if features.shape[1:3] != expected:
                raise ValueError(
                    f"The backbone gives a {features.shape[1]} x "
                    f"{features.shape[2]} patch grid for a {height} x {width} "
                    f"input, where the grids it gave at fit predict "
                    f"{expected[0]} x {expected[1]}: resize='keep_aspect' needs "
                    "a backbone whose feature maps grow in proportion to its "
                    "input, as those of convolutional networks do."
                )
            for i, image_features in zip(indices, features):
                grids[i] = image_features
        if len(by_shape) == 1:
            # One shape: the images are in order in one array already.
            rows = features.reshape(-1, self.feature_dim)
        else:
            rows = np.concatenate([g.reshape(-1, self.feature_dim) for g in grids])
        return FeatureBatch(rows, tuple(g.shape[:2] for g in grids), tuple(geometries))
