"""A disk cache of the backbone's layer maps, one entry per image.

The backbone pass is the costly part of fitting and scoring; everything
after it (the aggregation, the coreset, the search, the maps) is cheap to
run again. A grid search over ``patch_size``, ``coreset_ratio``,
``n_reweight_neighbors``, ``sigma`` or ``contamination`` runs the same
backbone on the same images for every candidate and fold, so the tapped
layers' maps, taken before aggregation, are stored once per image and read
back by every later fit or prediction that needs them.

Entries are stored through a :class:`joblib.Memory` (or an object with its
``cache`` method), so the folder, its clearing (``memory.clear()``) and its
bounding (``memory.reduce_size(bytes_limit=...)``) are joblib's.

The key of an image (:func:`image_keys`) holds everything its maps depend
on: the model input's pixels and shape, a digest of the network (its class,
its structure and every tensor of its state dict), the tapped layers, the
normalisation, the input geometry, the device type and whether the pass runs
under bfloat16 autocast, the torch version, the CPU threads and the number
of images in the backbone pass. Convolution libraries choose their algorithm
by the shape of the batch, and a pass of one image can differ from a pass of
four in the last bits of a float32, so an entry is only reused in a pass of
as many images as the one that computed it: the features are then those
computed without the cache, to the bit.
"""

import hashlib

import numpy as np
import torch


def network_digest(network):
    """Hex digest of a network's class, structure and state-dict tensors.

    Parameters
    ----------
    network : torch.nn.Module
        The network whose outputs are cached.

    Returns
    -------
    str
        Equal for networks with the same modules and the same parameters
        and buffers, to the bit; different weights (a weights file, a
        pretrained tag, random weights, a module passed in) give another.
    """
    digest = hashlib.blake2b(digest_size=20)
    cls = type(network)
    digest.update(f"{cls.__module__}.{cls.__qualname__}\n{network!r}".encode())
    for name, tensor in network.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        # Any dtype, bfloat16 included, as its raw bytes.
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def image_keys(setting, inputs):
    """The cache key of each model input of one backbone pass.

    Parameters
    ----------
    setting : str
        What the maps depend on besides the image: network digest, layers,
        normalisation, geometry, device and pass size.

    inputs : torch.Tensor of shape (n_images, 3, height, width)
        The ``[0, 1]`` RGB model inputs, before normalisation.

    Returns
    -------
    list of str
    """
    inputs = inputs.detach().cpu().contiguous()
    prefix = f"{setting}|{inputs.dtype}|{tuple(inputs.shape)}".encode()
    keys = []
    for image in inputs:
        digest = hashlib.blake2b(prefix, digest_size=20)
        digest.update(image.reshape(-1).view(torch.uint8).numpy())
        keys.append(digest.hexdigest())
    return keys


def _stored_maps(key, compute):
    """The layer maps of the image of ``key``; joblib stores what ``compute`` gives."""
    return compute()


def _to_arrays(maps):
    """One image's maps as plain arrays, each with whether it was channels-last.

    The aggregation runs on tensors of the layout the network gave, as it
    does without the cache: a channels-last map is stored as ``(N, H, W,
    C)`` and viewed back as ``(N, C, H, W)`` with the same strides.
    """
    stored = []
    for feature_map in maps:
        channels_last = not feature_map.is_contiguous() and feature_map.is_contiguous(
            memory_format=torch.channels_last
        )
        if channels_last:
            feature_map = feature_map.permute(0, 2, 3, 1)
        stored.append((feature_map.contiguous().cpu().numpy(), channels_last))
    return tuple(stored)


def _to_maps(per_image, device):
    """The tensors of a pass from the stored maps of its images."""
    maps = []
    for layer in zip(*per_image):
        channels_last = layer[0][1]
        # A copy: joblib may hand back read-only memory maps.
        tensor = torch.from_numpy(np.concatenate([array for array, _ in layer]))
        tensor = tensor.to(device)
        maps.append(tensor.permute(0, 3, 1, 2) if channels_last else tensor)
    return maps


class FeatureCache:
    """Layer maps of images, stored per image in a joblib memory.

    Parameters
    ----------
    memory : joblib.Memory
        Where the entries go: any object with ``joblib.Memory``'s ``cache``
        method, including its ``ignore`` argument.
    """

    def __init__(self, memory):
        self.memory = memory
        self._cached = memory.cache(_stored_maps, ignore=["compute"])

    def layer_maps(self, keys, compute, device):
        """The float32 layer maps of one backbone pass, cached or computed.

        Parameters
        ----------
        keys : list of str
            The key of each image of the pass (:func:`image_keys`).

        compute : callable
            Runs the backbone on the whole pass and returns its list of
            ``(n_images, C, H, W)`` maps; called at most once, when an image
            has no entry yet.

        device : torch.device
            Where the maps are returned.

        Returns
        -------
        list of torch.Tensor
            As ``compute()`` returns them: its own result when it ran, so
            that a pass computed here is the pass computed without a cache.
        """
        computed = []

        def image_maps(index):
            if not computed:
                computed.append(compute())
            return _to_arrays([m[index : index + 1] for m in computed[0]])

        per_image = [
            self._cached(key, lambda i=i: image_maps(i)) for i, key in enumerate(keys)
        ]
        if computed:
            return computed[0]
        return _to_maps(per_image, device)
