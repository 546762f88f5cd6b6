"""Shared fixtures: small real images and fitted detectors."""

from pathlib import Path

import numpy as np
import pytest

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
