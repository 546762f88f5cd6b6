"""Fitting, loading and scoring in several threads of one process at once.

Building a network must not touch process-wide state: the former
``torch.fx`` taps patched ``torch.nn.Module.__call__`` while tracing, so a
forward pass in one thread failed while another thread fitted or loaded.
"""

from concurrent.futures import ThreadPoolExecutor

import joblib
import numpy as np
import pytest
from conftest import FAST_PARAMS, odd_one_out_images, tiny_detector
from sklearn.model_selection import GridSearchCV

from skpatchcore import PatchCoreDetector, PatchFeatureExtractor
from skpatchcore.model_selection import NoveltyCV

N_WORKERS = 4


def _run_at_once(tasks):
    """Run the callables in a pool of threads; return their results in order."""
    with ThreadPoolExecutor(N_WORKERS) as pool:
        futures = [pool.submit(task) for task in tasks]
        errors = [future.exception() for future in futures]
    failed = [error for error in errors if error is not None]
    assert not failed, f"{len(failed)} of {len(tasks)} calls failed: {failed[0]!r}"
    return [future.result() for future in futures]


@pytest.fixture(scope="module")
def saved_detector(fast_detector, tmp_path_factory):
    path = tmp_path_factory.mktemp("threads") / "detector.joblib"
    joblib.dump(fast_detector, path)
    return path


@pytest.mark.slow
def test_extractors_fit_and_transform_at_once():
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), np.uint8)
    params = {
        name: FAST_PARAMS[name]
        for name in ("backbone", "image_size", "resize", "feature_dim")
    }
    expected = PatchFeatureExtractor(**params).fit().transform(images)

    def fit_and_transform():
        return PatchFeatureExtractor(**params).fit().transform(images)

    for features in _run_at_once([fit_and_transform] * 8):
        np.testing.assert_array_equal(features, expected)


def test_detectors_fit_load_and_score_at_once(
    fast_detector, saved_detector, elpv_small
):
    X = elpv_small.test_images
    expected = fast_detector.score_samples(X)

    def score():
        # One fitted detector, shared by the threads.
        return fast_detector.score_samples(X)

    def fit_and_score():
        detector = PatchCoreDetector(**FAST_PARAMS).fit(elpv_small.train_images)
        return detector.score_samples(X)

    def load_and_score():
        return joblib.load(saved_detector).score_samples(X)

    tasks = [score, fit_and_score, score, load_and_score] * 4
    # A fit selects its coreset on one torch thread, a process-wide setting:
    # a scoring thread may then cut its backbone passes differently, which
    # moves features in their last bits (the batch rounding the docs allow).
    for scores in _run_at_once(tasks):
        np.testing.assert_allclose(scores, expected, rtol=1e-5)


def test_grid_search_with_threads(elpv_small):
    images = list(elpv_small.train_images) + list(elpv_small.test_images)
    labels = np.r_[np.ones(len(elpv_small.train_images), int), elpv_small.test_labels]
    search = GridSearchCV(
        PatchCoreDetector(**FAST_PARAMS),
        {"patch_size": [1, 3]},
        scoring="roc_auc",
        cv=NoveltyCV(2),
        refit=False,
        n_jobs=2,
        error_score="raise",
    )

    with joblib.parallel_backend("threading"):
        search.fit(images, labels)

    assert len(search.cv_results_["params"]) == 2
    assert np.all(np.isfinite(search.cv_results_["mean_test_score"]))


def test_tiny_detectors_fit_load_and_score_at_once(tmp_path):
    # Fast: a 1x1-convolution backbone on synthetic images.
    train, test = odd_one_out_images()
    fitted = tiny_detector().fit(train)
    expected = fitted.score_samples(test)
    path = tmp_path / "detector.joblib"
    joblib.dump(fitted, path)

    def score():
        return fitted.score_samples(test)

    def fit_and_score():
        return tiny_detector().fit(train).score_samples(test)

    def load_and_score():
        return joblib.load(path).score_samples(test)

    for scores in _run_at_once([score, fit_and_score, load_and_score] * 4):
        np.testing.assert_allclose(scores, expected, rtol=1e-5)
