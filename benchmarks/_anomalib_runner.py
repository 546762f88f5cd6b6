"""Run anomalib's PatchCore on the same inputs as ``skpatchcore``, for benchmarks.

This helper feeds anomalib's torch-level ``PatchcoreModel`` with exactly the
tensors our estimator sees (same backbone module and weights, same layers,
same resize / centre-crop / normalisation, same coreset ratio), so that a
benchmark compares the two PatchCore implementations and nothing else. It
bypasses anomalib's Lightning ``Engine``, pre-processor and post-processor:
scores and maps are the raw outputs of the torch model (no min-max
normalisation, no thresholding).

anomalib is not a dependency of skpatchcore: ``benchmarks/README.rst`` says
how to install it into a separate virtual environment that keeps this torch.

What anomalib 2.7.0's PatchCore does (for reading the results)
--------------------------------------------------------------
* features: the requested layers are read with torchvision's FX
  ``create_feature_extractor`` (the backbone must be FX-traceable; otherwise
  this module falls back to forward hooks), each map is averaged with
  ``AvgPool2d(3, stride=1, padding=1)`` (zero padding counted), deeper maps
  are bilinearly resized to the first layer's grid and concatenated along
  channels. No projection of the feature dimension.
* memory bank: k-center greedy on a sparse random projection
  (Johnson-Lindenstrauss size for ``eps=0.9``), one random start point that
  is kept in the coreset, ``int(n * ratio)`` points.
* patch score: Euclidean (not squared) distance to the nearest bank entry.
* image score: paper eq. 7 re-weighting of the maximum patch score, with
  ``N_b(m*)`` the ``num_neighbors`` nearest bank entries of ``m*`` (``m*``
  itself included) and a softmax over Euclidean distances.
* anomaly map: nearest-neighbour upsampling of the patch-score grid to the
  input size, then a Gaussian blur (sigma 4, 33x33 kernel, reflect padding).
"""

import contextlib
import os
import warnings
from unittest import mock

import numpy as np
import torch
from _internals import load_image, to_model_input
from torch import nn


def preprocess(image, *, image_size, resize, mean, std, size_multiple=1):
    """One image -> normalised float32 tensor (3, height, width).

    skpatchcore's own loading, resize and centre crop (or, with
    ``resize="keep_aspect"``, its aspect-kept resize with sides rounded to
    ``size_multiple``), then ``(x - mean) / std`` per channel, so that
    anomalib sees exactly the estimator's input.
    """
    tensor, _ = to_model_input(
        load_image(np.asarray(image)), image_size, resize, size_multiple=size_multiple
    )
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return ((tensor - mean_t) / std_t).contiguous()


class _HookFeatureExtractor(nn.Module):
    """Stand-in for torchvision's FX feature extractor, using forward hooks.

    Only used when ``backbone_module`` cannot be FX-traced. It runs the whole
    backbone and returns ``{layer_name: output}`` for the requested
    sub-modules.
    """

    def __init__(self, backbone, return_nodes):
        super().__init__()
        self.backbone = backbone
        self.names = list(return_nodes)
        self._outputs = {}
        modules = dict(backbone.named_modules())
        missing = [name for name in self.names if name not in modules]
        if missing:
            raise ValueError(f"backbone has no sub-module(s) {missing}")
        for name in self.names:
            modules[name].register_forward_hook(self._make_hook(name))

    def _make_hook(self, name):
        def hook(module, inputs, output):
            self._outputs[name] = output

        return hook

    def forward(self, x):
        self._outputs = {}
        self.backbone(x)
        return {name: self._outputs[name] for name in self.names}


def _build_model(backbone_module, layers, num_neighbors):
    """anomalib ``PatchcoreModel`` around an in-memory backbone (no download)."""
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    try:
        return PatchcoreModel(
            layers=list(layers), backbone=backbone_module, num_neighbors=num_neighbors
        )
    except Exception as exc:  # FX tracing failed: fall back to forward hooks.
        fx_error = exc
    target = (
        "anomalib.models.components.feature_extractors.timm.create_feature_extractor"
    )
    with mock.patch(
        target, lambda model, return_nodes: _HookFeatureExtractor(model, return_nodes)
    ):
        model = PatchcoreModel(
            layers=list(layers), backbone=backbone_module, num_neighbors=num_neighbors
        )
    model.fx_fallback_reason = repr(fx_error)
    return model


def _to_batches(images, *, batch_size, **settings):
    """Preprocess ``images`` and yield them, in order, as stacked batches.

    Aspect-kept inputs of images of different shapes differ in size: a batch
    ends early where the size changes, as a batch tensor needs one size.
    """
    batch = []
    for image in images:
        tensor = preprocess(image, **settings)
        if batch and (len(batch) == batch_size or tensor.shape != batch[0].shape):
            yield torch.stack(batch)
            batch = []
        batch.append(tensor)
    if batch:
        yield torch.stack(batch)


def fit_anomalib_patchcore(
    train_images,
    *,
    backbone_module,
    layers,
    mean,
    std,
    image_size=224,
    resize=256,
    size_multiple=1,
    coreset_ratio=0.1,
    num_neighbors=9,
    seed=0,
    batch_size=16,
):
    """Fit anomalib's PatchCore on the nominal ``train_images``.

    Parameters
    ----------
    train_images : list of ndarray
        HxW or HxWx3 uint8 images, all nominal.
    backbone_module : torch.nn.Module
        The backbone, weights already loaded (shared, not copied; it is put
        in eval mode). Must expose the ``layers`` as named sub-modules.
    layers : sequence of str
        Sub-module names whose outputs are the features, shallowest first.
    mean, std : sequence of 3 floats
        Input normalisation of the backbone.
    image_size, resize : int
        Centre-crop side and shorter-side resize (see :func:`preprocess`);
        ``resize`` may also be None (squash) or ``"keep_aspect"``.
    size_multiple : int
        With ``resize="keep_aspect"``, what the input sides are rounded to.
    coreset_ratio : float
        Fraction of training patches kept in the memory bank.
    num_neighbors : int
        ``b`` of the image-score re-weighting (1 disables it).
    seed : int
        Seeds torch and numpy's global RNGs (the coreset start point and the
        random projection draw from them).
    batch_size : int
        Images per forward pass.

    Returns
    -------
    model : PatchcoreModel
        The fitted torch model, in eval mode.
    """
    try:
        import anomalib  # noqa: F401
    except ImportError as exc:  # pragma: no cover - environment problem
        raise ImportError(
            "anomalib is not installed in this interpreter; see "
            "benchmarks/README.rst (use /tmp/anomalib-venv/bin/python)."
        ) from exc

    # anomalib draws the coreset start point from torch's global RNG and the
    # random projection from torch's and numpy's global RNGs (scikit-learn's
    # sample_without_replacement with random_state=None).
    torch.manual_seed(seed)
    np.random.seed(seed)  # noqa: NPY002

    backbone_module.eval()
    model = _build_model(backbone_module, layers, num_neighbors)

    # Training: forward in train mode stores patch embeddings (the feature
    # extractor itself is forced to eval mode by anomalib), then coreset.
    model.train()
    with torch.no_grad():
        for batch in _to_batches(
            train_images,
            image_size=image_size,
            resize=resize,
            size_multiple=size_multiple,
            mean=mean,
            std=std,
            batch_size=batch_size,
        ):
            model(batch)
        # Silence the coreset progress bar and anomalib's spurious "Argument
        # embeddings is deprecated" warning. The bar is sent to the null
        # device rather than replaced, so anomalib runs its own code: its
        # memory use in this loop depends on how the allocator interleaves the
        # bar's small objects with the large distance temporaries.
        with (
            warnings.catch_warnings(),
            open(os.devnull, "w") as devnull,
            contextlib.redirect_stderr(devnull),
        ):
            warnings.simplefilter("ignore", DeprecationWarning)
            model.subsample_embedding(coreset_ratio)
    model.eval()
    return model


def predict_anomalib_patchcore(
    model,
    test_images,
    *,
    mean,
    std,
    image_size=224,
    resize=256,
    size_multiple=1,
    batch_size=16,
):
    """Score ``test_images`` with a fitted anomalib ``PatchcoreModel``.

    Parameters
    ----------
    model : PatchcoreModel
        As returned by :func:`fit_anomalib_patchcore`.
    test_images : list of ndarray
        HxW or HxWx3 uint8 images.
    mean, std, image_size, resize, size_multiple, batch_size
        As given to :func:`fit_anomalib_patchcore`.

    Returns
    -------
    scores : ndarray of shape (n_test,)
        Float64 image scores, higher means more anomalous.
    maps : list of ndarray
        Float32 anomaly maps on the model input (the crop), from the same
        forward passes (one per batch) as the scores.
    """
    scores, maps = [], []
    with torch.no_grad():
        for batch in _to_batches(
            test_images,
            image_size=image_size,
            resize=resize,
            size_multiple=size_multiple,
            mean=mean,
            std=std,
            batch_size=batch_size,
        ):
            output = model(batch)
            scores.append(output.pred_score.reshape(-1).double().numpy())
            maps.extend(m[0].float().numpy() for m in output.anomaly_map)
    return np.concatenate(scores), maps
