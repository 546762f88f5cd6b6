"""ONNX and TorchScript exports score as the detector does, without skpatchcore.

The reference is the detector's own public API on images already at its
model input size (``resize=None``), so that the maps it returns at each
image's resolution are the model-input maps the exported graph returns.
Scores and maps must agree within an absolute 1e-4 (scores are about 10 to
20 here, map values up to about 20).
"""

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import FAST_PARAMS
from PIL import Image
from sklearn.exceptions import NotFittedError

from skpatchcore import PatchCoreDetector
from skpatchcore._conformal import pvalues
from skpatchcore.export import export_onnx, export_torchscript, prepare_images

ATOL = 1e-4

# Runs an ONNX file where neither skpatchcore nor torch can be imported.
ONNX_RUNNER = """
import sys
sys.modules["skpatchcore"] = None
sys.modules["torch"] = None
import numpy as np
import onnxruntime
model, images, out = sys.argv[1:]
session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
scores, maps = session.run(None, {"images": np.load(images)})
np.savez(out, scores=scores, maps=maps)
"""

# Loads a TorchScript file where skpatchcore cannot be imported.
TORCHSCRIPT_RUNNER = """
import json
import sys
sys.modules["skpatchcore"] = None
import numpy as np
import torch
model, images, out = sys.argv[1:]
extra = {"skpatchcore.json": ""}
module = torch.jit.load(model, _extra_files=extra)
with torch.no_grad():
    scores, maps = module(torch.from_numpy(np.load(images)))
np.savez(out, scores=scores.numpy(), maps=maps.numpy())
print(json.dumps(json.loads(extra["skpatchcore.json"])))
"""


@pytest.fixture(scope="module")
def model_inputs(fast_detector, elpv_small):
    """The test cells, good and defective, resized to the model input size."""
    side = fast_detector.image_size
    images = [
        Image.open(path).convert("RGB").resize((side, side), Image.BILINEAR)
        for path in elpv_small.test_images
    ]
    return np.stack([np.asarray(image, dtype=np.float32) / 255 for image in images])


@pytest.fixture(scope="module")
def expected(fast_detector, model_inputs):
    """``score_samples`` and model-input maps from the detector's public API."""
    maps, scores = fast_detector.anomaly_maps(model_inputs, return_score_samples=True)
    maps = np.stack(maps)
    assert maps.shape == model_inputs.shape[:3]
    return scores, maps


def channels_first(images):
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)


@pytest.fixture(scope="module")
def onnx_path(fast_detector, tmp_path_factory):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    path = tmp_path_factory.mktemp("onnx") / "detector.onnx"
    assert export_onnx(fast_detector, path) == path
    return path


@pytest.fixture(scope="module")
def torchscript_path(fast_detector, tmp_path_factory):
    path = tmp_path_factory.mktemp("torchscript") / "detector.pt"
    assert export_torchscript(fast_detector, str(path)) == path
    return path


def run_onnx(path, images):
    import onnxruntime

    session = onnxruntime.InferenceSession(
        str(path), providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"images": channels_first(images)})


def run_torchscript(path, images):
    module = torch.jit.load(path)
    with torch.no_grad():
        scores, maps = module(torch.from_numpy(channels_first(images)))
    return scores.numpy(), maps.numpy()


def assert_same_scoring(outputs, expected, rows=slice(None)):
    scores, maps = outputs
    np.testing.assert_allclose(scores, expected[0][rows], rtol=0, atol=ATOL)
    np.testing.assert_allclose(maps, expected[1][rows], rtol=0, atol=ATOL)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_scores_and_maps_as_the_detector(fmt, request, model_inputs, expected):
    path = request.getfixturevalue(f"{fmt}_path")
    run = run_onnx if fmt == "onnx" else run_torchscript
    assert_same_scoring(run(path, model_inputs), expected)
    # The batch size is free: the graph was recorded with two images.
    assert_same_scoring(run(path, model_inputs[5:6]), expected, slice(5, 6))
    assert_same_scoring(run(path, model_inputs[1:4]), expected, slice(1, 4))


def test_onnx_interface_and_metadata(onnx_path, fast_detector):
    import onnxruntime

    session = onnxruntime.InferenceSession(
        str(onnx_path), providers=["CPUExecutionProvider"]
    )
    side = fast_detector.image_size
    (images,) = session.get_inputs()
    assert images.name == "images"
    assert images.type == "tensor(float)"
    assert images.shape[1:] == [3, side, side]
    assert isinstance(images.shape[0], str)
    assert [output.name for output in session.get_outputs()] == [
        "score_samples",
        "maps",
    ]
    metadata = session.get_modelmeta().custom_metadata_map
    assert float(metadata["offset"]) == fast_detector.offset_
    assert float(metadata["pixel_threshold"]) == fast_detector.pixel_threshold_
    # Enough to compute p-values by hand, as the export's docstring says.
    calibration = np.array(json.loads(metadata["calibration_scores"]))
    scores = fast_detector.calibration_scores_[:3] + 1e-3
    by_hand = (1 + (calibration[None, :] <= scores[:, None]).sum(1)) / (
        len(calibration) + 1
    )
    np.testing.assert_array_equal(
        by_hand, pvalues(fast_detector.calibration_scores_, scores)
    )
    assert (int(metadata["input_height"]), int(metadata["input_width"])) == (side,) * 2


def test_onnx_runs_without_skpatchcore_or_torch(
    onnx_path, model_inputs, expected, tmp_path
):
    np.save(tmp_path / "images.npy", channels_first(model_inputs))
    subprocess.run(
        [sys.executable, "-c", ONNX_RUNNER, onnx_path, "images.npy", "out.npz"],
        cwd=tmp_path,
        check=True,
    )
    outputs = np.load(tmp_path / "out.npz")
    assert_same_scoring((outputs["scores"], outputs["maps"]), expected)


def test_torchscript_loads_without_skpatchcore(
    torchscript_path, fast_detector, model_inputs, expected, tmp_path
):
    np.save(tmp_path / "images.npy", channels_first(model_inputs))
    command = [sys.executable, "-c", TORCHSCRIPT_RUNNER, torchscript_path]
    result = subprocess.run(
        command + ["images.npy", "out.npz"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
    )
    outputs = np.load(tmp_path / "out.npz")
    assert_same_scoring((outputs["scores"], outputs["maps"]), expected)
    metadata = json.loads(result.stdout)
    assert float(metadata["offset"]) == fast_detector.offset_
    assert float(metadata["pixel_threshold"]) == fast_detector.pixel_threshold_


def tiny_detector(image_size, **params):
    """A 1x1-convolution backbone: no channel pooling, 1-pixel patches."""
    defaults = dict(
        backbone=torch.nn.Sequential(torch.nn.Conv2d(3, 4, kernel_size=1)),
        layers=("0",),
        patch_size=1,
        feature_dim=4,
        resize=None,
        coreset_ratio=0.5,
        device="cpu",
        random_state=0,
    )
    return PatchCoreDetector(image_size=image_size, **{**defaults, **params})


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize(
    "fmt, image_size, sigma, n_reweight_neighbors",
    [
        # A Gaussian wider than the image: mirrored more than once.
        ("torchscript", 4, 1.5, 3),
        # No smoothing, no re-weighting, a non-square input.
        ("torchscript", (4, 6), 0.0, 1),
        pytest.param("onnx", (4, 6), 1.5, 3, marks=pytest.mark.slow),
    ],
)
def test_export_follows_the_detectors_settings(
    fmt, image_size, sigma, n_reweight_neighbors, tmp_path
):
    if fmt == "onnx":
        pytest.importorskip("onnxscript")
        pytest.importorskip("onnxruntime")
    height, width = (image_size,) * 2 if isinstance(image_size, int) else image_size
    images = np.random.default_rng(0).random((6, height, width, 3), np.float32)
    detector = tiny_detector(
        image_size, sigma=sigma, n_reweight_neighbors=n_reweight_neighbors
    ).fit(images[:3])
    maps, scores = detector.anomaly_maps(images, return_score_samples=True)
    path = tmp_path / f"detector.{fmt}"
    if fmt == "onnx":
        outputs = run_onnx(export_onnx(detector, path), images)
    else:
        outputs = run_torchscript(export_torchscript(detector, path), images)
    assert_same_scoring(outputs, (scores, np.stack(maps)))


def run_onnx_on_inputs(path, inputs):
    import onnxruntime

    session = onnxruntime.InferenceSession(
        str(path), providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"images": inputs})


def test_prepared_image_files_score_as_the_detector(
    onnx_path, fast_detector, elpv_small
):
    # The 300 x 300 cell files, resized by prepare_images, not by hand.
    paths = elpv_small.test_images
    inputs = prepare_images(fast_detector, paths)
    assert inputs.shape == (len(paths), 3, 64, 64) and inputs.dtype == np.float32
    scores, _ = run_onnx_on_inputs(onnx_path, inputs)
    np.testing.assert_allclose(
        scores, fast_detector.score_samples(paths), rtol=0, atol=ATOL
    )


def test_prepared_images_of_any_kind_score_as_the_detector(tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(0)
    # Resized so that the shorter side is 10, then the centre 8 x 8 cropped.
    detector = tiny_detector(8, resize=10).fit(rng.random((3, 12, 16, 3)))
    path = tmp_path / "gray.png"
    Image.fromarray(rng.integers(0, 256, (20, 14), dtype=np.uint8)).save(path)
    images = [
        rng.integers(0, 256, (12, 16, 3), dtype=np.uint8),
        rng.random((30, 10)),
        path,
        rng.integers(0, 65536, (10, 10, 4), dtype=np.uint16),
    ]
    inputs = prepare_images(detector, images)
    assert inputs.shape == (4, 3, 8, 8)
    scores, _ = run_onnx_on_inputs(export_onnx(detector, tmp_path / "d.onnx"), inputs)
    np.testing.assert_allclose(
        scores, detector.score_samples(images), rtol=0, atol=ATOL
    )


def test_prepared_images_at_the_input_size_are_the_pixels_channels_first():
    rng = np.random.default_rng(0)
    detector = tiny_detector((4, 6)).fit(rng.random((3, 4, 6, 3)))
    images = rng.integers(0, 256, (2, 4, 6, 3), dtype=np.uint8)
    np.testing.assert_allclose(
        prepare_images(detector, images),
        images.transpose(0, 3, 1, 2) / 255.0,
        rtol=0,
        atol=1e-7,
    )
    with pytest.raises(NotFittedError):
        prepare_images(tiny_detector(4), images)
    keep_aspect = tiny_detector(4, resize="keep_aspect").fit(images)
    with pytest.raises(ValueError, match="fixed input shape"):
        prepare_images(keep_aspect, images)


@pytest.mark.parametrize("export", [export_onnx, export_torchscript])
def test_unfitted_detector_is_refused(export, tmp_path):
    with pytest.raises(NotFittedError):
        export(PatchCoreDetector(), tmp_path / "detector")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("algorithm", ["ivf", "pynndescent"])
@pytest.mark.parametrize("export", [export_onnx, export_torchscript])
def test_approximate_search_is_refused(export, algorithm, tmp_path):
    detector = PatchCoreDetector(nn_algorithm=algorithm)
    with pytest.raises(ValueError, match="Only nn_algorithm='exact' can be exported"):
        export(detector, tmp_path / "detector")


@pytest.mark.parametrize("export", [export_onnx, export_torchscript])
def test_approximate_search_chosen_by_auto_is_refused(export, fast_detector, tmp_path):
    # "auto" chose the index for this bank: the graph's exact search would
    # not score as the detector does.
    detector = copy.deepcopy(fast_detector)
    detector.nn_algorithm_ = "ivf"
    with pytest.raises(ValueError, match="Only nn_algorithm='exact' can be exported"):
        export(detector, tmp_path / "detector")
    assert not list(tmp_path.iterdir())


def test_parameters_changed_since_fit_are_refused(fast_detector, tmp_path):
    detector = copy.deepcopy(fast_detector).set_params(sigma=2.0)
    with pytest.raises(ValueError, match="Cannot export: parameters changed"):
        export_torchscript(detector, tmp_path / "detector.pt")


def test_inputs_of_several_shapes_are_refused(tmp_path):
    images = np.random.default_rng(0).random((3, 4, 8, 3))
    detector = tiny_detector(4, resize="keep_aspect").fit(images)
    with pytest.raises(ValueError, match="one fixed input shape"):
        export_torchscript(detector, tmp_path / "detector.pt")


class FlattensByHand(torch.nn.Module):
    """A classifier whose forward needs its pooling layer to have run."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, kernel_size=1)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.pool(self.conv(x)).view(len(x), 4))


def test_backbone_that_cannot_run_to_its_end_is_refused(tmp_path):
    images = np.random.default_rng(0).random((3, 4, 4, 3))
    detector = tiny_detector(4, backbone=FlattensByHand(), layers=("conv",))
    detector.fit(images)
    with pytest.raises(ValueError, match="forward ends at 'conv'"):
        export_torchscript(detector, tmp_path / "detector.pt")


def test_not_a_detector_is_refused(tmp_path):
    with pytest.raises(TypeError, match="detector"):
        export_torchscript("detector.joblib", tmp_path / "detector.pt")


def test_missing_onnx_packages_name_the_extra(fast_detector, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ImportError, match=r'pip install "skpatchcore\[onnx\]"'):
        export_onnx(fast_detector, tmp_path / "detector.onnx")


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize(
    "options",
    [
        dict(distance="cosine"),
        dict(distance="cosine", image_score=0.05),
        dict(image_score="max"),
    ],
)
def test_export_follows_the_scoring_options(
    options, elpv_small, model_inputs, tmp_path
):
    detector = PatchCoreDetector(**dict(FAST_PARAMS, **options))
    detector.fit(elpv_small.train_images)
    maps, scores = detector.anomaly_maps(model_inputs, return_score_samples=True)
    path = export_torchscript(detector, tmp_path / "detector.pt")
    # Cosine distances are below 2: an absolute 1e-4 would say little.
    found_scores, found_maps = run_torchscript(path, model_inputs)
    np.testing.assert_allclose(found_scores, scores, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(found_maps, np.stack(maps), rtol=1e-4, atol=1e-6)
