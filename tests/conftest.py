"""Shared fixtures: small real images and fitted detectors."""

from pathlib import Path

import numpy as np
import pytest
import torch

from skpatchcore import PatchCoreDetector
from skpatchcore.datasets import load_elpv

# The MVTec-layout MPDD category lies in the `shared` folder beside the repo
# (development machines and CI); tests that need it skip elsewhere.
MPDD = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mpdd_metal_plate"
)

# Real ImageNet weights, small inputs: seconds per fit on two CPU cores.
FAST_PARAMS = dict(
    backbone="efficientnet_lite0",
    image_size=64,
    resize=None,
    feature_dim=48,
    coreset_ratio=0.25,
    random_state=0,
)


# A fixed random 1x1 convolution as backbone: one feature per pixel, no
# weights to load, milliseconds per fit. With ``image_size`` equal to the
# images' own size, ``resize=None``, 1-pixel patches and every patch kept in
# the bank, the detector's features, distances and maps can be recomputed by
# hand (see ``tiny_features``).
TINY_PARAMS = dict(
    layers=("0",),
    patch_size=1,
    feature_dim=4,
    image_size=8,
    resize=None,
    coreset_ratio=1.0,
    projection_dim=None,
    device="cpu",
    random_state=0,
)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


def tiny_backbone(seed=0):
    """``torch.nn.Sequential`` of one seeded 1x1 convolution from RGB to 4 channels."""
    rng = np.random.RandomState(seed)
    conv = torch.nn.Conv2d(3, 4, kernel_size=1)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(rng.normal(size=(4, 3, 1, 1))))
        conv.bias.copy_(torch.from_numpy(rng.normal(size=4)))
    return torch.nn.Sequential(conv)


def tiny_detector(seed=0, **params):
    """A detector on :func:`tiny_backbone`, with ``TINY_PARAMS`` unless overridden."""
    return PatchCoreDetector(backbone=tiny_backbone(seed), **{**TINY_PARAMS, **params})


def tiny_features(images, seed=0):
    """Per-pixel features of :func:`tiny_backbone`, computed with NumPy.

    ``images`` are float RGB ``(n, h, w, 3)`` in [0, 1]; a module backbone
    sees them normalised with ImageNet's mean and deviation. Returns
    ``(n, h, w, 4)``.
    """
    conv = tiny_backbone(seed)[0]
    weight = conv.weight.detach().numpy()[:, :, 0, 0].astype(np.float64)
    bias = conv.bias.detach().numpy().astype(np.float64)
    normalised = (np.asarray(images, dtype=np.float64) - IMAGENET_MEAN) / IMAGENET_STD
    return normalised @ weight.T + bias


def odd_one_out_images(seed=0):
    """Eight 8 x 8 noisy grey training images, and two test images.

    The first test image is like the training ones; the second has a
    saturated red 2 x 2 block at rows 2-3, columns 5-6.
    """
    rng = np.random.RandomState(seed)
    images = 0.5 + 0.05 * rng.random_sample((10, 8, 8, 3))
    images[9, 2:4, 5:7] = (1.0, 0.0, 0.0)
    return images[:8], images[8:]


# Tests that use these fixtures fit or read the real ELPV cells with real
# ImageNet weights: they are marked slow, so that `pytest -m "not slow"` is a
# quick loop that still reaches every module through synthetic images.
REAL_IMAGE_FIXTURES = frozenset({"elpv_small", "fast_detector", "cell_arrays"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if REAL_IMAGE_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def brute_force_k_center(points, n_samples, start):
    """Algorithm 1 written out with a full distance matrix (toy sizes only)."""
    distances = np.linalg.norm(points[:, None, :] - points[None, :, :], axis=2)
    chosen = [start]
    while len(chosen) < n_samples:
        nearest = distances[:, chosen].min(axis=1)
        nearest[chosen] = -1.0
        chosen.append(int(np.argmax(nearest)))
    return np.array(chosen)


@pytest.fixture(scope="session")
def elpv_small():
    """Real solar cells: 8 good training cells, 4 good and 4 defective test cells."""
    return load_elpv(
        "mono", train_size=8, n_test_normal=4, n_test_defective=4, random_state=0
    )


@pytest.fixture(scope="session")
def fast_detector(elpv_small):
    """A detector fitted on real cells with small inputs; do not modify it."""
    return PatchCoreDetector(**FAST_PARAMS).fit(elpv_small.train_images)


@pytest.fixture
def cell_arrays(elpv_small):
    """The training cells as uint8 arrays (n, 300, 300)."""
    from PIL import Image

    return np.stack([np.asarray(Image.open(p)) for p in elpv_small.train_images])
