import pickle

import joblib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from skpatchcore import PatchFeatureExtractor
from skpatchcore._features import patch_features
from skpatchcore._features.aggregation import adaptive_pool_matrix, channel_projection


class TwoLayers(torch.nn.Module):
    """Layer ``a`` passes the image through; layer ``b`` halves its resolution."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Identity()
        self.b = torch.nn.AvgPool2d(2)

    def forward(self, x):
        return self.b(self.a(x))


def neighbourhood_mean(image, p, stride=1):
    """Eq. 1-3 by hand: p x p neighbourhood sums over p**2, zeros outside the map."""
    height, width, _ = image.shape
    half = p // 2
    out = np.empty_like(image)
    for h in range(height):
        for w in range(width):
            window = image[
                max(0, h - half) : h + half + 1, max(0, w - half) : w + half + 1
            ]
            out[h, w] = window.sum(axis=(0, 1)) / p**2
    return out[::stride, ::stride]


@pytest.mark.parametrize("p, stride", [(1, 1), (3, 1), (5, 2)])
def test_local_aggregation_by_hand(p, stride):
    image = np.random.default_rng(0).random((1, 12, 12, 3)).astype(np.float32)
    extractor = PatchFeatureExtractor(
        TwoLayers(),
        layers=("a",),
        patch_size=p,
        patch_stride=stride,
        image_size=12,
        resize=None,
    ).fit()
    features = extractor.transform(image)[0]
    normalised = (image[0] - np.array(extractor.mean_)) / np.array(extractor.std_)
    np.testing.assert_allclose(
        features, neighbourhood_mean(normalised, p, stride), atol=1e-5
    )


def test_deeper_layer_is_aligned_and_merged():
    image = np.random.default_rng(1).random((1, 16, 16, 3)).astype(np.float32)
    extractor = PatchFeatureExtractor(
        TwoLayers(),
        layers=("a", "b"),
        patch_size=1,
        feature_dim=6,
        image_size=16,
        resize=None,
    ).fit()
    features = extractor.transform(image)[0]
    assert extractor.grid_shape_ == (16, 16) and extractor.feature_dim_ == 6
    normalised = torch.from_numpy(
        ((image[0] - np.array(extractor.mean_)) / np.array(extractor.std_))
        .transpose(2, 0, 1)[None]
        .astype(np.float32)
    )
    deeper = F.interpolate(F.avg_pool2d(normalised, 2), size=(16, 16), mode="bilinear")
    # 3 + 3 channels fit in feature_dim=6: both layers are kept as they are.
    np.testing.assert_allclose(
        features[..., :3], normalised[0].permute(1, 2, 0), atol=1e-5
    )
    np.testing.assert_allclose(features[..., 3:], deeper[0].permute(1, 2, 0), atol=1e-5)


def test_channel_projection_equals_adaptive_pooling():
    rng = np.random.default_rng(2)
    channels, dim = (5, 11), 4
    stacked = rng.normal(size=sum(channels))
    layers = np.split(stacked, [channels[0]])

    def pool(vector, n_out):
        return F.adaptive_avg_pool1d(torch.tensor(vector)[None, None], n_out)[
            0, 0
        ].numpy()

    expected = pool(np.concatenate([pool(v, dim) for v in layers]), dim)
    np.testing.assert_allclose(
        channel_projection(channels, dim) @ stacked, expected, rtol=1e-6
    )
    assert channel_projection(channels, 16) is None
    np.testing.assert_allclose(adaptive_pool_matrix(7, 3).sum(axis=1), 1.0)


@pytest.mark.slow
def test_lite0_features_and_pickle():
    images = np.random.default_rng(3).random((3, 70, 90, 3))
    extractor = PatchFeatureExtractor(
        "efficientnet_lite0", image_size=64, resize=72, batch_size=2
    ).fit()
    features = extractor.transform(images)
    assert features.shape == (3, 8, 8, 152) and features.dtype == np.float32
    assert extractor.layers_ == ("stage3", "stage5")
    restored = pickle.loads(pickle.dumps(extractor))
    np.testing.assert_array_equal(restored.transform(images), features)


def test_parameter_errors():
    with pytest.raises(ValueError, match="odd"):
        PatchFeatureExtractor("efficientnet_lite0", patch_size=4).fit()
    with pytest.raises(ValueError, match="resize"):
        PatchFeatureExtractor("efficientnet_lite0", image_size=64, resize=32).fit()
    with pytest.raises(ValueError, match="layers must be given"):
        PatchFeatureExtractor(TwoLayers()).fit()


@pytest.mark.slow
def test_joblib_round_trip_keeps_only_the_weights_used(tmp_path):
    images = np.random.default_rng(4).random((2, 64, 64, 3))
    torch.manual_seed(0)
    extractor = PatchFeatureExtractor(
        "resnet18", weights=None, feature_dim=64, image_size=64, resize=None
    ).fit()
    features = extractor.transform(images)
    path = tmp_path / "extractor.joblib"
    joblib.dump(extractor, path)

    restored = joblib.load(path)

    np.testing.assert_array_equal(restored.transform(images), features)
    saved = extractor.__getstate__()["model_"]
    expected = {
        key
        for key in torchvision.models.resnet18().state_dict()
        if not key.startswith(("layer4.", "fc."))
    }
    assert saved.keys() == expected
    for key, value in restored.model_.state_dict().items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0)


def _hooks(module):
    return [
        (name, hooks)
        for name, sub in module.named_modules()
        for hooks in (sub._forward_hooks, sub._forward_pre_hooks)
        if hooks
    ]


def test_user_module_is_never_mutated(tmp_path):
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 8, 3, stride=2, padding=1),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 8 * 8, 2),
    )
    structure = [(name, type(sub)) for name, sub in module.named_modules()]
    before = {key: value.clone() for key, value in module.state_dict().items()}
    images = np.random.default_rng(5).random((2, 16, 16, 3))

    extractor = PatchFeatureExtractor(
        module, layers=("0", "2"), image_size=16, resize=None
    ).fit()
    features = extractor.transform(images)
    path = tmp_path / "extractor.joblib"
    joblib.dump(extractor, path)
    np.testing.assert_array_equal(joblib.load(path).transform(images), features)

    assert extractor.backbone is module
    assert isinstance(extractor.model_.backbone[4], torch.nn.Identity)
    assert [(name, type(sub)) for name, sub in module.named_modules()] == structure
    assert _hooks(module) == []
    assert module.training
    assert module.state_dict().keys() == before.keys()
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


class _Tokens(torch.nn.Module):
    """``pair`` returns a tuple of maps; ``tokens`` a (N, L, C) token tensor."""

    def __init__(self):
        super().__init__()
        self.pair = _Pair()
        self.tokens = torch.nn.Flatten(2)

    def forward(self, x):
        return self.tokens(self.pair(x)[0]).transpose(1, 2)


class _Pair(torch.nn.Module):
    def forward(self, x):
        return x, x


@pytest.mark.parametrize(
    "layer, match",
    [
        ("pair", "Layer 'pair' returns a tuple, not a tensor"),
        ("tokens", r"Layer 'tokens' returns a tensor of shape \(1, 3, 64\)"),
    ],
)
def test_layer_output_must_be_a_feature_map(layer, match):
    extractor = PatchFeatureExtractor(
        _Tokens(), layers=(layer,), image_size=8, resize=None
    )
    with pytest.raises(ValueError, match=match):
        extractor.fit()


class _SelfNormalising(torch.nn.Module):
    """``net`` preceded by its own per-channel normalisation."""

    def __init__(self, net, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.net = net

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


def _small_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),
    )


def test_normalization_of_a_module_backbone():
    images = np.random.default_rng(6).random((2, 24, 24, 3))
    mean, std = (0.2, 0.5, 0.7), (0.1, 0.3, 0.6)
    params = dict(layers=("0", "2"), image_size=24, resize=None, feature_dim=16)

    given = PatchFeatureExtractor(
        _small_net(), normalization=(list(mean), np.array(std)), **params
    ).fit()
    wrapped = PatchFeatureExtractor(
        _SelfNormalising(_small_net(), mean, std),
        normalization=((0, 0, 0), (1, 1, 1)),
        **dict(params, layers=("net.0", "net.2")),
    ).fit()
    imagenet = PatchFeatureExtractor(_small_net(), **params).fit()

    assert (given.mean_, given.std_) == (mean, std)
    features = given.transform(images)
    np.testing.assert_allclose(features, wrapped.transform(images), atol=1e-5)
    # The default for a module is ImageNet's, which gives other features.
    assert (imagenet.mean_, imagenet.std_) == (
        (0.485, 0.456, 0.406),
        (0.229, 0.224, 0.225),
    )
    assert not np.allclose(imagenet.transform(images), features, atol=1e-3)


@pytest.mark.slow
def test_normalization_overrides_a_named_backbone():
    normalization = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    params = dict(weights=None, image_size=32, resize=None, feature_dim=8)
    default = PatchFeatureExtractor("efficientnet_lite0", **params).fit()
    given = PatchFeatureExtractor(
        "efficientnet_lite0", normalization=normalization, **params
    ).fit()
    assert (default.mean_, default.std_) == ((0.5,) * 3, (0.5,) * 3)
    assert (given.mean_, given.std_) == normalization
    assert given.get_params()["normalization"] is normalization


@pytest.mark.parametrize(
    "normalization, error, match",
    [
        (((0.5,) * 3,), TypeError, r"pair \(mean, std\)"),
        ((0.5, 0.5), TypeError, "mean must be a sequence of 3 numbers"),
        ((("a", "b", "c"), (1, 1, 1)), TypeError, "mean must be a sequence"),
        (((0, 0, 0), "abc"), TypeError, "std must be a sequence"),
        (((0, 0, 0), (True, 1, 1)), TypeError, "std must be a sequence"),
        (((0.5, 0.5), (1, 1, 1)), ValueError, "mean must have 3 values"),
        (((0, 0, 0), [[1, 1, 1]]), ValueError, "std must have 3 values"),
        (((0, float("nan"), 0), (1, 1, 1)), ValueError, "mean must be finite"),
        (((0, 0, 0), (1, np.inf, 1)), ValueError, "std must be finite"),
        (((0, 0, 0), (1, 0, 1)), ValueError, "std must be positive"),
        (((0, 0, 0), (1, 1, -2)), ValueError, "std must be positive"),
        ("imagenet", ValueError, "'normalization' parameter"),
    ],
)
def test_invalid_normalization(normalization, error, match):
    extractor = PatchFeatureExtractor(
        TwoLayers(), layers=("a",), normalization=normalization, image_size=8
    )
    with pytest.raises(error, match=match):
        extractor.fit()


def test_normalization_survives_pickling():
    images = np.random.default_rng(7).random((2, 24, 24, 3))
    extractor = PatchFeatureExtractor(
        _small_net(),
        layers=("2",),
        normalization=((0.2, 0.5, 0.7), (0.1, 0.3, 0.6)),
        image_size=24,
        resize=None,
    ).fit()
    restored = pickle.loads(pickle.dumps(extractor))
    assert restored.get_params()["normalization"] == extractor.normalization
    assert (restored.mean_, restored.std_) == (extractor.mean_, extractor.std_)
    np.testing.assert_array_equal(
        restored.transform(images), extractor.transform(images)
    )


def normalised(extractor, image):
    return (image - np.array(extractor.mean_)) / np.array(extractor.std_)


def test_tuple_image_size_crops_or_resizes_to_height_and_width():
    image = np.random.default_rng(6).random((16, 30, 3)).astype(np.float32)
    params = dict(layers=("a",), patch_size=1, image_size=(12, 20))
    # Shorter side 16 = resize: no resize, then the centre 12 x 20 window
    # (top (16 - 12) / 2 = 2, left (30 - 20) / 2 = 5).
    cropped = PatchFeatureExtractor(TwoLayers(), resize=16, **params).fit()
    assert cropped.grid_shape_ == (12, 20) and cropped.size_multiple_ is None
    np.testing.assert_allclose(
        cropped.transform(image[None])[0],
        normalised(cropped, image[2:14, 5:25]),
        atol=1e-6,
    )
    # resize=None: an image of exactly (12, 20) goes in as it is.
    whole = PatchFeatureExtractor(TwoLayers(), resize=None, **params).fit()
    np.testing.assert_allclose(
        whole.transform(image[None, :12, :20])[0],
        normalised(whole, image[:12, :20]),
        atol=1e-6,
    )
    assert whole.transform(image[None]).shape == (1, 12, 20, 3)


def test_keep_aspect_takes_the_whole_image_at_its_own_shape():
    image = np.random.default_rng(7).random((10, 24, 3)).astype(np.float32)
    extractor = PatchFeatureExtractor(
        TwoLayers(),
        layers=("a", "b"),
        patch_size=1,
        image_size=10,
        resize="keep_aspect",
    ).fit()
    # Layer b halves the resolution: sides are rounded to multiples of 2,
    # which 10 x 24 already are, so the image is neither resized nor cut.
    assert extractor.size_multiple_ == 2 and extractor.grid_shape_ is None
    (features,) = extractor.transform(image[None])
    assert features.shape == (10, 24, 6)
    np.testing.assert_allclose(
        features[..., :3], normalised(extractor, image), atol=1e-5
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "backbone, layers, patch_stride, expected",
    [
        (TwoLayers(), ("a",), 1, 1),
        (TwoLayers(), ("a", "b"), 1, 2),
        (TwoLayers(), ("a", "b"), 3, 6),
        ("resnet18", None, 1, 16),  # layer3's stride
        ("resnet18", ("layer1", "layer2"), 2, 16),  # layer2's 8, times 2
    ],
)
def test_keep_aspect_size_multiple_is_the_largest_grid_stride(
    backbone, layers, patch_stride, expected
):
    weights = None if isinstance(backbone, str) else "DEFAULT"
    extractor = PatchFeatureExtractor(
        backbone,
        weights=weights,
        layers=layers,
        patch_stride=patch_stride,
        image_size=64,
        resize="keep_aspect",
    ).fit()
    assert extractor.size_multiple_ == expected


@pytest.mark.slow
def test_keep_aspect_grids_follow_each_image_in_one_call():
    rng = np.random.default_rng(8)
    # Three shapes, in an order that mixes them within batches of 4.
    shapes = [(100, 250), (64, 64), (300, 90), (100, 250), (300, 90), (64, 64)]
    images = [rng.random((*shape, 3)).astype(np.float32) for shape in shapes]
    torch.manual_seed(0)
    extractor = PatchFeatureExtractor(
        "resnet18",
        weights=None,
        feature_dim=32,
        image_size=64,
        resize="keep_aspect",
        batch_size=4,
    ).fit()
    features = extractor.transform(images)
    assert isinstance(features, list) and len(features) == len(images)
    # Shorter side to 64 and the longer in proportion, rounded to layer3's
    # stride 16; layer2's grid (stride 8) sets the patches:
    # 100 x 250 -> 64 x 160 -> 8 x 20; 300 x 90 -> 208 x 64 -> 26 x 8.
    expected = {(100, 250): (8, 20), (64, 64): (8, 8), (300, 90): (26, 8)}
    for image, image_features in zip(images, features):
        grid = expected[image.shape[:2]]
        assert image_features.shape == (*grid, 32)
        assert extractor.get_grid_shape(image.shape) == grid
        # Each image as if it came alone: the same features, in its place.
        (alone,) = extractor.transform([image])
        np.testing.assert_allclose(image_features, alone, rtol=1e-5, atol=1e-6)
    # One shape only: still one array per image.
    same = extractor.transform(images[:1] * 2)
    assert isinstance(same, list) and [f.shape for f in same] == [(8, 20, 32)] * 2


@pytest.mark.slow
def test_keep_aspect_max_image_size_caps_the_longer_side():
    extractor = PatchFeatureExtractor(
        "resnet18",
        weights=None,
        image_size=64,
        resize="keep_aspect",
        max_image_size=128,
    ).fit()
    # 100 x 400 would become 64 x 256; capped, 32 x 128 -> 4 x 16 patches.
    assert extractor.get_grid_shape((100, 400)) == (4, 16)
    (features,) = extractor.transform([np.zeros((100, 400), np.uint8)])
    assert features.shape[:2] == (4, 16)
    # The cap bounds every image; a short image keeps image_size.
    assert extractor.get_grid_shape((64, 64, 3)) == (8, 8)


@pytest.mark.slow
def test_keep_aspect_extractor_pickles():
    images = [np.random.default_rng(9).random((70, 150, 3))] * 2
    extractor = PatchFeatureExtractor(
        "efficientnet_lite0", feature_dim=32, image_size=64, resize="keep_aspect"
    ).fit()
    features = extractor.transform(images)
    restored = pickle.loads(pickle.dumps(extractor))
    assert restored.size_multiple_ == extractor.size_multiple_ == 16
    for restored_features, expected in zip(restored.transform(images), features):
        np.testing.assert_array_equal(restored_features, expected)


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(image_size=0), "image_size"),
        (dict(image_size=-3), "image_size"),
        (dict(image_size=2.5), "image_size"),
        (dict(image_size=[64, 64]), "image_size"),
        (dict(image_size=(64,)), r"\(height, width\) tuple.*\(64,\)"),
        (dict(image_size=(64, 64, 3)), r"\(height, width\) tuple"),
        (dict(image_size=(0, 64)), r"positive ints; got \(0, 64\)"),
        (dict(image_size=(-64, 64)), r"positive ints; got \(-64, 64\)"),
        (dict(image_size=(64.0, 64)), r"positive ints; got \(64.0, 64\)"),
        (dict(image_size=(True, 64)), r"positive ints; got \(True, 64\)"),
        (dict(image_size=("64", 64)), r"positive ints"),
        (dict(image_size=(64, 96), resize=60), r"resize=60 must be at least the"),
        (dict(image_size=(64, 96), resize="keep_aspect"), "image_size must be an"),
        (dict(resize="keep_ratio"), "resize"),
        (dict(resize=0), "resize"),
        (dict(max_image_size=0, resize="keep_aspect"), "max_image_size"),
        (dict(max_image_size=128), "with resize='keep_aspect' only"),
        (dict(max_image_size=32, resize="keep_aspect"), "at least image_size=64"),
    ],
)
def test_input_size_errors_are_named(params, match):
    extractor = PatchFeatureExtractor(
        "efficientnet_lite0", **dict(dict(image_size=64, resize=72), **params)
    )
    with pytest.raises(ValueError, match=match):
        extractor.fit()


@pytest.mark.parametrize("image_shape", [(0, 10), (10,), (10.5, 20), "ab"])
def test_get_grid_shape_names_a_bad_shape(image_shape):
    extractor = PatchFeatureExtractor(
        TwoLayers(), layers=("a",), image_size=8, resize="keep_aspect"
    ).fit()
    with pytest.raises(ValueError, match="image_shape must start with"):
        extractor.get_grid_shape(image_shape)


@pytest.mark.slow
def test_bfloat16_backbone_pass(monkeypatch):
    # The GPU runs the backbone under bfloat16 autocast; the same path,
    # forced on the CPU, must give float32 features close to float32 ones.
    images = np.random.default_rng(0).random((2, 64, 64, 3)).astype(np.float32)
    params = dict(backbone="efficientnet_lite0", image_size=64, resize=None)
    expected = PatchFeatureExtractor(**params).fit().transform(images)
    monkeypatch.setattr(patch_features, "_BFLOAT16_DEVICES", ("cpu",))
    found = PatchFeatureExtractor(**params).fit().transform(images)
    assert found.dtype == np.float32
    assert not np.array_equal(found, expected)
    scale = np.abs(expected).max()
    assert np.abs(found - expected).max() < 0.05 * scale
    assert np.corrcoef(found.ravel(), expected.ravel())[0, 1] > 0.99


def test_cpu_backbone_passes_are_capped_whatever_the_batch_size(monkeypatch):
    # Large batches are cut into passes of a few images; the features equal
    # those of one image at a time and come back in the input order.
    monkeypatch.setattr(patch_features, "_CPU_PIXELS_PER_THREAD", 2 * 16 * 16 + 1)
    seen = []
    network = TwoLayers()
    network.a.register_forward_hook(lambda module, args, out: seen.append(len(out)))
    images = np.random.default_rng(0).random((11, 16, 16, 3)).astype(np.float32)
    extractor = PatchFeatureExtractor(
        network, layers=("a", "b"), image_size=16, resize=None, batch_size=11
    ).fit()
    seen.clear()
    features = extractor.transform(images)
    assert max(seen) == min(2 * torch.get_num_threads(), 11)
    assert sum(seen) == len(images)
    singles = np.concatenate(
        [extractor.set_params(batch_size=1).transform(image[None]) for image in images]
    )
    np.testing.assert_allclose(features, singles, rtol=1e-6, atol=1e-7)


def test_device_changed_after_fit_moves_the_engine():
    extractor = PatchFeatureExtractor(
        _small_net(), layers=("0", "2"), image_size=24, resize=None, feature_dim=16
    ).fit()
    engine = extractor._engine
    # The meta device holds no data but takes every tensor: the backbone,
    # its folded copy and the channel projection must all go there.
    engine.to(torch.device("meta"))
    assert {p.device.type for p in engine.network.parameters()} == {"meta"}
    assert {p.device.type for p in engine._folded.parameters()} == {"meta"}
    assert engine.aggregator.projection.device.type == "meta"
    assert engine.device == torch.device("meta")


def test_device_changed_after_fit_is_read_at_the_next_call():
    extractor = PatchFeatureExtractor(
        _small_net(), layers=("2",), image_size=24, resize=None
    ).fit()
    images = np.random.default_rng(3).random((2, 24, 24, 3))
    before = extractor.transform(images)
    network = extractor.model_
    # The same device by another name: read, and nothing moves.
    extractor.set_params(device=torch.device("cpu"))
    np.testing.assert_array_equal(extractor.transform(images), before)
    assert extractor.model_ is network
    with pytest.raises(ValueError, match="device='meta' holds no data"):
        extractor.set_params(device="meta").transform(images)
