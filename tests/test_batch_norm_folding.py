import numpy as np
import pytest
import torch
from torch import nn

from skpatchcore._features.backbones import load_backbone
from skpatchcore._features.batch_norm_folding import fold_batch_norms
from skpatchcore._features.taps import build_feature_network


def _n_batch_norms(module):
    return sum(isinstance(m, nn.BatchNorm2d) for m in module.modules())


def _activations(module):
    return sum(isinstance(m, (nn.ReLU, nn.ReLU6)) for m in module.modules())


def _randomise_statistics(module, seed=0):
    """Give every batch norm non-trivial statistics, as a trained network has."""
    generator = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=generator))
            m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.randn(n, generator=generator))
                m.bias.copy_(torch.randn(n, generator=generator))
    return module


@pytest.fixture
def probe():
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, weights",
    [
        ("efficientnet_lite0", "DEFAULT"),
        ("efficientnet_lite1", None),
        ("efficientnet_lite2", None),
        ("resnet18", None),
    ],
)
def test_folded_network_has_no_batch_norm_and_same_outputs(name, weights, probe):
    module, layers, _, _ = load_backbone(name, weights)
    network = build_feature_network(_randomise_statistics(module), layers, 64)
    folded = fold_batch_norms(network, probe, [f"backbone.{n}" for n in layers])
    assert _n_batch_norms(network) > 0
    assert _n_batch_norms(folded) == 0
    # timm's batch norms apply the activation too: it stays, after the
    # convolution that absorbed the normalisation.
    assert _activations(folded) == _activations(network) > 0
    with torch.inference_mode():
        expected, found = network(probe), folded(probe)
    for layer in layers:
        scale = expected[layer].abs().max()
        np.testing.assert_allclose(
            found[layer], expected[layer], rtol=0, atol=1e-5 * float(scale)
        )


@pytest.mark.slow
def test_network_is_not_modified(probe):
    module, layers, _, _ = load_backbone("resnet18", None)
    network = build_feature_network(module, layers, 64)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    fold_batch_norms(network, probe, [f"backbone.{n}" for n in layers])
    after = network.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_tapped_convolution_keeps_its_batch_norm(probe):
    module, _, _, _ = load_backbone("resnet18", None)
    layers = ("layer1.0.conv2", "layer2")
    network = build_feature_network(_randomise_statistics(module), layers, 64)
    folded = fold_batch_norms(network, probe, [f"backbone.{n}" for n in layers])
    assert isinstance(folded.backbone.layer1[0].bn2, nn.BatchNorm2d)
    assert isinstance(folded.backbone.layer1[0].bn1, nn.Identity)
    with torch.inference_mode():
        expected, found = network(probe), folded(probe)
    scale = float(expected["layer1.0.conv2"].abs().max())
    np.testing.assert_allclose(
        found["layer1.0.conv2"], expected["layer1.0.conv2"], atol=1e-5 * scale
    )


class _SharedConvOutput(nn.Module):
    """The convolution's raw output feeds its batch norm and a second branch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class _InPlaceBetween(nn.Module):
    """An in-place activation sits between the convolution and the batch norm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.act(self.conv(x)))


@pytest.mark.parametrize("network_class", [_SharedConvOutput, _InPlaceBetween])
def test_unsafe_pairs_are_left_alone(network_class, probe):
    torch.manual_seed(0)
    network = _randomise_statistics(network_class()).eval()
    folded = fold_batch_norms(network, probe)
    assert isinstance(folded.bn, nn.BatchNorm2d)
    with torch.inference_mode():
        np.testing.assert_allclose(folded(probe), network(probe), rtol=1e-6)
