"""The distance and image-score options, against brute-force NumPy."""

import math

import numpy as np
import pytest
from conftest import FAST_PARAMS, odd_one_out_images, tiny_detector, tiny_features

from skpatchcore import PatchCoreDetector, PatchCoreEnsemble


def brute_force_patch_distances(detector, images, cosine):
    """Each patch's distance to its nearest bank entry, by a full matrix."""
    features = detector.feature_extractor_.transform(images)
    rows = features.reshape(len(features), -1, features.shape[-1]).astype(np.float64)
    bank = detector.memory_bank_.astype(np.float64)
    if cosine:
        rows = rows / np.linalg.norm(rows, axis=2, keepdims=True)
        return 1.0 - (rows @ bank.T).max(axis=2)
    squared = (rows**2).sum(2)[..., None] - 2 * rows @ bank.T + (bank**2).sum(1)
    return np.sqrt(np.maximum(squared, 0).min(axis=2))


@pytest.fixture(scope="module")
def cosine_max(elpv_small):
    params = dict(FAST_PARAMS, distance="cosine", image_score="max")
    return PatchCoreDetector(**params).fit(elpv_small.train_images)


def test_cosine_bank_holds_unit_vectors(cosine_max):
    norms = np.linalg.norm(cosine_max.memory_bank_, axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)


def test_cosine_max_is_the_largest_one_minus_cos(cosine_max, elpv_small):
    images = elpv_small.test_images
    expected = brute_force_patch_distances(cosine_max, images, cosine=True).max(1)
    np.testing.assert_allclose(-cosine_max.score_samples(images), expected, atol=2e-5)


@pytest.mark.parametrize("fraction", [0.01, 0.1, 1.0])
def test_top_fraction_is_the_mean_of_the_largest_patches(
    fast_detector, elpv_small, fraction
):
    detector = PatchCoreDetector(**dict(FAST_PARAMS, image_score=fraction))
    detector.fit(elpv_small.train_images)
    # The bank does not depend on the image score.
    np.testing.assert_array_equal(detector.memory_bank_, fast_detector.memory_bank_)
    images = elpv_small.test_images
    distances = brute_force_patch_distances(detector, images, cosine=False)
    k = max(1, math.ceil(fraction * distances.shape[1]))
    expected = np.sort(distances, axis=1)[:, -k:].mean(axis=1)
    np.testing.assert_allclose(-detector.score_samples(images), expected, rtol=1e-4)


def test_cosine_maps_hold_cosine_distances(cosine_max, elpv_small):
    # Without smoothing, bilinear resizing never exceeds the largest patch
    # distance and comes close to it; Euclidean maps would be far larger.
    detector = PatchCoreDetector(
        **dict(FAST_PARAMS, distance="cosine", image_score="max", sigma=0)
    ).fit(elpv_small.train_images)
    images = elpv_small.test_images[:3]
    maps, scores = detector.anomaly_maps(images, return_score_samples=True)
    maxima = np.array([m.max() for m in maps])
    assert np.all(maxima <= -scores * (1 + 1e-5))
    assert np.all(maxima >= 0.8 * -scores)


def test_options_reach_the_ensemble(elpv_small):
    members = [
        ("cos", PatchCoreDetector(**dict(FAST_PARAMS, distance="cosine"))),
        ("top", PatchCoreDetector(**dict(FAST_PARAMS, image_score=0.05))),
    ]
    ensemble = PatchCoreEnsemble(members, random_state=0).fit(elpv_small.train_images)
    assert ensemble.named_detectors_["cos"].distance == "cosine"
    assert np.isfinite(ensemble.score_samples(elpv_small.test_images)).all()


@pytest.mark.parametrize("value", ["mean", 0.0, 1.5, -0.1])
def test_bad_image_score_is_refused(elpv_small, value):
    with pytest.raises(ValueError, match="image_score"):
        PatchCoreDetector(**dict(FAST_PARAMS, image_score=value)).fit(
            elpv_small.train_images
        )


def _nearest_distances(features, bank, cosine):
    """Distance of each row of ``features`` to its nearest row of ``bank``."""
    if cosine:
        features = features / np.linalg.norm(features, axis=1, keepdims=True)
        bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
        return 1.0 - (features @ bank.T).max(axis=1)
    gaps = features[:, None, :] - bank[None, :, :]
    return np.sqrt((gaps**2).sum(axis=2)).min(axis=1)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("image_score", ["max", 0.25])
def test_options_on_a_tiny_backbone_match_numpy(distance, image_score):
    # Fast: per-pixel features recomputed with NumPy, every training patch
    # in the bank, no neighbourhood, so scores follow from the definitions.
    train, test = odd_one_out_images()
    detector = tiny_detector(distance=distance, image_score=image_score).fit(train)
    bank = tiny_features(train).reshape(-1, 4)
    expected = []
    for features in tiny_features(test):
        distances = _nearest_distances(
            features.reshape(-1, 4), bank, distance == "cosine"
        )
        if image_score == "max":
            expected.append(-distances.max())
        else:
            top = math.ceil(image_score * distances.size)
            expected.append(-np.sort(distances)[-top:].mean())
    np.testing.assert_allclose(
        detector.score_samples(test), expected, rtol=1e-4, atol=1e-6
    )
