"""PatchCoreEnsemble: members fitted alike, outputs combined, one calibration."""

import copy
import statistics

import joblib
import numpy as np
import pytest
from conftest import FAST_PARAMS, odd_one_out_images, tiny_detector
from PIL import Image
from scipy.stats import rankdata
from sklearn.base import clone
from sklearn.ensemble import IsolationForest
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV, StratifiedKFold

from skpatchcore import PatchCoreDetector, PatchCoreEnsemble
from skpatchcore._ensemble import _location_scale

# Two members that differ in scale and in geometry: one sees the whole cell,
# the other a centre crop, so that their maps align only on the original image.
FINE = dict(FAST_PARAMS, patch_size=1)
COARSE = dict(FAST_PARAMS, patch_size=3, resize=80, sigma=2.0)


def tukey_whisker(values):
    """Largest value not above Q3 + 1.5 IQR, quartiles from the stdlib."""
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return max(value for value in values if value <= q3 + 1.5 * (q3 - q1))


def standardised(values, reference):
    """``values`` centred and scaled by the mean and deviation of ``reference``."""
    return (np.asarray(values, dtype=np.float64) - statistics.fmean(reference)) / (
        statistics.pstdev(reference)
    )


def mixed_ensemble(**params):
    return PatchCoreEnsemble(
        [("fine", PatchCoreDetector(**FINE)), ("coarse", PatchCoreDetector(**COARSE))],
        **params,
    )


@pytest.fixture(scope="module")
def mixed(elpv_small):
    """A fitted two-member ensemble and the same detectors fitted on their own."""
    X = elpv_small.train_images
    ensemble = mixed_ensemble(contamination=0.25, random_state=0).fit(X)
    alone = [PatchCoreDetector(**FINE).fit(X), PatchCoreDetector(**COARSE).fit(X)]
    return ensemble, alone


def test_equal_members_rank_like_one_detector(fast_detector, elpv_small):
    ensemble = PatchCoreEnsemble(
        [(name, PatchCoreDetector(**FAST_PARAMS)) for name in ("a", "b")],
        random_state=FAST_PARAMS["random_state"],
    ).fit(elpv_small.train_images)
    X = elpv_small.test_images
    single = fast_detector.score_samples(X)
    combined = ensemble.score_samples(X)
    np.testing.assert_array_equal(rankdata(combined), rankdata(single))
    # Equal members: the combination is the single detector, standardised.
    calibration = fast_detector.calibration_scores_
    np.testing.assert_allclose(combined, standardised(single, calibration), rtol=1e-6)
    np.testing.assert_allclose(
        ensemble.offset_,
        standardised(fast_detector.offset_, calibration),
        rtol=1e-9,
    )
    np.testing.assert_array_equal(ensemble.predict(X), fast_detector.predict(X))
    maxima = fast_detector.calibration_map_maxima_
    for combined_map, single_map in zip(
        ensemble.anomaly_maps(X[:2]), fast_detector.anomaly_maps(X[:2])
    ):
        np.testing.assert_allclose(
            combined_map, standardised(single_map, maxima), rtol=1e-5, atol=1e-5
        )


def test_members_are_the_detectors_fitted_alone(mixed):
    ensemble, alone = mixed
    assert [name for name, _ in ensemble.detectors] == ["fine", "coarse"]
    assert list(ensemble.named_detectors_) == ["fine", "coarse"]
    for name, member, detector in zip(["fine", "coarse"], ensemble.detectors_, alone):
        assert ensemble.named_detectors_[name] is member
        np.testing.assert_array_equal(member.memory_bank_, detector.memory_bank_)
        np.testing.assert_array_equal(
            member.calibration_scores_, detector.calibration_scores_
        )
    # The detectors given are templates: never fitted themselves.
    for _, template in ensemble.detectors:
        assert not hasattr(template, "memory_bank_")


def test_scores_and_maps_combine_the_members_standardised(mixed, elpv_small):
    ensemble, alone = mixed
    X = elpv_small.test_images
    expected_scores = np.mean(
        [standardised(d.score_samples(X), d.calibration_scores_) for d in alone],
        axis=0,
    )
    np.testing.assert_allclose(ensemble.score_samples(X), expected_scores, rtol=1e-6)

    maps, scores = ensemble.anomaly_maps(X[:3], return_score_samples=True)
    np.testing.assert_allclose(scores, expected_scores[:3], rtol=1e-6)
    member_maps = [d.anomaly_maps(X[:3]) for d in alone]
    for i, combined in enumerate(maps):
        assert combined.dtype == np.float32
        assert combined.shape == np.asarray(Image.open(X[i])).shape[:2]
        expected = np.mean(
            [
                standardised(m[i], d.calibration_map_maxima_)
                for m, d in zip(member_maps, alone)
            ],
            axis=0,
        )
        np.testing.assert_allclose(combined, expected, rtol=1e-5, atol=1e-5)
    for mask, combined in zip(ensemble.predict_masks(X[:3]), maps):
        np.testing.assert_array_equal(mask, combined > ensemble.pixel_threshold_)


def test_outlier_conventions(mixed, elpv_small):
    ensemble, _ = mixed
    X = elpv_small.test_images
    scores = ensemble.score_samples(X)
    decision = ensemble.decision_function(X)
    np.testing.assert_allclose(decision, scores - ensemble.offset_)
    labels = ensemble.predict(X)
    assert labels.dtype.kind == "i"
    np.testing.assert_array_equal(labels, np.where(decision >= 0, 1, -1))
    y = elpv_small.test_labels
    assert scores[y == -1].mean() < scores[y == 1].mean()
    assert not hasattr(ensemble, "fit_predict")


def test_thresholds_come_from_the_combined_calibration(mixed):
    ensemble, alone = mixed
    # All members hold out the same images, those of a detector fitted alone.
    for member in ensemble.detectors_:
        np.testing.assert_array_equal(
            member.calibration_indices_, ensemble.calibration_indices_
        )
    np.testing.assert_array_equal(
        ensemble.calibration_indices_, alone[0].calibration_indices_
    )
    expected = np.mean(
        [standardised(d.calibration_scores_, d.calibration_scores_) for d in alone],
        axis=0,
    )
    np.testing.assert_allclose(ensemble.calibration_scores_, expected, rtol=1e-9)
    assert ensemble.n_calibration_images_ == len(expected)
    # contamination=0.25: the m-th most anomalous combined values, m the
    # count of k with (1 + k) / (n + 1) <= 0.25.
    m = sum((1 + k) / (len(expected) + 1) <= 0.25 for k in range(len(expected)))
    np.testing.assert_allclose(ensemble.offset_, sorted(expected)[m - 1], rtol=1e-9)
    maxima = ensemble.calibration_map_maxima_.tolist()
    np.testing.assert_allclose(
        ensemble.pixel_threshold_, sorted(maxima)[-m], rtol=1e-9
    )
    # A combined map peaks no higher than its members' standardised peaks do
    # on average, and lower where their peaks lie apart.
    bound = np.mean(
        [
            standardised(d.calibration_map_maxima_, d.calibration_map_maxima_)
            for d in alone
        ],
        axis=0,
    )
    assert np.all(ensemble.calibration_map_maxima_ <= bound + 1e-6)


@pytest.mark.slow
def test_calibration_is_leave_one_image_out(cell_arrays):
    # With the whole bank kept, an image's held-out score and map are those
    # of a detector fitted on the other images: the calibration written out.
    images = np.stack(
        [np.asarray(Image.fromarray(cell).resize((64, 64))) for cell in cell_arrays[:5]]
    )
    members = [
        dict(FINE, coreset_ratio=1.0),
        dict(COARSE, coreset_ratio=1.0, resize=None),
    ]
    ensemble = PatchCoreEnsemble(
        [(f"m{k}", PatchCoreDetector(**params)) for k, params in enumerate(members)],
        random_state=0,
    ).fit(images)
    held_out_scores, held_out_maps = [], []
    for params in members:
        scores, maps = [], []
        for i in range(len(images)):
            others = np.delete(images, i, axis=0)
            detector = PatchCoreDetector(**params).fit(others)
            image_maps, image_scores = detector.anomaly_maps(
                images[i : i + 1], return_score_samples=True
            )
            scores.append(image_scores[0])
            maps.append(image_maps[0])
        held_out_scores.append(scores)
        held_out_maps.append(maps)

    np.testing.assert_array_equal(ensemble.calibration_indices_, np.arange(5))
    expected_scores = np.mean(
        [standardised(s, s) for s in held_out_scores], axis=0
    )
    np.testing.assert_allclose(
        ensemble.calibration_scores_, expected_scores, rtol=1e-4, atol=1e-5
    )
    member_maxima = [[m.max() for m in maps] for maps in held_out_maps]
    expected_maxima = [
        np.mean(
            [
                standardised(maps[i], maxima)
                for maps, maxima in zip(held_out_maps, member_maxima)
            ],
            axis=0,
        ).max()
        for i in range(len(images))
    ]
    np.testing.assert_allclose(
        ensemble.calibration_map_maxima_, expected_maxima, rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(
        ensemble.offset_, -tukey_whisker([-s for s in expected_scores]), atol=1e-4
    )
    np.testing.assert_allclose(
        ensemble.pixel_threshold_, tukey_whisker(expected_maxima), atol=1e-4
    )


def test_members_share_the_calibration_sample(cell_arrays, elpv_small):
    # Different seeds of their own, no seed for the ensemble, and labels.
    ensemble = PatchCoreEnsemble(
        [
            ("fine", PatchCoreDetector(**dict(FINE, random_state=1))),
            ("coarse", PatchCoreDetector(**dict(COARSE, random_state=2))),
        ],
    )
    for _, template in ensemble.detectors:
        template.set_params(max_calibration_images=3)
    defective = [np.asarray(Image.open(p)) for p in elpv_small.test_images[-2:]]
    X = list(cell_arrays) + defective
    y = [1] * len(cell_arrays) + [-1, -1]
    ensemble.fit(X, y)
    assert ensemble.n_train_images_ == len(cell_arrays)
    first, second = ensemble.detectors_
    assert first.random_state == second.random_state
    assert first.n_train_images_ == len(cell_arrays)
    assert len(ensemble.calibration_indices_) == 3
    np.testing.assert_array_equal(
        first.calibration_indices_, ensemble.calibration_indices_
    )
    np.testing.assert_array_equal(
        second.calibration_indices_, ensemble.calibration_indices_
    )
    assert ensemble.calibration_indices_.max() < len(cell_arrays)


def test_members_must_share_max_calibration_images(cell_arrays):
    ensemble = PatchCoreEnsemble(
        [
            ("a", PatchCoreDetector(**FINE)),
            ("b", PatchCoreDetector(**dict(FINE, max_calibration_images=5))),
        ]
    )
    with pytest.raises(ValueError, match="share max_calibration_images.*'b': 5"):
        ensemble.fit(cell_arrays)
    assert not hasattr(ensemble, "detectors_")


@pytest.mark.parametrize(
    "detectors, error, match",
    [
        ([], ValueError, "detectors is empty"),
        ("fine", ValueError, "'detectors' parameter"),
        ([PatchCoreDetector()], TypeError, r"detectors\[0\] is .*\(name, "),
        ([(1, PatchCoreDetector())], TypeError, "names must be non-empty strings"),
        ([("a", PatchCoreDetector)], TypeError, r"pass an instance"),
        ([("a", IsolationForest())], TypeError, "'a' has type IsolationForest"),
        (
            [("a", PatchCoreDetector()), ("a", PatchCoreDetector())],
            ValueError,
            r"unique; \['a'\]",
        ),
        ([("a__b", PatchCoreDetector())], ValueError, "contains '__'"),
        ([("random_state", PatchCoreDetector())], ValueError, "also a parameter"),
    ],
    ids=[
        "empty",
        "not-a-list",
        "no-name",
        "name-not-str",
        "class",
        "not-patchcore",
        "duplicate",
        "double-underscore",
        "parameter-name",
    ],
)
def test_bad_detectors(detectors, error, match, cell_arrays):
    with pytest.raises(error, match=match):
        PatchCoreEnsemble(detectors).fit(cell_arrays[:2])


def test_bad_member_parameter_fails_before_any_fit(cell_arrays, monkeypatch):
    fitted = []
    monkeypatch.setattr(
        PatchCoreDetector,
        "_add_images",
        lambda self, *args, **kwargs: fitted.append(self),
    )
    ensemble = PatchCoreEnsemble(
        [
            ("a", PatchCoreDetector(**FINE)),
            ("b", PatchCoreDetector(**dict(FINE, coreset_ratio=2.0))),
        ]
    )
    with pytest.raises(ValueError, match="coreset_ratio"):
        ensemble.fit(cell_arrays[:2])
    assert fitted == []


def test_unfitted_ensemble_refuses_to_predict(cell_arrays):
    ensemble = mixed_ensemble()
    for method in ("score_samples", "predict", "anomaly_maps", "predict_masks"):
        with pytest.raises(NotFittedError):
            getattr(ensemble, method)(cell_arrays[:1])


def test_get_params_set_params_and_clone():
    fine, coarse = PatchCoreDetector(**FINE), PatchCoreDetector(**COARSE)
    ensemble = PatchCoreEnsemble([("fine", fine), ("coarse", coarse)])
    params = ensemble.get_params(deep=True)
    assert params["fine"] is fine
    assert params["fine__coreset_ratio"] == FINE["coreset_ratio"]
    assert params["coarse__resize"] == 80
    assert set(ensemble.get_params(deep=False)) == {
        "detectors",
        "contamination",
        "random_state",
        "memory",
    }

    ensemble.set_params(fine__coreset_ratio=0.5, contamination=0.1)
    assert fine.coreset_ratio == 0.5
    assert ensemble.contamination == 0.1
    replacement = PatchCoreDetector(**FINE)
    ensemble.set_params(coarse=replacement)
    assert dict(ensemble.detectors)["coarse"] is replacement

    cloned = clone(ensemble)
    assert cloned.get_params(deep=False)["contamination"] == 0.1
    assert cloned.get_params()["fine__coreset_ratio"] == 0.5
    assert all(
        a is not b for (_, a), (_, b) in zip(cloned.detectors, ensemble.detectors)
    )


def test_changed_member_parameters_refuse_to_predict(mixed, elpv_small):
    ensemble = copy.deepcopy(mixed[0])
    X = elpv_small.test_images[:1]
    ensemble.set_params(fine__patch_size=5)
    with pytest.raises(ValueError, match="fine__patch_size=1 at fit, now 5"):
        ensemble.predict(X)
    ensemble.set_params(fine__patch_size=1)
    ensemble.set_params(coarse=PatchCoreDetector(**FINE))
    with pytest.raises(ValueError, match="coarse__resize=80 at fit, now None"):
        ensemble.score_samples(X)
    # Runtime parameters may change, as for a detector.
    ensemble.set_params(coarse=mixed[0].detectors[1][1])
    ensemble.set_params(fine__batch_size=1, coarse__verbose=0)
    np.testing.assert_allclose(
        ensemble.score_samples(X), mixed[0].score_samples(X), rtol=1e-5
    )


@pytest.mark.slow
def test_grid_search_over_a_member_parameter(elpv_small):
    X = list(elpv_small.train_images) + list(elpv_small.test_images)
    y = np.r_[np.ones(len(elpv_small.train_images), int), elpv_small.test_labels]
    search = GridSearchCV(
        mixed_ensemble(random_state=0),
        {"fine__patch_size": [1, 3]},
        scoring="roc_auc",
        cv=StratifiedKFold(2, shuffle=True, random_state=0),
    ).fit(X, y)
    assert np.isfinite(search.cv_results_["mean_test_score"]).all()
    best = search.best_estimator_
    assert best.named_detectors_["fine"].patch_size == (
        search.best_params_["fine__patch_size"]
    )
    # Refitted on the +1 images only.
    assert best.n_train_images_ == int((y == 1).sum())


def test_pickle_round_trip(mixed, elpv_small, tmp_path):
    ensemble, _ = mixed
    X = elpv_small.test_images[:2]
    joblib.dump(ensemble, tmp_path / "ensemble.joblib")
    loaded = joblib.load(tmp_path / "ensemble.joblib")
    maps, scores = ensemble.anomaly_maps(X, return_score_samples=True)
    loaded_maps, loaded_scores = loaded.anomaly_maps(X, return_score_samples=True)
    np.testing.assert_array_equal(loaded_scores, scores)
    for a, b in zip(loaded_maps, maps):
        np.testing.assert_array_equal(a, b)
    assert loaded.offset_ == ensemble.offset_
    assert loaded.pixel_threshold_ == ensemble.pixel_threshold_


def test_skops_round_trip(mixed, elpv_small, tmp_path):
    sio = pytest.importorskip("skops.io")
    ensemble, _ = mixed
    path = tmp_path / "ensemble.skops"
    sio.dump(ensemble, path)
    types = [
        "skpatchcore._detector.PatchCoreDetector",
        "skpatchcore._ensemble.PatchCoreEnsemble",
        "skpatchcore._feature_extractor.PatchFeatureExtractor",
        "skpatchcore._persistence.TensorDict",
    ]
    assert sio.get_untrusted_types(file=path) == types
    loaded = sio.load(path, trusted=types)
    X = elpv_small.test_images[:2]
    maps, scores = ensemble.anomaly_maps(X, return_score_samples=True)
    loaded_maps, loaded_scores = loaded.anomaly_maps(X, return_score_samples=True)
    np.testing.assert_array_equal(loaded_scores, scores)
    for a, b in zip(loaded_maps, maps):
        np.testing.assert_array_equal(a, b)
    assert loaded.pixel_threshold_ == ensemble.pixel_threshold_


def test_location_scale_of_coinciding_values_is_one():
    assert _location_scale(np.full(4, -2.5)) == (-2.5, 1.0)
    # Rounding of a constant's mean, not a spread.
    assert _location_scale(np.array([0.1, 0.1, np.nextafter(0.1, 1)]))[1] == 1.0
    values = [1.0, 2.0, 4.0]
    assert _location_scale(np.array(values)) == pytest.approx(
        (statistics.fmean(values), statistics.pstdev(values)), rel=1e-12
    )


def test_partial_fit_says_to_fit_again_on_all_images():
    ensemble = mixed_ensemble()
    # Hidden, as scikit-learn expects of estimators that cannot learn
    # incrementally, and explained when asked for.
    assert not hasattr(ensemble, "partial_fit")
    with pytest.raises(AttributeError, match="Fit the ensemble again on all images"):
        ensemble.partial_fit(np.zeros((2, 16, 16), np.uint8))


def test_tiny_members_combine_as_standardised_means():
    # Fast: two 1x1-convolution members with different weights.
    train, test = odd_one_out_images()
    members = [tiny_detector(seed=0), tiny_detector(seed=1, patch_size=3)]
    ensemble = PatchCoreEnsemble(
        [("a", members[0]), ("b", members[1])], random_state=0
    ).fit(train)
    fitted = ensemble.detectors_
    expected = np.mean(
        [standardised(m.score_samples(test), m.calibration_scores_) for m in fitted],
        axis=0,
    )
    np.testing.assert_allclose(ensemble.score_samples(test), expected, rtol=1e-9)
    maps = np.mean(
        [
            standardised(np.stack(m.anomaly_maps(test)), m.calibration_map_maxima_)
            for m in fitted
        ],
        axis=0,
    )
    np.testing.assert_allclose(np.stack(ensemble.anomaly_maps(test)), maps, rtol=1e-6)
    assert list(ensemble.predict(test)) == [1, -1]
