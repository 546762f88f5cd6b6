"""Inference copies of feature networks with batch normalisation folded away.

In eval mode a batch normalisation that directly follows a convolution is an
affine map per channel, which the convolution's weights and bias can absorb.
Folding it removes one pass over every feature map and changes the
features by float32 rounding only (times and differences: docs/results.rst,
"Prediction stages on the CPU", *Folding*, from ``benchmarks/speed.py
--parts prediction``).

The pairs are found by watching one forward pass rather than by the
architecture's names, so any backbone qualifies, and nothing is traced
(tracing would break forward passes in other threads, see
:mod:`skpatchcore._features.taps`). A batch norm that also applies an
activation, as timm's ``BatchNormAct2d`` does, leaves that activation in its
place.
"""

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .taps import run_hooked


def _foldable_pairs(network, x, kept):
    """Names of ``(convolution, batch norm)`` pairs safe to fold.

    A pair qualifies when the batch norm's only input is the tensor the
    convolution has just returned, each module runs exactly once, and the
    convolution's own output is not among the outputs that ``network``
    returns (a tapped layer must keep its value). Another consumer of the
    convolution's raw output would see the folded values: no layer of a
    classification backbone does that, and a module whose outputs change
    is caught by the check of :func:`fold_batch_norms`.
    """
    names = {module: name for name, module in network.named_modules()}
    calls, last_output, pairs = {}, {}, []

    def after_other(module, args, output):
        # An in-place layer between the two returns the very same tensor.
        last_output.clear()

    def after_conv(module, args, output):
        calls[module] = calls.get(module, 0) + 1
        last_output["conv"] = (module, output)

    def before_norm(module, args):
        calls[module] = calls.get(module, 0) + 1
        conv, output = last_output.get("conv", (None, None))
        if conv is not None and len(args) == 1 and args[0] is output:
            pairs.append((conv, module))

    handles = []
    for module in names:
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(after_conv))
        elif isinstance(module, nn.BatchNorm2d):
            handles.append(module.register_forward_pre_hook(before_norm))
        elif not any(module.children()):
            handles.append(module.register_forward_hook(after_other))
    run_hooked(network, x, handles)
    return [
        (names[conv], names[norm])
        for conv, norm in pairs
        if calls[conv] == 1 and calls[norm] == 1 and names[conv] not in kept
    ]


def fold_batch_norms(network, x, tapped=()):
    """Return a copy of ``network`` with its batch norms folded into convolutions.

    Parameters
    ----------
    network : torch.nn.Module
        A network in eval mode; it is not modified.
    x : torch.Tensor
        An input batch on which to watch the network run; its outputs are
        compared before and after folding.
    tapped : collection of str, default=()
        Names of submodules whose outputs the caller reads: a convolution
        among them keeps its batch norm.

    Returns
    -------
    torch.nn.Module
        The folded copy, in eval mode; an unfolded copy if the folded
        outputs differ from the network's by more than float32 rounding (a
        batch norm whose input also fed some other layer), or if the
        network does not run on ``x`` or returns anything but float
        tensors.
    """
    try:
        folded = copy.deepcopy(network).eval()
        for conv_name, norm_name in _foldable_pairs(folded, x, set(tapped)):
            conv = folded.get_submodule(conv_name)
            norm = folded.get_submodule(norm_name)
            folded.set_submodule(conv_name, fuse_conv_bn_eval(conv, norm))
            folded.set_submodule(norm_name, _after_normalisation(norm))
        with torch.inference_mode():
            expected, found = _tensors(network(x)), _tensors(folded(x))
    except Exception:
        # A network that cannot run on ``x`` fails again, with the caller's
        # own error message, when it is used.
        expected = found = None
    if expected is None or found is None or len(expected) != len(found):
        return copy.deepcopy(network).eval()
    for reference, result in zip(expected, found):
        scale = reference.abs().max().clamp_min(1.0)
        if reference.shape != result.shape or not torch.allclose(
            reference, result, rtol=0, atol=1e-4 * float(scale)
        ):
            return copy.deepcopy(network).eval()
    return folded


def _after_normalisation(norm):
    """What ``norm`` applies after normalising: its drop and activation, if any.

    timm's ``BatchNormAct2d`` runs ``drop`` then ``act`` on the normalised
    tensor; a plain batch norm runs nothing more. Any other subclass of
    batch norm is left to the output check of :func:`fold_batch_norms`.
    """
    after = [getattr(norm, name, None) for name in ("drop", "act")]
    after = [
        module
        for module in after
        if isinstance(module, nn.Module) and not isinstance(module, nn.Identity)
    ]
    return nn.Sequential(*after) if after else nn.Identity()


def _tensors(outputs):
    """The float tensors of a network's outputs, or None for anything else."""
    if isinstance(outputs, torch.Tensor):
        return [outputs] if outputs.is_floating_point() else None
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    if not isinstance(outputs, (list, tuple)):
        return None
    tensors = []
    for output in outputs:
        found = _tensors(output)
        if found is None:
            return None
        tensors.extend(found)
    return tensors
