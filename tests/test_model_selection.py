"""NoveltyCV: the wrapped splitter's folds, with the anomalies out of training."""

import numpy as np
import pytest
from conftest import odd_one_out_images, tiny_detector
from sklearn.model_selection import GridSearchCV, KFold, StratifiedKFold

from skpatchcore.model_selection import NoveltyCV


def test_folds_are_the_splitters_without_anomalies_in_training():
    y = np.array([1, -1, 1, 1, -1, 1, 1, -1, 1, 1])
    splitter = StratifiedKFold(3, shuffle=True, random_state=0)
    folds = list(NoveltyCV(splitter).split(np.zeros(len(y)), y))
    expected = list(splitter.split(np.zeros(len(y)), y))
    assert len(folds) == NoveltyCV(splitter).get_n_splits() == 3
    for (train, test), (plain_train, plain_test) in zip(folds, expected):
        np.testing.assert_array_equal(test, plain_test)
        np.testing.assert_array_equal(train, [i for i in plain_train if y[i] == 1])
    # An int is the number of stratified folds, as in the docstring.
    tests = [test for _, test in NoveltyCV(2).split(np.zeros(6), [1, 1, 1, 1, -1, -1])]
    assert [list(t) for t in tests] == [[0, 1, 4], [2, 3, 5]]
    assert repr(NoveltyCV(2)) == "NoveltyCV(cv=2)"


@pytest.mark.parametrize(
    "y, match",
    [(None, "needs the labels"), ([0, 1, 0, 1], r"got \[0, 1\]")],
)
def test_bad_labels_are_refused(y, match):
    with pytest.raises(ValueError, match=match):
        next(NoveltyCV(2).split(np.zeros(4), y))


def test_training_fold_without_normal_samples_is_refused():
    with pytest.raises(ValueError, match="no normal"):
        list(NoveltyCV(KFold(2)).split(np.zeros(4), [-1, -1, 1, 1]))


def test_grid_search_of_tiny_detectors():
    # Fast: a 1x1-convolution backbone; each odd image has a red block, so
    # every candidate separates the test folds perfectly.
    train, odd = odd_one_out_images()
    spotted = [
        np.roll(odd[1], shift, axis=(0, 1)) for shift in [(0, 0), (3, -4), (4, -2)]
    ]
    images = list(train) + spotted
    labels = np.r_[np.ones(len(train), int), -np.ones(len(spotted), int)]
    search = GridSearchCV(
        tiny_detector(),
        {"patch_size": [1, 3]},
        scoring="roc_auc",
        cv=NoveltyCV(3),
        error_score="raise",
    ).fit(images, labels)
    np.testing.assert_array_equal(search.cv_results_["mean_test_score"], [1.0, 1.0])
    assert search.best_estimator_.n_train_images_ == len(train)
