import pickle

import joblib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from skpatchcore import PatchFeatureExtractor
from skpatchcore._feature_extractor import adaptive_pool_matrix, channel_projection


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
