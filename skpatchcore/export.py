"""Export a fitted detector's scoring to ONNX or TorchScript, for deployment.

The written file holds the whole scoring of a fitted
:class:`~skpatchcore.PatchCoreDetector`, memory bank included, and runs with
onnxruntime or ``torch.jit.load`` alone, without skpatchcore.

Its input ``images`` is a float32 tensor ``(n_images, 3, height, width)``:
RGB values in [0, 1] at the detector's model input size (``image_size`` on
each side), channels first, before normalisation, which the graph applies.
Only the batch size may vary. Resizing and cropping each image to that size
stays outside the graph, as does mapping the maps back onto the original
images: :func:`prepare_images` turns images into that input exactly as the
detector does. Its outputs are ``score_samples`` ``(n_images,)``, as
:meth:`~skpatchcore.PatchCoreDetector.score_samples` gives them (higher is
more normal), and ``maps`` ``(n_images, height, width)``, the anomaly maps on
the model input. The detector's thresholds travel with the file as metadata
(``offset``, ``pixel_threshold``), so that ``score_samples - offset < 0``
flags an anomalous image and ``maps > pixel_threshold`` its anomalous pixels,
with the sorted held-out ``calibration_scores`` (a JSON list), from which an
image's conformal p-value is ``(1 + #{calibration_scores <= score_samples}) /
(len(calibration_scores) + 1)``, as
:meth:`~skpatchcore.PatchCoreDetector.pvalues` computes it.

The ONNX export needs ``onnx`` and ``onnxscript``, and running the file
``onnxruntime``: ``pip install "skpatchcore[onnx]"``.
"""

import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.utils._param_validation import validate_params

from . import __version__
from ._detector import PatchCoreDetector
from ._engine.dense import build_scoring_graph, check_exportable, example_input
from ._images import check_images

__all__ = ["export_onnx", "export_torchscript", "prepare_images"]

_INPUT_NAMES = ["images"]
_OUTPUT_NAMES = ["score_samples", "maps"]

# Name of the metadata file inside a TorchScript archive.
_TORCHSCRIPT_METADATA = "skpatchcore.json"


def _metadata(detector, graph):
    """What a deployment needs beside the graph, as strings."""
    height, width = graph.input_shape
    return {
        "offset": repr(float(detector.offset_)),
        "pixel_threshold": repr(float(detector.pixel_threshold_)),
        # Conformal p-values need the held-out scores, not only the threshold.
        "calibration_scores": json.dumps(
            sorted(float(score) for score in detector.calibration_scores_)
        ),
        "input_height": str(height),
        "input_width": str(width),
        "skpatchcore_version": __version__,
    }


@validate_params(
    {"detector": [PatchCoreDetector], "path": [str, os.PathLike]},
    prefer_skip_nested_validation=True,
)
def export_onnx(detector, path):
    """Write the scoring of a fitted detector as an ONNX model.

    The model takes ``images`` and returns ``score_samples`` and ``maps``, as
    described in :mod:`skpatchcore.export`; its batch size is free.

    Parameters
    ----------
    detector : PatchCoreDetector
        A fitted detector searching exactly (``nn_algorithm_ == "exact"``).
        It is not modified.

    path : str or path-like
        The ``.onnx`` file to write; an existing file is replaced.

    Returns
    -------
    path : pathlib.Path
        The file written.

    Raises
    ------
    ImportError
        If onnx or onnxscript is not installed.
    sklearn.exceptions.NotFittedError
        If ``detector`` is not fitted.
    ValueError
        If ``detector`` searches its bank approximately
        (``nn_algorithm_`` is ``"ivf"`` or ``"pynndescent"``), takes inputs of
        several shapes (``resize="keep_aspect"``), has parameters changed
        since fit, or has a backbone module whose forward pass fails once
        the layers after the last used one are removed.

    See Also
    --------
    export_torchscript : The same graph as a TorchScript archive.

    Notes
    -----
    The graph is recorded by ``torch.onnx.export`` with the ``torch.export``
    based exporter. The memory bank is a constant of the graph, so the file
    grows with the bank, by ``4 * n_features`` bytes per bank feature,
    besides the backbone's weights; past 2 GB, the limit of one ONNX file,
    the constants are written to a second file beside it, which must stay
    next to it. Every patch is compared with the whole bank: a batch takes
    ``4 * n_images * n_patches * n_bank`` bytes of memory for the distances.

    The thresholds are in the model's metadata, as strings:
    ``onnxruntime.InferenceSession(path).get_modelmeta().custom_metadata_map``
    holds ``offset``, ``pixel_threshold``, ``calibration_scores`` (a JSON
    list), ``input_height``, ``input_width`` and ``skpatchcore_version``.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore import PatchCoreDetector
    >>> from skpatchcore.export import export_onnx
    >>> images = np.random.default_rng(0).random((4, 32, 32, 3))
    >>> detector = PatchCoreDetector(
    ...     backbone="efficientnet_lite0", weights=None, image_size=32,
    ...     resize=None, random_state=0).fit(images)
    >>> import tempfile
    >>> from pathlib import Path
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = export_onnx(detector, Path(folder) / "detector.onnx")
    ...     print(path.name)
    detector.onnx
    """
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "Exporting to ONNX needs onnx and onnxscript: "
            'pip install "skpatchcore[onnx]"'
        ) from exc
    graph = build_scoring_graph(detector)
    program = torch.onnx.export(
        graph,
        (example_input(graph),),
        input_names=_INPUT_NAMES,
        output_names=_OUTPUT_NAMES,
        dynamic_shapes={"images": {0: torch.export.Dim("n_images")}},
        dynamo=True,
        verbose=False,
    )
    program.model.metadata_props.update(_metadata(detector, graph))
    path = Path(path)
    # Given the path itself, torch.onnx.export would store the constants in
    # a second file whatever their size; saved here, they go to one only
    # past the 2 GB limit of an ONNX file.
    program.save(path, external_data=False)
    return path


@validate_params(
    {"detector": [PatchCoreDetector], "path": [str, os.PathLike]},
    prefer_skip_nested_validation=True,
)
def export_torchscript(detector, path):
    """Write the scoring of a fitted detector as a TorchScript archive.

    The module takes ``images`` and returns the tuple ``(score_samples,
    maps)``, as described in :mod:`skpatchcore.export`; its batch size is
    free. ``torch.jit.load(path)`` loads it without skpatchcore.

    Parameters
    ----------
    detector : PatchCoreDetector
        A fitted detector searching exactly (``nn_algorithm_ == "exact"``).
        It is not modified.

    path : str or path-like
        The ``.pt`` file to write; an existing file is replaced.

    Returns
    -------
    path : pathlib.Path
        The file written.

    Raises
    ------
    sklearn.exceptions.NotFittedError
        If ``detector`` is not fitted.
    ValueError
        If ``detector`` searches its bank approximately
        (``nn_algorithm_`` is ``"ivf"`` or ``"pynndescent"``), takes inputs of
        several shapes (``resize="keep_aspect"``), has parameters changed
        since fit, or has a backbone module whose forward pass fails once
        the layers after the last used one are removed.

    See Also
    --------
    export_onnx : The same graph as an ONNX model.

    Notes
    -----
    The module is recorded on the CPU by ``torch.jit.trace``; move it with
    ``.to(device)`` after loading. PyTorch deprecates TorchScript (its
    ``torch.jit.load`` warns so): :func:`export_onnx` is the lasting format.
    The file grows with the memory bank as the ONNX one does.

    The thresholds are in the archive's extra file ``skpatchcore.json``::

        extra = {"skpatchcore.json": ""}
        module = torch.jit.load(path, _extra_files=extra)
        metadata = json.loads(extra["skpatchcore.json"])

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore import PatchCoreDetector
    >>> from skpatchcore.export import export_torchscript
    >>> images = np.random.default_rng(0).random((4, 32, 32, 3))
    >>> detector = PatchCoreDetector(
    ...     backbone="efficientnet_lite0", weights=None, image_size=32,
    ...     resize=None, random_state=0).fit(images)
    >>> import tempfile
    >>> from pathlib import Path
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = export_torchscript(detector, Path(folder) / "detector.pt")
    ...     print(path.name)
    detector.pt
    """
    graph = build_scoring_graph(detector)
    path = Path(path)
    with warnings.catch_warnings():
        # Deprecation notices about TorchScript itself, which the user chose
        # by calling this function; its Notes say so.
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning
        )
        # A vision transformer checks its token counts against the input
        # size, which is fixed, and formats them into its messages.
        warnings.filterwarnings(
            "ignore",
            message="Converting a tensor to a Python (boolean|number)",
            category=torch.jit.TracerWarning,
        )
        with torch.no_grad():
            traced = torch.jit.trace(graph, example_input(graph))
        torch.jit.save(
            traced,
            path,
            _extra_files={
                _TORCHSCRIPT_METADATA: json.dumps(_metadata(detector, graph))
            },
        )
    return path


@validate_params(
    {"detector": [PatchCoreDetector], "X": "no_validation"},
    prefer_skip_nested_validation=True,
)
def prepare_images(detector, X):
    """Turn images into the input of a detector's exported graph.

    Each image is read, converted to RGB in [0, 1], resized and centre
    cropped to the detector's model input and put channels first, exactly
    as the detector does before its backbone, so that the exported graph
    scores the result as :meth:`PatchCoreDetector.score_samples` scores the
    images. Normalisation is left to the graph.

    Parameters
    ----------
    detector : PatchCoreDetector
        The fitted detector that was (or will be) exported. It is not
        modified.

    X : array-like, list of images, folder or glob pattern
        Images in any form that :meth:`PatchCoreDetector.score_samples`
        takes. All of them are returned at once: pass a batch at a time.

    Returns
    -------
    images : ndarray of shape (n_images, 3, height, width), dtype=float32
        The graph's ``images`` input, ``height`` and ``width`` those of the
        detector's model input.

    Raises
    ------
    sklearn.exceptions.NotFittedError
        If ``detector`` is not fitted.
    ValueError
        If ``detector`` cannot be exported (see :func:`export_onnx`), or
        ``X`` is not valid image input.

    See Also
    --------
    export_onnx : Write the graph as an ONNX model.
    export_torchscript : Write the graph as a TorchScript archive.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore import PatchCoreDetector
    >>> from skpatchcore.export import prepare_images
    >>> images = np.random.default_rng(0).random((4, 40, 48, 3))
    >>> detector = PatchCoreDetector(
    ...     backbone="efficientnet_lite0", weights=None, image_size=32,
    ...     resize=36, random_state=0).fit(images)
    >>> prepare_images(detector, images[:2]).shape
    (2, 3, 32, 32)
    """
    check_exportable(detector)
    features = detector.feature_extractor_._engine
    inputs = [features.model_input(source)[0] for source in check_images(X)]
    return torch.stack(inputs).numpy().astype(np.float32, copy=False)
