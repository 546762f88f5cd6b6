"""Fits on real images with real ImageNet weights: quality far above chance."""

import numpy as np
import pytest
from conftest import MPDD
from sklearn.model_selection import GridSearchCV, StratifiedKFold

from skpatchcore import PatchCoreDetector
from skpatchcore.datasets import load_elpv, load_mvtec_folder
from skpatchcore.metrics import aupro, image_auroc, pixel_auroc
from skpatchcore.model_selection import NoveltyCV

pytestmark = pytest.mark.slow


def test_elpv_cells():
    data = load_elpv(
        "mono", train_size=40, n_test_normal=25, n_test_defective=25, random_state=0
    )
    detector = PatchCoreDetector(backbone="efficientnet_lite0", random_state=0)
    detector.fit(data.train_images)
    scores = detector.score_samples(data.test_images)
    assert image_auroc(data.test_labels, scores) > 0.8


@pytest.mark.skipif(not MPDD.is_dir(), reason="MPDD metal_plate folder not present")
def test_mpdd_metal_plate_detection_and_localisation():
    data = load_mvtec_folder(MPDD)
    detector = PatchCoreDetector(backbone="efficientnet_lite0", random_state=0)
    detector.fit(data.train_images[::2])
    scores = detector.score_samples(data.test_images)
    maps = detector.anomaly_maps(data.test_images)
    assert image_auroc(data.test_labels, scores) > 0.95
    assert pixel_auroc(data.test_masks, maps) > 0.95
    assert aupro(data.test_masks, maps) > 0.7
    # With contamination="auto" most good test plates are inliers.
    good = data.test_labels == 1
    assert (detector.predict(np.asarray(data.test_images)[good]) == 1).mean() > 0.7


def test_grid_search_over_patch_size_and_coreset_ratio():
    data = load_elpv(
        "mono", train_size=30, n_test_normal=1, n_test_defective=15, random_state=1
    )
    defective = [p for p, y in zip(data.test_images, data.test_labels) if y == -1]
    images = list(data.train_images) + defective
    labels = np.r_[np.ones(30, int), -np.ones(len(defective), int)]
    search = GridSearchCV(
        PatchCoreDetector(
            backbone="efficientnet_lite0", image_size=128, resize=None, random_state=0
        ),
        {"patch_size": [1, 3], "coreset_ratio": [0.05, 0.2]},
        scoring="roc_auc",
        cv=NoveltyCV(StratifiedKFold(3, shuffle=True, random_state=0)),
        refit=False,
    ).fit(images, labels)
    assert len(search.cv_results_["params"]) == 4
    assert np.all(np.isfinite(search.cv_results_["mean_test_score"]))
    assert search.best_score_ > 0.7
    normal = [image for image, label in zip(images, labels) if label == 1]
    best = PatchCoreDetector(
        backbone="efficientnet_lite0",
        image_size=128,
        resize=None,
        random_state=0,
        **search.best_params_,
    )
    best.fit(normal)
    assert best.n_train_images_ == 30
