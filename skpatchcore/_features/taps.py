"""Feature taps: the outputs of named layers of a backbone, and nothing after.

:func:`check_layers` validates layer names, :class:`LayerTaps` takes the
layers' outputs with forward hooks and :func:`build_feature_network` drops
the submodules that run after the last of them.

Layer outputs are taken with forward hooks on the backbone's own private
copy rather than by ``torch.fx`` tracing: tracing patches
``torch.nn.Module.__call__`` for the whole process while it runs, which
breaks forward passes in other threads (a detector scoring while another
one fits or loads, ``GridSearchCV`` under joblib's threading backend).
"""

import contextlib
import contextvars
import difflib
import functools
import numbers
from collections.abc import Sequence

import torch
from torch import nn

from .token_grids import token_grid_of


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
    token_grid : TokenGrid or None
        The conversion of a vision transformer's tokens to maps; None for
        other backbones.

    Notes
    -----
    :meth:`state_dict` and :meth:`load_state_dict` use the backbone's own
    parameter names, such as ``"layer2.0.conv1.weight"``, without a prefix.
    """

    def __init__(self, backbone, layers):
        super().__init__()
        self.backbone = backbone
        self.layers = check_layers(backbone, layers)
        self.token_grid = token_grid_of(backbone)
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
            more than once), keyed and ordered as ``layers``; for a vision
            transformer, its patch tokens as a map ``(N, C, H / p, W / p)``.

        Raises
        ------
        ValueError
            If a tapped layer did not run.
        """
        if self.token_grid is not None:
            x = self.token_grid.fit_input(x)
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
        if self.token_grid is not None:
            return {
                layer: self.token_grid(outputs[layer], x.shape[-2:])
                for layer in self.layers
            }
        return {layer: outputs[layer] for layer in self.layers}

    @property
    def input_multiple(self):
        """Length that the sides of the backbone's input are rounded to (1: none)."""
        return 1 if self.token_grid is None else self.token_grid.input_multiple

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


def run_hooked(network, x, handles):
    """Run ``network`` on ``x`` once to fire the hooks ``handles``, then remove them."""
    try:
        with torch.inference_mode():
            network(x)
    finally:
        for handle in handles:
            handle.remove()


def _unused_submodules(network, x):
    """List the backbone's submodules that do not run before the last tap.

    Only submodules registered after every one that runs are listed: one
    registered among them may be used through a method other than its
    forward, as the rotary position embeddings of timm's EVA and DINOv3
    models are, and is kept.

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
    run_hooked(network, x, handles)
    named = list(network.backbone.named_modules())
    last_ran = max(index for index, (_, module) in enumerate(named) if module in ran)
    unused = []
    for name, module in named[last_ran + 1 :]:
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
    >>> from skpatchcore._features.backbones import load_backbone
    >>> from skpatchcore._features.taps import build_feature_network
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
