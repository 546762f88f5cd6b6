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
    batch_size=8,
):
    """Fit anomalib's PatchCore on ``train_images`` and score ``test_images``.

    Parameters
    ----------
    train_images, test_images : list of ndarray
        HxWx3 uint8 images (nominal ones for training).
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
    dict
        ``scores``: (n_test,) float64, higher means more anomalous;
        ``maps``: list of (image_size, image_size) float32 arrays on the
        cropped model input; ``fit_seconds``: feature extraction + coreset
        wall time; ``predict_ms_per_image``: scoring wall time per test
        image (including map upsampling and blur, excluding preprocessing);
        ``memory_bank_size``, ``embedding_dim``, ``feature_extractor``
        ("fx" or "hooks"), ``anomalib_version``.
    """
    try:
        import anomalib
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

    def to_batches(images):
        tensors = [
            preprocess(image, image_size=image_size, resize=resize, mean=mean, std=std)
            for image in images
        ]
        return [
            torch.stack(tensors[start : start + batch_size])
            for start in range(0, len(tensors), batch_size)
        ]

    backbone_module.eval()
    model = _build_model(backbone_module, layers, num_neighbors)
    train_batches = to_batches(train_images)
    test_batches = to_batches(test_images)

    # Training: forward in train mode stores patch embeddings (the feature
    # extractor itself is forced to eval mode by anomalib), then coreset.
    start = time.perf_counter()
    model.train()
    with torch.no_grad():
        for batch in train_batches:
            model(batch)
        # Silence the coreset progress bar (a plain pass-through iterator) and
        # anomalib's spurious "Argument embeddings is deprecated" warning.
        with (
            warnings.catch_warnings(),
            mock.patch(
                "anomalib.models.components.sampling.k_center_greedy.tqdm",
                lambda iterable, **kwargs: iterable,
            ),
        ):
            warnings.simplefilter("ignore", DeprecationWarning)
            model.subsample_embedding(coreset_ratio)
    fit_seconds = time.perf_counter() - start

    model.eval()
    scores, maps = [], []
    start = time.perf_counter()
    with torch.no_grad():
        for batch in test_batches:
            output = model(batch)
            scores.append(output.pred_score.reshape(-1).double().numpy())
            maps.extend(m[0].float().numpy() for m in output.anomaly_map)
    predict_seconds = time.perf_counter() - start

    return {
        "scores": np.concatenate(scores) if scores else np.empty(0),
        "maps": maps,
        "fit_seconds": fit_seconds,
        "predict_ms_per_image": 1000.0 * predict_seconds / max(1, len(test_images)),
        "memory_bank_size": int(model.memory_bank.shape[0]),
        "embedding_dim": int(model.memory_bank.shape[1]),
        "feature_extractor": "hooks" if hasattr(model, "fx_fallback_reason") else "fx",
        "anomalib_version": anomalib.__version__,
    }
