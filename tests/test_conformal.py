"""Conformal p-values, the thresholds at a chosen rate, held-out calibration."""

import pickle
import warnings

import numpy as np
import pytest
from conftest import FAST_PARAMS

from skpatchcore import PatchCoreDetector, PatchCoreEnsemble
from skpatchcore._conformal import map_threshold, pvalues, score_threshold

ALPHAS = (0.01, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.5)


def pvalues_by_hand(calibration, scores):
    """Bates et al.'s definition, written out as a loop."""
    n = len(calibration)
    return np.array(
        [(1 + sum(c <= s for c in calibration)) / (n + 1) for s in scores]
    )


def test_pvalues_count_the_calibration_scores_at_least_as_anomalous():
    rng = np.random.default_rng(0)
    # Rounded, so that test scores tie with calibration scores.
    calibration = np.round(rng.normal(size=30), 1)
    scores = np.r_[np.round(rng.normal(size=50), 1), calibration[:5], -9.0, 9.0]
    expected = pvalues_by_hand(calibration, scores)
    np.testing.assert_array_equal(pvalues(calibration, scores), expected)
    # Below every calibration score: the smallest p-value, 1 / (n + 1), never 0.
    assert pvalues(calibration, [-9.0])[0] == 1 / 31
    assert pvalues(calibration, [9.0])[0] == 1.0


@pytest.mark.parametrize("n_calibration", [9, 19, 50])
def test_exchangeable_scores_keep_the_false_alarm_rate(n_calibration):
    # Many draws of n + 1 iid scores: n calibrate, the last is a good image.
    # P(p <= alpha) is then floor(alpha (n + 1)) / (n + 1): at most alpha and
    # within 1 / (n + 1) of it. Dropping the +1 of the numerator doubles the
    # rate at alpha = 1 / (n + 1); dropping both +1 gives
    # floor(alpha n + 1) / (n + 1), above alpha at alpha = 0.15 for n = 9.
    rng = np.random.default_rng(n_calibration)
    n_draws = 20000
    draws = rng.standard_normal((n_draws, n_calibration + 1))
    p = np.array([pvalues(row[:-1], row[-1:])[0] for row in draws])
    standard_error = np.sqrt(0.25 / n_draws)
    for alpha in (*ALPHAS, 1 / (n_calibration + 1)):
        realized = np.mean(p <= alpha)
        exact = np.floor(alpha * (n_calibration + 1) + 1e-9) / (n_calibration + 1)
        assert realized <= alpha + 3 * standard_error
        assert abs(realized - exact) <= 4 * standard_error


@pytest.mark.parametrize("n_calibration", [1, 4, 9, 19, 99])
def test_thresholds_flag_exactly_the_small_pvalues(n_calibration):
    rng = np.random.default_rng(n_calibration)
    calibration = np.round(rng.normal(size=n_calibration), 1)
    scores = np.r_[np.round(rng.normal(size=200), 1), calibration]
    # A good image's largest map value: flagged when above the threshold,
    # its p-value counting calibration maxima at least as high.
    maxima = np.round(rng.gamma(2.0, size=n_calibration), 1)
    largest = np.r_[np.round(rng.gamma(2.0, size=200), 1), maxima]
    map_pvalues = np.array(
        [(1 + np.sum(maxima >= t)) / (n_calibration + 1) for t in largest]
    )
    edges = tuple(k / (n_calibration + 1) for k in range(1, 4))
    for alpha in (*ALPHAS, *edges):
        p = pvalues_by_hand(calibration, scores)
        offset = score_threshold(calibration, alpha)
        np.testing.assert_array_equal(scores < offset, p <= alpha)
        threshold = map_threshold(maxima, alpha)
        np.testing.assert_array_equal(largest > threshold, map_pvalues <= alpha)


def test_predict_flags_exactly_the_pvalues_at_most_contamination(
    elpv_small, cell_arrays
):
    detector = PatchCoreDetector(**FAST_PARAMS, contamination=0.25).fit(cell_arrays)
    X = elpv_small.test_images
    p = detector.pvalues(X)
    np.testing.assert_array_equal(detector.predict(X) == -1, p <= 0.25)
    assert np.any(p <= 0.25) and np.any(p > 0.25)
    # 8 calibration images: (1 + k) / 9 <= 0.25 for k = 0, 1, so the
    # threshold is the second lowest held-out score.
    assert detector.n_calibration_images_ == 8
    assert detector.offset_ == np.sort(detector.calibration_scores_)[1]
    np.testing.assert_array_equal(
        p, pvalues_by_hand(detector.calibration_scores_, detector.score_samples(X))
    )
    # A mask has any pixel marked iff the map's largest value has a p-value
    # at most 0.25 among the calibration maxima.
    masks = detector.predict_masks(X)
    maxima = detector.calibration_map_maxima_
    for mask, anomaly_map in zip(masks, detector.anomaly_maps(X)):
        map_p = (1 + np.sum(maxima >= anomaly_map.max())) / (len(maxima) + 1)
        assert mask.any() == (map_p <= 0.25)


def test_contamination_below_the_smallest_pvalue_warns(cell_arrays):
    with pytest.warns(UserWarning, match="8 calibration images.*max_calibration"):
        detector = PatchCoreDetector(**FAST_PARAMS, contamination=0.1).fit(
            cell_arrays
        )
    assert detector.offset_ == -np.inf
    assert detector.pixel_threshold_ == np.inf
    assert np.all(detector.predict(cell_arrays[:2]) == 1)
    # 1 / 9 is reachable: no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PatchCoreDetector(**FAST_PARAMS, contamination=1 / 9).fit(cell_arrays)


def _nearest(rows, bank):
    """Distance of each row to its nearest bank row, by brute force."""
    return np.sqrt(((rows[:, None, :] - bank[None, :, :]) ** 2).sum(-1)).min(1)


def test_held_out_images_stay_out_of_the_bank(cell_arrays):
    params = dict(FAST_PARAMS, coreset_ratio=1.0, calibration_holdout=3)
    detector = PatchCoreDetector(**params).fit(cell_arrays)
    held = np.sort(detector.calibration_indices_)
    assert len(held) == detector.n_calibration_images_ == 3
    others = np.setdiff1d(np.arange(len(cell_arrays)), held)
    features = detector.feature_extractor_.transform(cell_arrays)
    features = features.reshape(len(cell_arrays), -1, features.shape[-1])
    bank = detector.memory_bank_
    # The whole bank is the patches of the other images, none of the held ones.
    assert len(bank) == len(others) * features.shape[1]
    assert _nearest(features[others].reshape(-1, bank.shape[1]), bank).max() < 1e-3
    for i in held:
        assert _nearest(features[i], bank).min() > 1e-2
    # Held-out images are scored against the whole bank, as a new image is.
    order = np.argsort(detector.calibration_indices_)
    np.testing.assert_allclose(
        detector.calibration_scores_[order],
        detector.score_samples(cell_arrays[held]),
        rtol=1e-4,
    )
    # Leave-one-out keeps every image in the bank.
    loo = PatchCoreDetector(**dict(params, calibration_holdout=None)).fit(cell_arrays)
    assert len(loo.memory_bank_) == len(cell_arrays) * features.shape[1]


def test_holdout_fraction_and_partial_fit(cell_arrays):
    params = dict(FAST_PARAMS, coreset_ratio=1.0, calibration_holdout=0.25)
    detector = PatchCoreDetector(**params).fit(cell_arrays[:6])
    # ceil(0.25 * 6) images held out.
    assert detector.n_calibration_images_ == 2
    n_patches = len(detector.memory_bank_) // 4
    detector.partial_fit(cell_arrays[6:])
    # ceil(0.25 * 8) = 2 of the 8 images seen: the new images held out join
    # the bank's complement, the rest the bank.
    assert detector.n_calibration_images_ == 2
    n_new_held = int(np.sum(detector.calibration_indices_ >= 6))
    assert len(detector.memory_bank_) == (4 + 2 - n_new_held) * n_patches


@pytest.mark.parametrize(
    "holdout, match",
    [(8, "holds out 8 of the 8"), (0.95, "holds out 8 of the 8"), (0, "calibration")],
)
def test_holdout_must_leave_images_for_the_bank(cell_arrays, holdout, match):
    detector = PatchCoreDetector(**FAST_PARAMS, calibration_holdout=holdout)
    with pytest.raises(ValueError, match=match):
        detector.fit(cell_arrays)


@pytest.mark.parametrize("holdout", [None, 3])
def test_persistence_keeps_pvalues(cell_arrays, elpv_small, tmp_path, holdout):
    detector = PatchCoreDetector(**FAST_PARAMS, calibration_holdout=holdout)
    detector.fit(cell_arrays)
    X = elpv_small.test_images
    expected = detector.pvalues(X)
    loaded = pickle.loads(pickle.dumps(detector))
    np.testing.assert_array_equal(loaded.pvalues(X), expected)
    sio = pytest.importorskip("skops.io")
    path = tmp_path / "detector.skops"
    sio.dump(detector, path)
    loaded = sio.load(path, trusted=sio.get_untrusted_types(file=path))
    np.testing.assert_array_equal(loaded.pvalues(X), expected)


def test_ensemble_pvalues(cell_arrays, elpv_small):
    small = dict(FAST_PARAMS, calibration_holdout=3)
    ensemble = PatchCoreEnsemble(
        [
            ("fine", PatchCoreDetector(**dict(small, patch_size=1))),
            ("coarse", PatchCoreDetector(**small)),
        ],
        contamination=0.25,
        random_state=0,
    ).fit(cell_arrays)
    assert ensemble.n_calibration_images_ == 3
    X = elpv_small.test_images
    p = ensemble.pvalues(X)
    np.testing.assert_array_equal(
        p, pvalues_by_hand(ensemble.calibration_scores_, ensemble.score_samples(X))
    )
    np.testing.assert_array_equal(ensemble.predict(X) == -1, p <= 0.25)
    with pytest.raises(ValueError, match="share calibration_holdout"):
        PatchCoreEnsemble(
            [
                ("a", PatchCoreDetector(**small)),
                ("b", PatchCoreDetector(**FAST_PARAMS)),
            ]
        ).fit(cell_arrays)


def test_reliability_plot_counts_the_flagged_share():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from skpatchcore.plotting import plot_reliability

    p = np.array([0.02, 0.04, 0.3, 0.6, 1.0])
    ax = plot_reliability(p, alphas=[0.01, 0.05, 0.5], n_calibration=49)
    realized = ax.get_lines()[0].get_ydata()
    np.testing.assert_allclose(realized, [0.0, 0.4, 0.6])
    # Several splits: their mean, with a band.
    ax = plot_reliability([p, np.ones(5)], alphas=[0.05])
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), [0.2])
    assert len(ax.collections) == 1
    with pytest.raises(ValueError, match=r"lie in \(0, 1\]"):
        plot_reliability(np.array([0.0, 0.5]))
