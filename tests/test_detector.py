import copy
import math
import pickle
import statistics
import warnings

import joblib
import numpy as np
import pytest
import torch
from conftest import (
    FAST_PARAMS,
    MPDD,
    odd_one_out_images,
    tiny_detector,
    tiny_features,
)
from PIL import Image
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer
from sklearn.utils._param_validation import InvalidParameterError

from skpatchcore import PatchCoreDetector
from skpatchcore._bank import search as bank_search
from skpatchcore._bank.search import MemoryBank
from skpatchcore.metrics import f1_max
from skpatchcore.model_selection import NoveltyCV


def reference_score_samples(detector, X):
    """Eq. 6-7 by brute force in float64 on the fitted memory bank."""
    features = detector.feature_extractor_.transform(X)
    bank = detector.memory_bank_.astype(np.float64)
    b = detector.n_reweight_neighbors
    scores = []
    for patches in features.reshape(len(features), -1, bank.shape[1]):
        patches = patches.astype(np.float64)
        distances = np.linalg.norm(patches[:, None] - bank[None], axis=2)
        nearest = distances.min(axis=1)
        worst = nearest.argmax()
        m_star = distances[worst].argmin()
        around = np.argsort(np.linalg.norm(bank - bank[m_star], axis=1), kind="stable")
        support = [m_star] + [k for k in around if k != m_star][: b - 1]
        to_support = np.linalg.norm(bank[support] - patches[worst], axis=1)
        weight = 1 - np.exp(to_support[0]) / np.exp(to_support).sum() if b > 1 else 1
        scores.append(-weight * nearest[worst])
    return np.array(scores)


def tukey_whisker(values):
    """Largest value not above Q3 + 1.5 IQR, quartiles from the stdlib."""
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return max(value for value in values if value <= q3 + 1.5 * (q3 - q1))


def test_scores_match_brute_force_eq7(fast_detector, elpv_small):
    expected = reference_score_samples(fast_detector, elpv_small.test_images)
    np.testing.assert_allclose(
        fast_detector.score_samples(elpv_small.test_images), expected, rtol=1e-5
    )


def test_no_reweighting_gives_the_maximum_patch_distance(elpv_small):
    detector = PatchCoreDetector(**FAST_PARAMS, n_reweight_neighbors=1)
    detector.fit(elpv_small.train_images)
    expected = reference_score_samples(detector, elpv_small.test_images)
    np.testing.assert_allclose(
        detector.score_samples(elpv_small.test_images), expected, rtol=1e-5
    )


def test_outlier_conventions(fast_detector, elpv_small):
    X = elpv_small.test_images
    scores = fast_detector.score_samples(X)
    decision = fast_detector.decision_function(X)
    np.testing.assert_allclose(decision, scores - fast_detector.offset_)
    labels = fast_detector.predict(X)
    assert labels.dtype.kind == "i"
    np.testing.assert_array_equal(labels, np.where(decision >= 0, 1, -1))
    # Defective cells are less normal on average than good ones.
    y = elpv_small.test_labels
    assert scores[y == -1].mean() < scores[y == 1].mean()


def test_fit_predict_is_hidden(fast_detector):
    for detector in (PatchCoreDetector(), fast_detector):
        assert not hasattr(detector, "fit_predict")
        with pytest.raises(AttributeError) as error:
            detector.fit_predict  # noqa: B018
        assert "novelty detector" in str(error.value.__cause__)


def test_grid_search_refit_trains_on_good_images_only(elpv_small):
    # Labelled images of both kinds, as model selection needs them.
    X = list(elpv_small.train_images) + list(elpv_small.test_images)
    y = np.concatenate([np.ones(len(elpv_small.train_images)), elpv_small.test_labels])
    good = [image for image, label in zip(X, y) if label == 1]
    searches = [
        GridSearchCV(
            PatchCoreDetector(**FAST_PARAMS),
            {"patch_size": [1, 3]},
            scoring="roc_auc",
            cv=cv,
            refit=True,
        ).fit(X, y)
        for cv in (
            StratifiedKFold(2, shuffle=True, random_state=0),
            NoveltyCV(StratifiedKFold(2, shuffle=True, random_state=0)),
        )
    ]
    # NoveltyCV drops the anomalies from each training fold itself: a plain
    # splitter must give the very same fold scores.
    for name in ("split0_test_score", "split1_test_score"):
        np.testing.assert_array_equal(
            searches[0].cv_results_[name], searches[1].cv_results_[name]
        )
    expected = PatchCoreDetector(**FAST_PARAMS)
    expected.set_params(**searches[0].best_params_).fit(good)
    for search in searches:
        best = search.best_estimator_
        assert best.n_train_images_ == len(good) == np.sum(y == 1)
        np.testing.assert_array_equal(best.memory_bank_, expected.memory_bank_)
        assert best.offset_ == expected.offset_


@pytest.mark.parametrize(
    "y, match",
    [
        ([0, 1, 1], r"got the values 0, 1\. Labels coded 0/1"),
        ([1, 2, 1], "got the values 1, 2"),
        (["good", "bad", "good"], "got the values bad, good"),
        ([True, False, True], "got the values False, True"),
        ([1.0, np.nan, 1.0], "got the values 1.0, nan"),
        ([-1, -1, -1], "every image of X -1"),
        ([1, 1], "2 labels for the 3 images"),
    ],
)
@pytest.mark.parametrize("method", ["fit", "partial_fit"])
def test_labels_other_than_plus_or_minus_one_are_refused(cell_arrays, y, match, method):
    with pytest.raises(ValueError, match=match):
        getattr(PatchCoreDetector(**FAST_PARAMS), method)(cell_arrays[:3], y)


def test_partial_fit_leaves_out_anomalies(cell_arrays):
    detector = PatchCoreDetector(**FAST_PARAMS)
    detector.partial_fit(cell_arrays[:4], [1, -1, 1, 1])
    reference = PatchCoreDetector(**FAST_PARAMS).fit(cell_arrays[[0, 2, 3]])
    np.testing.assert_array_equal(detector.memory_bank_, reference.memory_bank_)
    assert detector.n_train_images_ == 3
    with pytest.raises(ValueError, match="every image of X -1"):
        detector.partial_fit(cell_arrays[4:6], [-1, -1])
    assert detector.n_train_images_ == 3
    detector.partial_fit(cell_arrays[4:6], np.array([-1, 1]))
    reference.partial_fit(cell_arrays[5:6])
    np.testing.assert_array_equal(detector.memory_bank_, reference.memory_bank_)
    assert detector.n_train_images_ == 4


def test_auto_threshold_is_the_whisker_of_leave_one_image_out_scores(cell_arrays):
    # With the whole bank kept, scoring image i against the bank without its
    # own patches is the same as scoring it with a detector fitted on the
    # other images: an independent way to get the calibration scores.
    images = cell_arrays[:4]
    params = dict(FAST_PARAMS, coreset_ratio=1.0)
    detector = PatchCoreDetector(**params).fit(images)
    held_out, largest = [], []
    for i in range(len(images)):
        others = PatchCoreDetector(**params).fit(np.delete(images, i, axis=0))
        held_out.append(others.score_samples(images[i : i + 1])[0])
        largest.append(others.anomaly_maps(images[i : i + 1])[0].max())
    # The backbone runs on batches of other sizes here, which moves float32
    # features by a few ulps: hence 1e-4.
    expected_offset = -tukey_whisker([-score for score in held_out])
    np.testing.assert_allclose(detector.offset_, expected_offset, rtol=1e-4)
    np.testing.assert_allclose(
        detector.pixel_threshold_, tukey_whisker(largest), rtol=1e-4
    )
    assert np.all(detector.predict(images) == 1)

    # contamination=0.5: the m-th lowest score and m-th highest map maximum,
    # m the count of k with (1 + k) / (n + 1) <= 0.5.
    contaminated = PatchCoreDetector(**params, contamination=0.5).fit(images)
    m = sum((1 + k) / (len(held_out) + 1) <= 0.5 for k in range(len(held_out)))
    np.testing.assert_allclose(
        contaminated.offset_, sorted(held_out)[m - 1], rtol=1e-4
    )
    np.testing.assert_allclose(
        contaminated.pixel_threshold_, sorted(largest)[-m], rtol=1e-4
    )


def test_auto_thresholds_set_aside_an_outlying_training_image(cell_arrays):
    # A blemish that no other training image has: the held-out score and map
    # of that image stand out, and "auto" no longer lets it set the
    # thresholds, which the former rule (the extreme image) did.
    images = cell_arrays.copy()
    images[0, 100:200, 100:200] = 255
    detector = PatchCoreDetector(**FAST_PARAMS).fit(images)
    scores = detector.calibration_scores_.tolist()
    maxima = detector.calibration_map_maxima_.tolist()
    assert len(scores) == len(images)
    assert detector.offset_ == -tukey_whisker([-score for score in scores])
    assert detector.pixel_threshold_ == tukey_whisker(maxima)
    assert scores[0] < detector.offset_ <= min(scores[1:])
    assert maxima[0] > detector.pixel_threshold_ >= max(maxima[1:])


def test_calibration_indices_name_the_training_images(cell_arrays):
    images = cell_arrays.copy()
    images[5, 100:200, 100:200] = 255
    # Image 0 is left out, so the blemished image is training image 4.
    y = np.r_[-1, np.ones(len(images) - 1, int)]
    detector = PatchCoreDetector(**FAST_PARAMS).fit(images, y)
    indices = detector.calibration_indices_
    np.testing.assert_array_equal(np.sort(indices), np.arange(len(images) - 1))
    assert indices[np.argmin(detector.calibration_scores_)] == 4
    # Images of a later call come after all earlier ones.
    detector.partial_fit(images[:2])
    assert sorted(detector.calibration_indices_) == list(range(len(images) + 1))
    assert len(detector.calibration_indices_) == detector.n_calibration_images_


def test_assigned_thresholds_move_predict_and_masks(fast_detector, elpv_small):
    # The documented way to use a threshold chosen on labelled images.
    detector = copy.deepcopy(fast_detector)
    X = elpv_small.test_images
    scores = detector.score_samples(X)
    _, threshold = f1_max(elpv_small.test_labels, scores)
    detector.offset_ = threshold
    np.testing.assert_array_equal(
        detector.predict(X), np.where(scores >= threshold, 1, -1)
    )
    anomaly_map = detector.anomaly_maps(X[:1])[0]
    detector.pixel_threshold_ = float(np.median(anomaly_map))
    np.testing.assert_array_equal(
        detector.predict_masks(X[:1])[0], anomaly_map > np.median(anomaly_map)
    )


def test_anomaly_maps_follow_each_image(fast_detector, cell_arrays):
    # A bright scratch on a real cell, in images of different sizes and
    # aspect ratios: the map must peak on the scratch at each image's own
    # resolution, above anything the clean image scores.
    base = cell_arrays[0]
    clean, scratched = [], []
    for height, width in [(300, 300), (200, 360), (411, 257)]:
        image = np.asarray(Image.fromarray(base).resize((width, height)))
        clean.append(image)
        image = image.copy()
        image[height // 4 : height // 4 + 12, width // 2 : width // 2 + 40] = 255
        scratched.append(image)
    clean_maps = fast_detector.anomaly_maps(clean)
    maps = fast_detector.anomaly_maps(scratched)
    masks = fast_detector.predict_masks(scratched)
    for image, anomaly_map, clean_map, mask in zip(scratched, maps, clean_maps, masks):
        height, width = image.shape
        assert anomaly_map.shape == clean_map.shape == mask.shape == image.shape
        assert anomaly_map.dtype == np.float32
        assert mask.dtype == bool
        np.testing.assert_array_equal(
            mask, anomaly_map > fast_detector.pixel_threshold_
        )
        row, col = np.unravel_index(anomaly_map.argmax(), anomaly_map.shape)
        assert abs(row - (height // 4 + 6)) < height / 8
        assert abs(col - (width // 2 + 20)) < width / 8
        assert anomaly_map[height // 4 + 6, width // 2 + 20] > clean_map.max()


def test_anomaly_maps_with_score_samples_in_one_pass(fast_detector, cell_arrays):
    images = list(cell_arrays[:5])
    images[2] = images[2][:150, :200]
    # Batches of 2, so that the scores of several batches are put together.
    detector = copy.deepcopy(fast_detector).set_params(batch_size=2)
    maps, scores = detector.anomaly_maps(images, return_score_samples=True)
    expected_maps = detector.anomaly_maps(images)
    expected_scores = detector.score_samples(images)
    np.testing.assert_array_equal(scores, expected_scores)
    assert len(maps) == len(expected_maps) == 5
    for anomaly_map, expected in zip(maps, expected_maps):
        np.testing.assert_array_equal(anomaly_map, expected)


def test_input_forms_agree(fast_detector, cell_arrays, tmp_path):
    images = cell_arrays[:3]
    expected = fast_detector.score_samples(images)
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(paths[-1])
    rgb = np.repeat(images[..., None], 3, axis=3)
    rgba = np.concatenate([rgb, np.full_like(rgb[..., :1], 7)], axis=3)
    forms = {
        "float": images / 255.0,
        "channel": images[..., None],
        "rgb": rgb,
        "rgba": rgba,
        "list": list(images),
        "pil": [Image.fromarray(image) for image in images],
        "paths": paths,
        "str paths": [str(p) for p in paths],
        "path array": np.array([str(p) for p in paths]),
        "folder": tmp_path,
        "uint16": images.astype(np.uint16) * 257,
    }
    for name, X in forms.items():
        np.testing.assert_allclose(
            fast_detector.score_samples(X), expected, rtol=1e-5, err_msg=name
        )


def test_fit_and_test_sizes_may_differ(cell_arrays):
    train = [cell_arrays[0], cell_arrays[1][:200, :250], cell_arrays[2][50:, :]]
    detector = PatchCoreDetector(**FAST_PARAMS).fit(train)
    test = [cell_arrays[3][:123, :77], cell_arrays[4]]
    assert detector.score_samples(test).shape == (2,)
    assert [m.shape for m in detector.anomaly_maps(test)] == [(123, 77), (300, 300)]


def test_user_data_and_module_are_not_modified(cell_arrays):
    images = cell_arrays[:3]
    snapshot = images.copy()
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
    module.train()
    weights = {k: v.clone() for k, v in module.state_dict().items()}
    params = dict(FAST_PARAMS, backbone=module, layers=("0", "1"))
    detector = PatchCoreDetector(**params).fit(images)
    detector.score_samples(images)
    np.testing.assert_array_equal(images, snapshot)
    assert module.training
    for name, tensor in module.state_dict().items():
        torch.testing.assert_close(tensor, weights[name])
    assert detector.get_params()["backbone"] is module


def test_joblib_round_trip_is_identical_and_small(fast_detector, elpv_small, tmp_path):
    path = tmp_path / "detector.joblib"
    joblib.dump(fast_detector, path)
    loaded = joblib.load(path)
    X = elpv_small.test_images
    np.testing.assert_array_equal(
        loaded.score_samples(X), fast_detector.score_samples(X)
    )
    for a, b in zip(loaded.anomaly_maps(X[:2]), fast_detector.anomaly_maps(X[:2])):
        np.testing.assert_array_equal(a, b)
    assert loaded.offset_ == fast_detector.offset_
    # The file holds the bank and the weights of the truncated network only:
    # EfficientNet-Lite0 up to stage 5, not its later stages or classifier.
    saved = loaded.feature_extractor_.__getstate__()["model_"]
    assert not any(
        k.startswith(("stage6", "stage7", "head", "classifier")) for k in saved
    )
    weight_bytes = sum(t.numel() * t.element_size() for t in saved.values())
    assert (
        path.stat().st_size < fast_detector.memory_bank_.nbytes + weight_bytes + 200_000
    )
    assert loaded._model.search.features is loaded.memory_bank_


def test_memory_mapped_load_scores_the_same(fast_detector, elpv_small, tmp_path):
    path = tmp_path / "detector.joblib"
    joblib.dump(fast_detector, path)
    loaded = joblib.load(path, mmap_mode="r")
    assert isinstance(loaded.memory_bank_, np.memmap)
    assert not loaded.memory_bank_.flags.writeable
    X = elpv_small.test_images
    with warnings.catch_warnings():
        # torch warns on read-only arrays; the bank is never written.
        warnings.simplefilter("error")
        scores = loaded.score_samples(X)
        maps = loaded.anomaly_maps(X[:2])
    np.testing.assert_array_equal(scores, fast_detector.score_samples(X))
    for a, b in zip(maps, fast_detector.anomaly_maps(X[:2])):
        np.testing.assert_array_equal(a, b)


def test_loading_needs_no_network(tmp_path, cell_arrays, monkeypatch):
    detector = PatchCoreDetector(**dict(FAST_PARAMS, backbone="resnet18", weights=None))
    detector.fit(cell_arrays[:3])
    path = tmp_path / "resnet.joblib"
    joblib.dump(detector, path)

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    loaded = joblib.load(path)
    np.testing.assert_array_equal(
        loaded.score_samples(cell_arrays[3:5]), detector.score_samples(cell_arrays[3:5])
    )


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_fitted_on_cuda_loads_on_cpu(fast_detector, elpv_small, monkeypatch, device):
    # No GPU here: give the CPU-fitted detector the state a CUDA fit leaves
    # (device_ says cuda); pickling never stores CUDA tensors, so loading on
    # a machine without CUDA must fall back to the CPU.
    detector = pickle.loads(pickle.dumps(fast_detector))
    detector.set_params(device=device)
    detector.feature_extractor_.set_params(device=device)
    # As fit leaves them on a CUDA machine: the device asked for and found.
    detector.feature_extractor_._fitted_device = device
    cuda = torch.device("cuda")
    detector.device_ = detector.feature_extractor_.device_ = cuda
    payload = pickle.dumps(detector)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if device == "cuda":
        with pytest.warns(UserWarning, match="runs on the CPU"):
            loaded = pickle.loads(payload)
    else:
        loaded = pickle.loads(payload)
    assert loaded.device_ == torch.device("cpu")
    assert loaded.get_params()["device"] == device
    X = elpv_small.test_images
    np.testing.assert_allclose(loaded.score_samples(X), fast_detector.score_samples(X))


def test_seeded_fit_is_reproducible(cell_arrays):
    a = PatchCoreDetector(**FAST_PARAMS).fit(cell_arrays[:4])
    b = PatchCoreDetector(**FAST_PARAMS).fit(cell_arrays[:4])
    c = PatchCoreDetector(**dict(FAST_PARAMS, random_state=1)).fit(cell_arrays[:4])
    np.testing.assert_array_equal(a.memory_bank_, b.memory_bank_)
    assert not np.array_equal(a.memory_bank_, c.memory_bank_)


def test_batch_size_changes_scores_by_rounding_only(fast_detector, elpv_small):
    # The documented tolerance: a relative 1e-5, in fit and in scoring.
    expected = fast_detector.score_samples(elpv_small.test_images)
    for fit_size in (1, 7, 32):
        detector = clone(fast_detector).set_params(batch_size=fit_size)
        detector.fit(elpv_small.train_images)
        for score_size in (1, 7, 32):
            detector.set_params(batch_size=score_size)
            np.testing.assert_allclose(
                detector.score_samples(elpv_small.test_images), expected, rtol=1e-5
            )


def test_coreset_size_and_pynndescent(fast_detector, elpv_small):
    n_patches = len(elpv_small.train_images) * np.prod(fast_detector.grid_shape_)
    assert len(fast_detector.memory_bank_) == np.ceil(0.25 * n_patches)
    assert fast_detector.memory_bank_.dtype == np.float32
    approximate = clone(fast_detector).set_params(nn_algorithm="pynndescent")
    approximate.fit(elpv_small.train_images)
    scores = approximate.score_samples(elpv_small.test_images)
    np.testing.assert_allclose(
        scores, fast_detector.score_samples(elpv_small.test_images), rtol=0.05
    )
    restored = pickle.loads(pickle.dumps(approximate))
    assert restored._model.search._index is not None
    np.testing.assert_array_equal(
        restored.score_samples(elpv_small.test_images), scores
    )


def test_ivf_scores_close_to_exact_search(fast_detector, elpv_small):
    # 128 bank entries in 11 lists, of which each query probes at least 8:
    # a neighbour is rarely missed, and then one of eq. 7's 9 (measured: one
    # image's score 5e-5 away). The held-out calibration searches the index
    # too, each image's own entries left out of its probed lists.
    approximate = clone(fast_detector).set_params(nn_algorithm="ivf")
    approximate.fit(elpv_small.train_images)
    assert fast_detector.nn_algorithm_ == "exact"
    assert approximate.nn_algorithm_ == "ivf"
    X = elpv_small.test_images
    scores = approximate.score_samples(X)
    np.testing.assert_allclose(scores, fast_detector.score_samples(X), rtol=1e-3)
    np.testing.assert_allclose(
        approximate.calibration_scores_, fast_detector.calibration_scores_, rtol=1e-3
    )
    assert approximate.offset_ == pytest.approx(fast_detector.offset_, rel=1e-3)
    centroids, rows, starts = approximate._model.search._index
    assert len(centroids) == 11
    restored = pickle.loads(pickle.dumps(approximate))
    assert restored.nn_algorithm_ == "ivf"
    np.testing.assert_array_equal(restored._model.search._index[1], rows)
    np.testing.assert_array_equal(restored.score_samples(X), scores)


def test_auto_search_follows_the_bank_through_partial_fit(
    cell_arrays, elpv_small, monkeypatch
):
    # 16 bank entries per image: exact up to 99 entries, the index beyond.
    monkeypatch.setattr(bank_search, "IVF_FROM_ENTRIES", 100)
    detector = PatchCoreDetector(**FAST_PARAMS).partial_fit(cell_arrays[:4])
    assert detector.nn_algorithm == "auto"
    assert (detector.nn_algorithm_, len(detector.memory_bank_)) == ("exact", 64)
    assert detector._model.search._index is None
    detector.partial_fit(cell_arrays[4:8])
    assert (detector.nn_algorithm_, len(detector.memory_bank_)) == ("ivf", 128)
    centroids, rows, _ = detector._model.search._index
    assert len(centroids) == 11
    np.testing.assert_array_equal(np.sort(rows), np.arange(128))
    # A little more: the lists take the new entries, the centroids stay.
    detector.partial_fit(cell_arrays[:2])
    extended, rows, _ = detector._model.search._index
    np.testing.assert_array_equal(extended, centroids)
    np.testing.assert_array_equal(np.sort(rows), np.arange(160))
    # Scores as the exact search gives them, within what a missed neighbour
    # of eq. 7's may move.
    X = elpv_small.test_images
    exact = copy.deepcopy(detector)
    exact._model.search = MemoryBank(exact.memory_bank_)
    scores = detector.score_samples(X)
    np.testing.assert_allclose(scores, exact.score_samples(X), rtol=1e-3)
    # The choice and the index are kept by pickle, and so is the rule after
    # loading.
    restored = pickle.loads(pickle.dumps(detector))
    assert restored.nn_algorithm_ == "ivf"
    np.testing.assert_array_equal(restored._model.search._index[1], rows)
    np.testing.assert_array_equal(restored.score_samples(X), scores)
    refit = clone(detector).fit(cell_arrays[:4])
    assert refit.nn_algorithm_ == "exact"


def test_pipeline_and_clone(elpv_small, cell_arrays):
    pipeline = make_pipeline(
        FunctionTransformer(lambda X: X[:, 10:-10, 10:-10]),
        PatchCoreDetector(**FAST_PARAMS),
    )
    pipeline.fit(cell_arrays[:4])
    assert pipeline.predict(cell_arrays[4:6]).shape == (2,)
    assert pipeline.decision_function(cell_arrays[4:6]).shape == (2,)
    cloned = clone(pipeline[-1])
    assert cloned.get_params() == pipeline[-1].get_params()
    assert not hasattr(cloned, "memory_bank_")


def test_verbose_shows_a_bar_per_stage(cell_arrays, capsys):
    pytest.importorskip("tqdm")
    PatchCoreDetector(**FAST_PARAMS, verbose=1).fit(cell_arrays[:3])
    err = capsys.readouterr().err
    for stage in ("features", "coreset", "calibration"):
        assert stage in err
    assert "3/3" in err
    PatchCoreDetector(**FAST_PARAMS).fit(cell_arrays[:3])
    assert capsys.readouterr() == ("", "")


def test_verbose_without_tqdm_prints_counts(cell_arrays, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    detector = PatchCoreDetector(**FAST_PARAMS, verbose=1).fit(cell_arrays[:3])
    out = capsys.readouterr().out
    assert "features: 3/3 images" in out
    assert "calibration: 3/3 images" in out
    # verbose applies at each call, also after fit.
    detector.set_params(verbose=0).score_samples(cell_arrays[:2])
    assert capsys.readouterr().out == ""
    detector.set_params(verbose=1).score_samples(cell_arrays[:2])
    assert "scoring: 2/2 images" in capsys.readouterr().out


def test_use_before_fit():
    with pytest.raises(NotFittedError):
        PatchCoreDetector().score_samples(np.zeros((1, 8, 8), np.uint8))


@pytest.mark.parametrize(
    "X, error, match",
    [
        (np.zeros((0, 8, 8), np.uint8), ValueError, "empty"),
        ([], ValueError, "empty"),
        (np.zeros((8, 8), np.uint8), ValueError, "shape"),
        (np.zeros((2, 8, 8, 2), np.uint8), ValueError, "channels"),
        (np.full((2, 8, 8), np.nan), ValueError, "NaN"),
        (np.full((2, 8, 8), np.inf), ValueError, "NaN or infinity"),
        (np.full((2, 8, 8), 3.0), ValueError, r"\[0, 1\]"),
        (np.zeros((2, 8, 8), np.int64), TypeError, "dtype int64"),
        (np.zeros((2, 8, 8), object), TypeError, "dtype object"),
        (["no/such/image.png"], ValueError, "do not exist"),
        ("image.png", FileNotFoundError, "X is .image.png., which does not exist"),
        (np.zeros((40, 50, 3), np.uint8), ValueError, "looks like one RGB image"),
        ({"a.png": np.zeros((8, 8))}, TypeError, "X is a dict"),
        ([np.zeros((8, 8), np.uint8), 5], TypeError, "Image 1"),
        ([np.zeros((0, 8), np.uint8)], ValueError, "empty side"),
    ],
)
def test_bad_input_is_named(fast_detector, X, error, match):
    with pytest.raises(error, match=match):
        fast_detector.score_samples(X)
    with pytest.raises(error, match=match):
        clone(fast_detector).fit(X)


def test_corrupt_file(fast_detector, tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(good)
    path = tmp_path / "broken.png"
    path.write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match=r"Image 2 of X, '.*broken.png', cannot be"):
        fast_detector.score_samples([good, good, path])


def test_undecodable_images_are_named_by_position(fast_detector, tmp_path, monkeypatch):
    closed = Image.fromarray(np.zeros((8, 8), np.uint8))
    closed.close()
    with pytest.raises(ValueError, match=r"Image 1 of X \(a PIL image.*closed image"):
        fast_detector.score_samples([np.zeros((8, 8), np.uint8), closed])
    bomb = tmp_path / "bomb.png"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)
    with pytest.raises(ValueError, match=r"Image 0 of X, '.*bomb.png', .*bomb"):
        fast_detector.score_samples([bomb])


def test_one_training_image_is_refused(cell_arrays):
    with pytest.raises(ValueError, match="at least 2 training images"):
        PatchCoreDetector(**FAST_PARAMS).fit(cell_arrays[:1])


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(coreset_ratio=0.0), "coreset_ratio"),
        (dict(coreset_ratio=1.5), "coreset_ratio"),
        (dict(contamination=0.7), "contamination"),
        (dict(patch_size=2), "patch_size must be odd"),
        (dict(nn_algorithm="faiss"), "nn_algorithm"),
        (dict(resize=32, image_size=64), "resize=32 must be at least"),
        (dict(backbone="no_such_net"), "no_such_net"),
        (dict(layers=("stage3", "nope")), "nope"),
        (dict(device="tpu"), "device"),
        (dict(device="meta"), "device='meta' holds no data"),
        (dict(n_reweight_neighbors=0), "n_reweight_neighbors"),
        (
            dict(backbone="mobilenet_v2", weights=None),
            "'mobilenet_v2' has no default layers.*pass layers.*'features'",
        ),
        (
            dict(backbone=torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1))),
            r"layers must be given.*\['0'\]",
        ),
        (
            dict(backbone=torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1)), layers=("1",)),
            r"Unknown layer '1'.*\['0'\]",
        ),
        (dict(weights="IMAGENET1K_V1"), "no weights name of 'efficientnet_lite0'"),
    ],
)
def test_bad_parameters_are_named(cell_arrays, params, match):
    with pytest.raises(ValueError, match=match):
        PatchCoreDetector(**dict(FAST_PARAMS, **params)).fit(cell_arrays[:2])


@pytest.mark.parametrize(
    "device, available",
    [
        ("mps", lambda: torch.backends.mps.is_available()),
        ("xpu", lambda: hasattr(torch, "xpu") and torch.xpu.is_available()),
    ],
)
def test_unavailable_device_is_named(cell_arrays, device, available):
    if available():
        pytest.skip(f"{device} is available here")
    detector = PatchCoreDetector(**dict(FAST_PARAMS, device=device))
    with pytest.raises(ValueError, match=rf"device='{device}' is not available.*'cpu'"):
        detector.fit(cell_arrays[:2])


def test_image_size_too_small_for_the_backbone(cell_arrays):
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 7))
    detector = PatchCoreDetector(
        **dict(FAST_PARAMS, backbone=module, layers=("0",), image_size=4)
    )
    with pytest.raises(ValueError, match="image_size=4 is too small"):
        detector.fit(cell_arrays[:2])


@pytest.mark.parametrize(
    "params",
    [
        dict(image_size=96),
        dict(sigma=2.0),
        dict(coreset_ratio=0.5),
        dict(normalization=((0.5,) * 3, (0.25,) * 3)),
    ],
)
def test_model_parameters_changed_after_fit_are_refused(fast_detector, params):
    detector = copy.deepcopy(fast_detector).set_params(**params)
    name = next(iter(params))
    for method in ("score_samples", "anomaly_maps", "predict_masks", "predict"):
        with pytest.raises(ValueError, match=f"{name}=.* at fit, now"):
            getattr(detector, method)(np.zeros((1, 64, 64), np.uint8))
    # Set back, it scores again; a refit takes the new value.
    detector.set_params(**{name: fast_detector.get_params()[name]})
    detector.score_samples(np.zeros((1, 64, 64), np.uint8))


def test_runtime_parameters_may_change_after_fit(fast_detector, elpv_small, capsys):
    detector = copy.deepcopy(fast_detector).set_params(
        batch_size=3, n_jobs=2, verbose=1, device="cpu"
    )
    np.testing.assert_allclose(
        detector.score_samples(elpv_small.test_images),
        fast_detector.score_samples(elpv_small.test_images),
        rtol=1e-5,
    )
    # verbose takes effect at once: the scoring shows its progress.
    assert "scoring" in capsys.readouterr().err


def test_device_changed_after_fit_moves_backbone_and_search(
    fast_detector, elpv_small, monkeypatch
):
    # One device here: record the moves that device="cuda" would make, with
    # CUDA pretended available and the move itself a no-op.
    detector = copy.deepcopy(fast_detector)
    moves = []
    model = detector._model
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        "skpatchcore._feature_extractor.resolve_device",
        lambda device: torch.device(device),
    )
    monkeypatch.setattr(
        type(model.features),
        "to",
        lambda self, device: moves.append(("features", device)),
    )
    monkeypatch.setattr(
        type(model.search),
        "to",
        lambda self, device: moves.append(("search", device)) or self,
    )
    detector.set_params(device="cuda:0").score_samples(elpv_small.test_images[:1])
    assert ("features", torch.device("cuda:0")) in moves
    # The extractor reports the new device, and so does the detector.
    assert detector.feature_extractor_.device_ == torch.device("cuda:0")
    assert detector.device_ == torch.device("cuda:0")
    assert detector.feature_extractor_.device == "cuda:0"


def test_device_changed_after_fit_to_a_missing_one_is_refused(
    fast_detector, cell_arrays
):
    detector = copy.deepcopy(fast_detector).set_params(device="meta")
    with pytest.raises(ValueError, match="device='meta' holds no data"):
        detector.score_samples(cell_arrays[:1])
    # Set back, it scores on the device of fit.
    detector.set_params(device=fast_detector.device).score_samples(cell_arrays[:1])


@pytest.mark.parametrize(
    "params",
    [
        dict(patch_size=True),
        dict(patch_stride=True),
        dict(batch_size=True),
        dict(n_reweight_neighbors=False),
        dict(coreset_ratio=True),
        dict(sigma=True),
        dict(contamination=True),
        dict(max_calibration_images=np.True_),
        dict(image_size=True),
        dict(resize=True),
    ],
)
def test_bools_for_numbers_are_refused(cell_arrays, params):
    name = next(iter(params))
    detector = PatchCoreDetector(**dict(FAST_PARAMS, **params))
    # Out of range as numbers, sklearn's own check refuses them already.
    with pytest.raises(InvalidParameterError, match=f"'{name}' parameter of .* must"):
        detector.fit(cell_arrays[:2])


@pytest.mark.parametrize("case", ["two identical images", "three blank images"])
def test_thresholds_are_finite_when_one_image_supplies_the_bank(cell_arrays, case):
    # Duplicated patches are never chosen twice, so the first image supplies
    # the whole bank and cannot be scored without its own patches.
    images = {
        "two identical images": np.stack([cell_arrays[0], cell_arrays[0]]),
        "three blank images": np.full((3, 64, 64), 128, np.uint8),
    }[case]
    detector = PatchCoreDetector(**FAST_PARAMS).fit(images)
    assert np.isfinite(detector.offset_)
    assert np.isfinite(detector.pixel_threshold_)
    assert 1 <= detector.n_calibration_images_ <= len(images)
    scratched = images[:1].copy()
    height, width = images.shape[1:]
    defect = np.s_[height // 3 : height // 2, width // 6 : -width // 6]
    scratched[0][defect] = 255 - scratched[0][defect] // 2
    assert detector.predict(scratched)[0] == -1
    assert detector.predict_masks(scratched)[0][defect].any()


def test_thresholds_on_a_one_patch_grid(cell_arrays):
    module = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1)
    )
    detector = PatchCoreDetector(
        **dict(FAST_PARAMS, backbone=module, layers=("1",), patch_size=1)
    ).fit(cell_arrays[:2])
    assert detector.grid_shape_ == (1, 1)
    assert len(detector.memory_bank_) == 1
    assert np.isfinite(detector.offset_) and np.isfinite(detector.pixel_threshold_)
    assert detector.n_calibration_images_ == 1


def test_calibration_sample_is_bounded(cell_arrays):
    images = cell_arrays[:5]
    params = dict(FAST_PARAMS, coreset_ratio=1.0)
    detector = PatchCoreDetector(**params, max_calibration_images=3).fit(images)
    assert detector.n_calibration_images_ == 3
    # The seeded sample, drawn first from random_state.
    sample = np.sort(np.random.RandomState(0).choice(5, 3, False))
    held_out = []
    for i in sample:
        others = PatchCoreDetector(**params).fit(np.delete(images, i, axis=0))
        held_out.append(others.score_samples(images[i : i + 1])[0])
    # Three values never hold a Tukey outlier: "auto" is their minimum.
    np.testing.assert_allclose(detector.offset_, min(held_out), rtol=1e-4)


@pytest.mark.slow
def test_partitioned_fit_holds_only_the_bank_and_a_few_chunks():
    # 300 images of 32 x 32 patches with 64 features: 75 MiB of patch
    # features in all. The partitioned fit keeps 1 % of them and one chunk
    # of 8,192 patches (2 MiB) at a time; the greedy fit holds them all.
    import tracemalloc

    images = np.random.default_rng(0).integers(0, 255, (300, 32, 32), np.uint8)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 1))
    params = dict(
        backbone=module,
        layers=("0",),
        image_size=32,
        resize=None,
        patch_size=1,
        coreset_ratio=0.01,
        coreset_chunk_size=8192,
        max_calibration_images=2,
        random_state=0,
        batch_size=50,
    )
    all_features = 300 * 32 * 32 * 64 * 4

    def peak(method):
        detector = PatchCoreDetector(**params, coreset_method=method)
        tracemalloc.start()
        try:
            detector.fit(images)
            return tracemalloc.get_traced_memory()[1], detector
        finally:
            tracemalloc.stop()

    partitioned_peak, detector = peak("partitioned")
    assert len(detector.memory_bank_) == 3072
    assert partitioned_peak < all_features / 5
    greedy_peak, _ = peak("greedy")
    assert greedy_peak > all_features


def test_dask_cluster_selects_the_same_bank(cell_arrays):
    distributed = pytest.importorskip("distributed")
    from joblib import parallel_backend

    params = dict(
        FAST_PARAMS, coreset_method="partitioned", coreset_chunk_size=128, n_jobs=-1
    )
    local = PatchCoreDetector(**params).fit(cell_arrays[:6])
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster),
    ):
        with parallel_backend("dask"):
            remote = PatchCoreDetector(**params).fit(cell_arrays[:6])
    np.testing.assert_array_equal(remote.memory_bank_, local.memory_bank_)
    assert remote.offset_ == local.offset_


def test_first_partial_fit_is_fit(cell_arrays):
    fitted = PatchCoreDetector(**FAST_PARAMS).fit(cell_arrays[:5])
    partial = PatchCoreDetector(**FAST_PARAMS).partial_fit(cell_arrays[:5])
    np.testing.assert_array_equal(partial.memory_bank_, fitted.memory_bank_)
    assert partial.offset_ == fitted.offset_
    assert partial.pixel_threshold_ == fitted.pixel_threshold_
    # fit starts afresh, also after partial_fit.
    partial.partial_fit(cell_arrays[5:7]).fit(cell_arrays[:5])
    np.testing.assert_array_equal(partial.memory_bank_, fitted.memory_bank_)
    assert partial.n_train_images_ == 5


def test_partial_fit_adds_a_coreset_of_the_new_images(cell_arrays):
    detector = PatchCoreDetector(**FAST_PARAMS).partial_fit(cell_arrays[:4])
    before = detector.memory_bank_.copy()
    detector.partial_fit(cell_arrays[4:7])
    bank = detector.memory_bank_
    n_patches = 7 * np.prod(detector.grid_shape_)
    assert len(bank) == np.ceil(FAST_PARAMS["coreset_ratio"] * n_patches)
    np.testing.assert_array_equal(bank[: len(before)], before)
    new_patches = detector.feature_extractor_.transform(cell_arrays[4:7])
    new_patches = new_patches.reshape(-1, bank.shape[1])
    for row in bank[len(before) :]:
        assert np.abs(new_patches - row).max(axis=1).min() < 1e-6
    assert detector.n_train_images_ == 7


def test_partial_fit_thresholds_follow_more_varied_images(cell_arrays):
    params = dict(FAST_PARAMS, coreset_ratio=1.0)
    detector = PatchCoreDetector(**params).fit(cell_arrays[:4])
    offset, pixel_threshold = detector.offset_, detector.pixel_threshold_
    # Good images that vary more: a coarse random pattern of its own in each
    # (blocks of 20 pixels, which survive the resize to 64).
    rng = np.random.default_rng(0)
    varied = cell_arrays[4:8].copy()
    pattern = rng.integers(0, 255, (4, 10, 10), np.uint8)
    varied[:, 50:250, 50:250] = np.kron(pattern, np.ones((1, 20, 20), np.uint8))
    detector.partial_fit(varied)
    assert detector.n_calibration_images_ == 8
    assert detector.offset_ < offset
    assert detector.pixel_threshold_ > pixel_threshold
    # The earlier images keep their scores, and the thresholds follow all eight.
    scores = detector.calibration_scores_.tolist()
    assert detector.offset_ == -tukey_whisker([-score for score in scores])
    assert detector.pixel_threshold_ == tukey_whisker(
        detector.calibration_map_maxima_.tolist()
    )


def test_partial_fit_after_loading(cell_arrays, tmp_path):
    detector = PatchCoreDetector(**FAST_PARAMS).fit(cell_arrays[:4])
    joblib.dump(detector, tmp_path / "detector.joblib")
    loaded = joblib.load(tmp_path / "detector.joblib")
    loaded.partial_fit(cell_arrays[4:6])
    detector.partial_fit(cell_arrays[4:6])
    np.testing.assert_array_equal(loaded.memory_bank_, detector.memory_bank_)
    assert loaded.offset_ == detector.offset_
    np.testing.assert_array_equal(
        loaded.score_samples(cell_arrays[6:8]), detector.score_samples(cell_arrays[6:8])
    )


def test_partial_fit_refuses_changed_model_parameters(fast_detector, cell_arrays):
    detector = copy.deepcopy(fast_detector).set_params(patch_size=5)
    with pytest.raises(ValueError, match="Cannot partial_fit: .*patch_size=3 at fit"):
        detector.partial_fit(cell_arrays[:2])
    # One new image is enough once fitted; the runtime parameters may change.
    detector.set_params(patch_size=3, batch_size=1).partial_fit(cell_arrays[:1])
    assert detector.n_train_images_ == fast_detector.n_train_images_ + 1


def test_partial_fit_bounds_the_calibration_sample(cell_arrays):
    params = dict(FAST_PARAMS, max_calibration_images=3)
    detector = PatchCoreDetector(**params).fit(cell_arrays[:4])
    assert detector.n_calibration_images_ == 3
    detector.partial_fit(cell_arrays[4:8])
    assert detector.n_calibration_images_ == 3
    assert len(detector.calibration_scores_) == 3


@pytest.mark.parametrize("method", ["fit", "partial_fit"])
def test_a_failed_fit_leaves_the_detector_as_it_was(cell_arrays, tmp_path, method):
    detector = PatchCoreDetector(**FAST_PARAMS).fit(cell_arrays[:3])
    saved = copy.deepcopy(detector.__dict__)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    good = tmp_path / "good.png"
    Image.fromarray(cell_arrays[3]).save(good)
    with pytest.raises(ValueError, match="broken.png"):
        getattr(detector, method)([good, broken])
    np.testing.assert_array_equal(detector.memory_bank_, saved["memory_bank_"])
    for name in ("offset_", "pixel_threshold_", "n_train_images_"):
        assert getattr(detector, name) == saved[name]
    assert (
        detector._random_state.get_state()[2] == saved["_random_state"].get_state()[2]
    )


def test_pipeline_one_liner_gives_the_detectors_maps(elpv_small, cell_arrays):
    # The user guide's "In a Pipeline" recipe, checked against a detector
    # fitted on images cropped by hand.
    def crop_border(images):
        return np.asarray(images)[:, 20:-20, 20:-20]

    train = cell_arrays[:6]
    test = np.stack([np.asarray(Image.open(p)) for p in elpv_small.test_images])
    pipe = make_pipeline(
        FunctionTransformer(crop_border), PatchCoreDetector(**FAST_PARAMS)
    ).fit(train)
    direct = PatchCoreDetector(**FAST_PARAMS).fit(train[:, 20:-20, 20:-20])
    cropped = test[:, 20:-20, 20:-20]

    np.testing.assert_array_equal(pipe.predict(test), direct.predict(cropped))
    for method in ("score_samples", "decision_function"):
        np.testing.assert_allclose(
            getattr(pipe, method)(test), getattr(direct, method)(cropped), rtol=1e-6
        )
    maps = pipe[-1].anomaly_maps(pipe[:-1].transform(test))
    assert [m.shape for m in maps] == [(260, 260)] * len(test)
    for got, expected in zip(maps, direct.anomaly_maps(cropped)):
        np.testing.assert_allclose(got, expected, rtol=1e-6)
    masks = pipe[-1].predict_masks(pipe[:-1].transform(test))
    for got, expected in zip(masks, direct.predict_masks(cropped)):
        np.testing.assert_array_equal(got, expected)

    # The detector alone: pipe[:-1] has no transform, pipe[-1] is the way.
    alone = make_pipeline(PatchCoreDetector(**FAST_PARAMS)).fit(train)
    with pytest.raises(AttributeError):
        alone[:-1].transform(test)
    np.testing.assert_array_equal(alone.predict(test), alone[-1].predict(test))
    for got, expected in zip(
        alone[-1].anomaly_maps(test),
        PatchCoreDetector(**FAST_PARAMS).fit(train).anomaly_maps(test),
    ):
        np.testing.assert_allclose(got, expected, rtol=1e-6)


# KolektorSDD, MVTec layout, beside MPDD: long grayscale commutators.
KOLEKTOR = MPDD.parent / "kolektorsdd"

KEEP_ASPECT = dict(FAST_PARAMS, resize="keep_aspect")


@pytest.fixture(scope="module")
def strips(elpv_small):
    """Six 100 x 300 strips cut from real cells, for keep-aspect training."""
    cells = [np.asarray(Image.open(path)) for path in elpv_small.train_images]
    return [cell[:100] for cell in cells[:4]] + [cell[150:250] for cell in cells[4:6]]


@pytest.fixture(scope="module")
def keep_aspect_detector(strips):
    """A keep-aspect detector fitted on the strips; do not modify it."""
    return PatchCoreDetector(**KEEP_ASPECT).fit(strips)


def test_height_and_width_image_size(strips, cell_arrays):
    params = dict(FAST_PARAMS, image_size=(64, 160), resize=None)
    detector = clone(PatchCoreDetector(**params)).fit(strips)
    # Lite0's stage3 grid has stride 8.
    assert detector.grid_shape_ == (8, 20)
    assert len(detector.memory_bank_) == math.ceil(0.25 * 6 * 8 * 20)
    test = [cell_arrays[6][:90], cell_arrays[7]]
    assert [m.shape for m in detector.anomaly_maps(test)] == [(90, 300), (300, 300)]
    # Cropped from the shorter side resized to 80, a 64 x 160 window fits in
    # a wide image but not in a square one.
    detector = PatchCoreDetector(**dict(params, resize=80)).fit(strips)
    assert detector.score_samples(test[:1]).shape == (1,)
    with pytest.raises(ValueError, match=r"80 x 80 pixels.*64 x 160 window"):
        detector.score_samples(test[1:])


def test_keep_aspect_bank_counts_the_patches_of_each_shape(keep_aspect_detector):
    detector = keep_aspect_detector
    # By hand: 100 x 300 -> shorter side 64, longer 192 (a multiple of
    # Lite0's stride 16); stage3's grid (stride 8) -> 8 x 24 patches each.
    assert detector.grid_shape_ is None
    assert detector.feature_extractor_.size_multiple_ == 16
    assert detector.feature_extractor_.get_grid_shape((100, 300)) == (8, 24)
    assert len(detector.memory_bank_) == math.ceil(0.25 * 6 * 8 * 24)
    assert np.isfinite(detector.offset_) and np.isfinite(detector.pixel_threshold_)


def test_keep_aspect_fits_on_one_shape_and_scores_others(
    keep_aspect_detector, cell_arrays
):
    detector = copy.deepcopy(keep_aspect_detector).set_params(batch_size=2)
    test = [cell_arrays[6][:, :120], cell_arrays[7], cell_arrays[0][:100], None]
    test[3] = cell_arrays[1][50:130, 20:]  # 80 x 280
    maps, scores = detector.anomaly_maps(test, return_score_samples=True)
    masks = detector.predict_masks(test)
    for image, anomaly_map, mask in zip(test, maps, masks):
        assert anomaly_map.shape == mask.shape == image.shape
        np.testing.assert_array_equal(mask, anomaly_map > detector.pixel_threshold_)
    np.testing.assert_array_equal(scores, detector.score_samples(test))
    # Mixed shapes in batches of 2 score as each image alone.
    for image, anomaly_map, score in zip(test, maps, scores):
        (alone_map,), alone = detector.anomaly_maps([image], return_score_samples=True)
        np.testing.assert_allclose(alone, score, rtol=1e-5)
        np.testing.assert_allclose(alone_map, anomaly_map, rtol=1e-4, atol=1e-5)


def test_keep_aspect_held_out_scores_leave_out_each_image(cell_arrays):
    # Images of three shapes, so that each has its own number of patches:
    # with every patch kept, image i scored without its own bank rows is
    # image i scored by a detector fitted on the others.
    images = [cell_arrays[0][:100], cell_arrays[1][:, :120], cell_arrays[2][:150]]
    params = dict(KEEP_ASPECT, coreset_ratio=1.0)
    detector = PatchCoreDetector(**params).fit(images)
    assert len(detector.memory_bank_) == sum(
        math.prod(detector.feature_extractor_.get_grid_shape(i.shape)) for i in images
    )
    for i, image in enumerate(images):
        others = PatchCoreDetector(**params).fit(images[:i] + images[i + 1 :])
        np.testing.assert_allclose(
            detector.calibration_scores_[i],
            others.score_samples([image])[0],
            rtol=1e-4,
        )


def test_keep_aspect_partial_fit_keeps_the_bank_ratio(strips, cell_arrays):
    detector = PatchCoreDetector(**KEEP_ASPECT).partial_fit(strips[:3])
    more = [cell_arrays[6][:, :100], cell_arrays[7][:, 100:200]]  # 300 x 100
    detector.partial_fit(more)
    # 3 strips of 8 x 24 patches, 2 upright ones of 24 x 8.
    assert detector.n_train_images_ == 5
    assert len(detector.memory_bank_) == math.ceil(0.25 * 5 * 8 * 24)


def test_keep_aspect_detector_pickles(keep_aspect_detector, cell_arrays, tmp_path):
    test = [cell_arrays[6][:, :120], cell_arrays[7]]
    expected_maps, expected = keep_aspect_detector.anomaly_maps(
        test, return_score_samples=True
    )
    for restored in (
        pickle.loads(pickle.dumps(keep_aspect_detector)),
        joblib.load(joblib.dump(keep_aspect_detector, tmp_path / "d.joblib")[0]),
    ):
        maps, scores = restored.anomaly_maps(test, return_score_samples=True)
        np.testing.assert_array_equal(scores, expected)
        for anomaly_map, expected_map in zip(maps, expected_maps):
            np.testing.assert_array_equal(anomaly_map, expected_map)
        assert restored.get_params() == keep_aspect_detector.get_params()


def _kolektor_scratch():
    """A good KolektorSDD part, and a copy with a dark scratch painted on.

    The scratch lies near the bottom of the 1263 x 500 part, below the
    square that a centre crop keeps.
    """
    path = sorted((KOLEKTOR / "test" / "good").glob("*.png"))[0]
    image = np.asarray(Image.open(path))
    scratch = np.s_[1000:1008, 150:350]
    scratched = image.copy()
    scratched[scratch] = 0
    return image, scratched, scratch


def _mass_near(anomaly_map, clean_map, scratch, margin=100):
    """Share of the map's excess over the clean image's map near the scratch.

    A scratch changes the features of every patch whose receptive field
    reaches it; 100 pixels of the part are 45 of a 224-wide model input,
    under 6 patches of the grid.
    """
    excess = np.clip(anomaly_map - clean_map, 0, None)
    rows, cols = scratch
    near = excess[
        rows.start - margin : rows.stop + margin,
        cols.start - margin : cols.stop + margin,
    ]
    return near.sum() / excess.sum()


@pytest.mark.slow
@pytest.mark.skipif(not KOLEKTOR.is_dir(), reason="shared KolektorSDD not present")
def test_keep_aspect_finds_a_scratch_where_it_is_on_a_long_part():
    train = sorted((KOLEKTOR / "train" / "good").glob("*.png"))[:6]
    image, scratched, scratch = _kolektor_scratch()
    detector = PatchCoreDetector(
        backbone="efficientnet_lite0",
        image_size=224,
        resize="keep_aspect",
        random_state=0,
    ).fit(train)
    (anomaly_map, clean_map), scores = detector.anomaly_maps(
        [scratched, image], return_score_samples=True
    )
    assert anomaly_map.shape == image.shape
    row, col = np.unravel_index(anomaly_map.argmax(), anomaly_map.shape)
    rows, cols = scratch
    assert rows.start <= row < rows.stop and cols.start <= col < cols.stop
    assert _mass_near(anomaly_map, clean_map, scratch) > 0.75
    assert scores[0] < detector.offset_ <= scores[1]


@pytest.mark.slow
@pytest.mark.skipif(not KOLEKTOR.is_dir(), reason="shared KolektorSDD not present")
def test_keep_aspect_localises_better_than_crop_or_squash():
    train = sorted((KOLEKTOR / "train" / "good").glob("*.png"))[:6]
    image, scratched, scratch = _kolektor_scratch()
    results = {}
    for name, resize in [("crop", 256), ("squash", None), ("keep", "keep_aspect")]:
        detector = PatchCoreDetector(
            backbone="efficientnet_lite0", resize=resize, random_state=0
        ).fit(train)
        (anomaly_map, clean_map), scores = detector.anomaly_maps(
            [scratched, image], return_score_samples=True
        )
        results[name] = scores, anomaly_map, clean_map
    # The centre crop never sees the scratch: the image scores as if clean.
    crop_scores, crop_map, crop_clean_map = results["crop"]
    assert crop_scores[0] == crop_scores[1]
    np.testing.assert_array_equal(crop_map, crop_clean_map)
    # Squashed, the scratch is found, but blurred over more of the part.
    _, *squash_maps = results["squash"]
    _, *keep_maps = results["keep"]
    assert _mass_near(*keep_maps, scratch) > _mass_near(*squash_maps, scratch)


def test_bool_for_an_int_is_named_as_such(cell_arrays):
    from skpatchcore import PatchCoreEnsemble, PatchFeatureExtractor

    message = "'patch_size' parameter of .* must be an int, not a bool; got True"
    with pytest.raises(InvalidParameterError, match=message):
        PatchCoreDetector(**dict(FAST_PARAMS, patch_size=True)).fit(cell_arrays[:2])
    with pytest.raises(InvalidParameterError, match=message):
        PatchFeatureExtractor(patch_size=True).fit()
    member = PatchCoreDetector(**dict(FAST_PARAMS, patch_size=True))
    with pytest.raises(InvalidParameterError, match=message):
        PatchCoreEnsemble([("a", member)]).fit(cell_arrays[:2])


def test_tiny_backbone_maps_decisions_and_masks():
    # Fast: with one feature per pixel, no smoothing and every training
    # pixel in the bank, a map is each pixel's distance to its nearest
    # training pixel, computed here with NumPy.
    train, test = odd_one_out_images()
    detector = tiny_detector(sigma=0.0, n_reweight_neighbors=1).fit(train)
    bank = tiny_features(train).reshape(-1, 4)
    features = tiny_features(test)
    gaps = features[..., None, :] - bank
    expected = np.sqrt((gaps**2).sum(axis=-1)).min(axis=-1)
    maps, scores = detector.anomaly_maps(test, return_score_samples=True)
    np.testing.assert_allclose(np.stack(maps), expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(scores, -expected.max(axis=(1, 2)), rtol=1e-4)
    assert list(detector.predict(test)) == [1, -1]
    mask = detector.predict_masks(test)[1]
    assert mask[2:4, 5:7].all() and mask.sum() == 4
    assert not detector.predict_masks(test)[0].any()


def test_tiny_partial_fit_keeps_every_patch_of_both_calls():
    # Fast: with coreset_ratio=1 the bank is every training pixel's feature,
    # whichever call brought it; compared as sets of rows.
    train, test = odd_one_out_images()
    detector = tiny_detector().partial_fit(train[:4]).partial_fit(train[4:])
    assert detector.n_train_images_ == 8
    expected = tiny_features(train).reshape(-1, 4)
    bank = detector.memory_bank_.astype(np.float64)
    np.testing.assert_allclose(
        bank[np.lexsort(bank.T)], expected[np.lexsort(expected.T)], rtol=1e-5
    )
    assert list(detector.predict(test)) == [1, -1]
    with pytest.raises(ValueError, match="sigma"):
        detector.set_params(sigma=1.0).predict(test)
