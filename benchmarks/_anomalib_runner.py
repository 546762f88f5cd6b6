"""Run anomalib's PatchCore on the same inputs as ``skpatchcore``, for benchmarks.

This helper feeds anomalib's torch-level ``PatchcoreModel`` with exactly the
tensors our estimator sees (same backbone module and weights, same layers,
same resize / centre-crop / normalisation, same coreset ratio), so that a
benchmark compares the two PatchCore implementations and nothing else. It
bypasses anomalib's Lightning ``Engine``, pre-processor and post-processor:
scores and maps are the raw outputs of the torch model (no min-max
normalisation, no thresholding).

Installing anomalib
-------------------
anomalib is *not* a dependency of skpatchcore and must not be installed into
the interpreter used for development (it pulls lightning, timm, kornia, ...
and could upgrade shared packages). Install it into a separate virtual
environment that reuses the system torch/numpy/scikit-learn::

    python3 -m venv --system-site-packages /tmp/anomalib-venv
    /tmp/anomalib-venv/bin/pip install "anomalib==2.7.0"
    /tmp/anomalib-venv/bin/python -c "import anomalib; print(anomalib.__version__)"
    /tmp/anomalib-venv/bin/pip list | grep -E "^(torch|torchvision|numpy|scikit-learn) "

anomalib 2.x declares no torch requirement in its base dependencies (torch
comes through the ``cpu``/``cu1xx`` extras, which must not be requested), so
the already installed torch/torchvision are kept; check with
``/tmp/anomalib-venv/bin/pip list`` that they are unchanged. Then run the
benchmark with ``/tmp/anomalib-venv/bin/python``. Nothing is downloaded at run
time: the backbone is passed in as an ``nn.Module`` with its weights loaded.

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
import time
import warnings
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def preprocess(image, *, image_size, resize, mean, std):
    """One HxWx3 uint8 image -> normalised float32 tensor (3, image_size, image_size).

    Shorter side resized to ``resize`` (bilinear, antialiased, aspect kept,
    the longer side truncated to an integer), centre crop of side
    ``image_size`` (offsets rounded), scaled to [0, 1], then
    ``(x - mean) / std`` per channel. ``resize=None`` resizes straight to
    ``image_size x image_size``. This mirrors ``skpatchcore._images``.
    """
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"expected an HxWx3 image, got shape {array.shape}")
    array = array[:, :, :3]
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    else:
        array = array.astype(np.float32, copy=False)
    height, width = array.shape[:2]
    if resize is None:
        new_h = new_w = image_size
    elif height <= width:
        new_h, new_w = resize, max(1, int(resize * width / height))
    else:
        new_h, new_w = max(1, int(resize * height / width)), resize
    if new_h < image_size or new_w < image_size:
        raise ValueError(f"resize={resize} is smaller than image_size={image_size}")
    tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))[None]
    if (new_h, new_w) != (height, width):
        tensor = F.interpolate(
            tensor,
            size=(new_h, new_w),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )
    top = int(round((new_h - image_size) / 2.0))
    left = int(round((new_w - image_size) / 2.0))
    tensor = tensor[0, :, top : top + image_size, left : left + image_size]
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


def _to_batches(images, *, image_size, resize, mean, std, batch_size):
    """Preprocess ``images`` and yield them as stacked batches."""
    for start in range(0, len(images), batch_size):
        yield torch.stack(
            [
                preprocess(
                    image, image_size=image_size, resize=resize, mean=mean, std=std
                )
                for image in images[start : start + batch_size]
            ]
        )


def fit_anomalib_patchcore(
    train_images,
    *,
    backbone_module,
    layers,
    mean,
    std,
    image_size=224,
    resize=256,
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
        Centre-crop side and shorter-side resize (see :func:`preprocess`).
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
    fit_seconds : float
        Wall time of preprocessing, feature extraction and coreset
        selection, the same work that ``PatchCoreDetector.fit`` times
        (which also calibrates its thresholds).
    """
    try:
        import anomalib  # noqa: F401
    except ImportError as exc:  # pragma: no cover - environment problem
        raise ImportError(
            "anomalib is not installed in this interpreter; see the docstring of "
            "benchmarks/_anomalib_runner.py (use /tmp/anomalib-venv/bin/python)."
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
    start = time.perf_counter()
    model.train()
    with torch.no_grad():
        for batch in _to_batches(
            train_images,
            image_size=image_size,
            resize=resize,
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
    fit_seconds = time.perf_counter() - start
    model.eval()
    return model, fit_seconds


def predict_anomalib_patchcore(
    model, test_images, *, mean, std, image_size=224, resize=256, batch_size=16
):
    """Score ``test_images`` with a fitted anomalib ``PatchcoreModel``.

    Parameters
    ----------
    model : PatchcoreModel
        As returned by :func:`fit_anomalib_patchcore`.
    test_images : list of ndarray
        HxW or HxWx3 uint8 images.
    mean, std, image_size, resize, batch_size
        As given to :func:`fit_anomalib_patchcore`.

    Returns
    -------
    scores : ndarray of shape (n_test,)
        Float64 image scores, higher means more anomalous.
    maps : list of ndarray of shape (image_size, image_size)
        Float32 anomaly maps on the cropped model input.
    seconds : float
        Wall time of preprocessing and of the forward passes (one per batch,
        giving scores and maps together, map upsampling and blur included).
    """
    scores, maps = [], []
    start = time.perf_counter()
    with torch.no_grad():
        for batch in _to_batches(
            test_images,
            image_size=image_size,
            resize=resize,
            mean=mean,
            std=std,
            batch_size=batch_size,
        ):
            output = model(batch)
            scores.append(output.pred_score.reshape(-1).double().numpy())
            maps.extend(m[0].float().numpy() for m in output.anomaly_map)
    seconds = time.perf_counter() - start
    return np.concatenate(scores), maps, seconds


def run_anomalib_patchcore(
    train_images,
    test_images,
    *,
    backbone_module,
    layers,
    mean,
    std,
    image_size=224,
    resize=256,
    coreset_ratio=0.1,
    num_neighbors=9,
    seed=0,
    batch_size=16,
):
    """Fit anomalib's PatchCore on ``train_images`` and score ``test_images``.

    Parameters are those of :func:`fit_anomalib_patchcore`, plus
    ``test_images`` (HxW or HxWx3 uint8 images to score).

    Returns
    -------
    dict
        ``scores``: (n_test,) float64, higher means more anomalous;
        ``maps``: list of (image_size, image_size) float32 arrays on the
        cropped model input; ``fit_seconds``: preprocessing + feature
        extraction + coreset wall time; ``predict_ms_per_image``:
        preprocessing + scoring wall time per test image (map upsampling and
        blur included); ``memory_bank_size``, ``embedding_dim``,
        ``feature_extractor`` ("fx" or "hooks"), ``anomalib_version``.
    """
    import anomalib

    model, fit_seconds = fit_anomalib_patchcore(
        train_images,
        backbone_module=backbone_module,
        layers=layers,
        mean=mean,
        std=std,
        image_size=image_size,
        resize=resize,
        coreset_ratio=coreset_ratio,
        num_neighbors=num_neighbors,
        seed=seed,
        batch_size=batch_size,
    )
    scores, maps, predict_seconds = predict_anomalib_patchcore(
        model,
        test_images,
        mean=mean,
        std=std,
        image_size=image_size,
        resize=resize,
        batch_size=batch_size,
    )
    return {
        "scores": scores,
        "maps": maps,
        "fit_seconds": fit_seconds,
        "predict_ms_per_image": 1000.0 * predict_seconds / max(1, len(test_images)),
        "memory_bank_size": int(model.memory_bank.shape[0]),
        "embedding_dim": int(model.memory_bank.shape[1]),
        "feature_extractor": "hooks" if hasattr(model, "fx_fallback_reason") else "fx",
        "anomalib_version": anomalib.__version__,
    }
