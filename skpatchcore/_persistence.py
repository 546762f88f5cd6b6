"""Fitted state that both pickle and skops can store: no torch objects.

:mod:`pickle` (and joblib) store any object and run whatever code a file
names when it is loaded. :mod:`skops.io` stores only the types it knows
(builtins, NumPy and SciPy arrays, scikit-learn estimators) and creates no
other object unless the user trusts its type. Torch tensors and devices, and
the compiled functions of a pynndescent index, are none of those, so the
estimators hand both libraries the same state made of plain data instead:

- :class:`TensorDict`, the weights of the extractor's network, kept as
  tensors in memory and stored as NumPy arrays;
- :class:`PortableModule`, a user's :class:`torch.nn.Module`, stored as the
  classes of its submodules, their plain attributes and their weights as
  NumPy arrays;
- :func:`index_state`, the data of a pynndescent index without its compiled
  functions, which pynndescent compiles again on loading.

The network of a backbone given by name is never stored: the extractor
builds it again from the name and its layers, and loads the stored weights.
"""

import weakref
from collections.abc import Mapping

import numpy as np
import scipy.sparse
import torch
from torch import nn

# Integer dtypes by byte width: tensors of a dtype that NumPy lacks, such as
# bfloat16, are stored bit for bit as integers of the same width.
_SAME_WIDTH_INTEGERS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _pack(tensor):
    """A CPU tensor as ``(array, dtype)``; ``dtype`` names a dtype NumPy lacks."""
    tensor = tensor.detach().cpu()
    try:
        return tensor.numpy(), None
    except TypeError:
        bits = tensor.view(_SAME_WIDTH_INTEGERS[tensor.element_size()])
        return bits.numpy(), str(tensor.dtype).removeprefix("torch.")


def _unpack(packed):
    """The CPU tensor that :func:`_pack` stored, in memory of its own."""
    if not (isinstance(packed, tuple) and len(packed) == 2):
        raise TypeError(
            f"Expected a stored tensor (array, dtype name or None), got {packed!r}."
        )
    array, dtype = packed
    if not isinstance(array, np.ndarray):
        raise TypeError(
            f"Expected the stored tensor as a NumPy array, got {type(array).__name__}."
        )
    # A copy: arrays that joblib memory-maps are read-only.
    tensor = torch.from_numpy(np.array(array))
    if dtype is None:
        return tensor
    torch_dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else None
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"Unknown torch dtype {dtype!r} for a stored tensor.")
    return tensor.view(torch_dtype)


class TensorDict(Mapping):
    """Named CPU tensors, such as a state dict, stored as NumPy arrays.

    Parameters
    ----------
    tensors : Mapping of str to torch.Tensor
        The tensors, kept as they are in memory.
    """

    def __init__(self, tensors):
        self._tensors = dict(tensors)

    def __getitem__(self, name):
        return self._tensors[name]

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self):
        return len(self._tensors)

    def __getstate__(self):
        return {name: _pack(tensor) for name, tensor in self._tensors.items()}

    def __setstate__(self, state):
        if not isinstance(state, Mapping):
            raise TypeError(
                f"Expected a mapping of names to stored tensors, got {state!r}."
            )
        self._tensors = {name: _unpack(packed) for name, packed in state.items()}


# The PortableModule of each module, by id, while anything holds it (such as
# the memo of a pickler that is storing it): a module referred to from several
# places, such as a detector's parameters and its extractor's, is then stored
# once and loads as one object, as with plain pickle.
_PORTABLE_MODULES = weakref.WeakValueDictionary()


class PortableModule:
    """A torch module stored as its classes, attributes and NumPy arrays.

    Pickling a module pickles its tensors, which skops cannot store. This
    stands in for a module in the state of an estimator instead: it stores
    the class of the module and of each submodule, their other attributes
    (sizes, flags, hooks) as they are, and their parameters, buffers and
    tensor attributes as NumPy arrays. Loading creates each class without
    calling its ``__init__`` and restores its ``__dict__``, as pickle does,
    so skops asks the user to trust every module class in it.

    Parameters
    ----------
    module : torch.nn.Module
        The module to store; on loading, the module rebuilt on the CPU.
    """

    def __init__(self, module):
        self.module = module
        self._packed = {}

    def _pack(self, key, tensor):
        """:func:`_pack`, the same arrays again while ``tensor`` is unchanged.

        skops asks for the state of each reference to the module (a detector
        holds its backbone three times), and stores an array once only if it
        is the same object each time.
        """
        try:
            version = tensor._version
        except RuntimeError:  # Inference tensors have no version counter.
            return _pack(tensor)
        cached = self._packed.get(key)
        if cached is None or cached[0] is not tensor or cached[1] != version:
            cached = self._packed[key] = (tensor, version, _pack(tensor))
        return cached[2]

    def __getstate__(self):
        module = self.module
        attributes = dict(module.__dict__)
        parameters, frozen = {}, []
        for name, parameter in attributes.pop("_parameters").items():
            if parameter is None:
                parameters[name] = None
                continue
            parameters[name] = self._pack(("parameter", name), parameter)
            if not parameter.requires_grad:
                frozen.append(name)
        buffers = {
            name: None if buffer is None else self._pack(("buffer", name), buffer)
            for name, buffer in attributes.pop("_buffers").items()
        }
        tensors = {
            name: self._pack(("attribute", name), attributes.pop(name))
            for name, value in list(attributes.items())
            if isinstance(value, torch.Tensor)
        }
        children = {
            name: None if child is None else portable(child)
            for name, child in attributes.pop("_modules").items()
        }
        return {
            "type": type(module),
            "attributes": attributes,
            "parameters": parameters,
            "frozen": frozen,
            "buffers": buffers,
            "tensors": tensors,
            "modules": children,
        }

    def __setstate__(self, state):
        cls = state["type"]
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"Expected a torch.nn.Module subclass, got {cls!r}.")
        for name, child in state["modules"].items():
            if child is not None and not isinstance(child, PortableModule):
                raise TypeError(
                    f"Expected submodule {name!r} stored as a PortableModule, "
                    f"got {type(child).__name__}."
                )
        frozen = set(state["frozen"])
        module = cls.__new__(cls)
        # torch's own __setstate__, the counterpart of reading __dict__.
        nn.Module.__setstate__(
            module,
            {
                **state["attributes"],
                **{name: _unpack(packed) for name, packed in state["tensors"].items()},
                "_parameters": {
                    name: None
                    if packed is None
                    else nn.Parameter(_unpack(packed), requires_grad=name not in frozen)
                    for name, packed in state["parameters"].items()
                },
                "_buffers": {
                    name: None if packed is None else _unpack(packed)
                    for name, packed in state["buffers"].items()
                },
                "_modules": {
                    name: None if child is None else child.module
                    for name, child in state["modules"].items()
                },
            },
        )
        self.module = module
        self._packed = {}


def portable(value):
    """Stand a :class:`PortableModule` in for ``value`` if it is a module.

    Parameters
    ----------
    value : object
        A parameter value, such as ``backbone``.

    Returns
    -------
    object
        The same PortableModule for the same module; any other value as it
        is.
    """
    if not isinstance(value, nn.Module):
        return value
    wrapper = _PORTABLE_MODULES.get(id(value))
    if wrapper is None or wrapper.module is not value:
        wrapper = PortableModule(value)
        _PORTABLE_MODULES[id(value)] = wrapper
    return wrapper


def restore(value):
    """The module of a loaded :class:`PortableModule`; any other value as it is.

    Parameters
    ----------
    value : object
        A loaded parameter value.

    Returns
    -------
    object
        ``value.module`` for a PortableModule, else ``value``.
    """
    return value.module if isinstance(value, PortableModule) else value


def index_state(index):
    """The data of a pynndescent index, without its compiled functions.

    Parameters
    ----------
    index : pynndescent.NNDescent or None
        A prepared index.

    Returns
    -------
    dict or pynndescent.NNDescent or None
        The index's own pickled state less its numba functions, which its
        ``__setstate__`` compiles again, and with its CSR graphs as their
        NumPy arrays, which skops stores without trusting a SciPy type.
        None stays None. A pynndescent too old to compile its distance
        function on loading gets its index back as it is, for pickle only.
    """
    if index is None or not hasattr(index, "_set_distance_func"):
        return index
    from numba.core.dispatcher import Dispatcher

    state, sparse = {}, {}
    for name, value in index.__getstate__().items():
        if isinstance(value, Dispatcher):
            continue
        if isinstance(value, (scipy.sparse.csr_array, scipy.sparse.csr_matrix)):
            sparse[name] = (
                isinstance(value, scipy.sparse.csr_array),
                value.data,
                value.indices,
                value.indptr,
                value.shape,
            )
        else:
            state[name] = value
    return {"state": state, "sparse": sparse}


def restore_index(stored):
    """The pynndescent index that :func:`index_state` stored.

    Parameters
    ----------
    stored : dict or pynndescent.NNDescent or None
        As returned by :func:`index_state`.

    Returns
    -------
    pynndescent.NNDescent or None
        The index, ready to query.
    """
    if not isinstance(stored, dict):
        return stored
    from pynndescent import NNDescent

    state = dict(stored["state"])
    for name, (is_array, data, indices, indptr, shape) in stored["sparse"].items():
        csr = scipy.sparse.csr_array if is_array else scipy.sparse.csr_matrix
        state[name] = csr((data, indices, indptr), shape=shape)
    index = NNDescent.__new__(NNDescent)
    index.__setstate__(state)
    return index
