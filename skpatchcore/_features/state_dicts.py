"""Weights files: reading a ``torch.save`` state dict safely, loading it whole."""

import os
from collections.abc import Mapping

import torch


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
