import itertools
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.metrics import f1_score, roc_auc_score
from sklearn.model_selection import GridSearchCV

from skpatchcore.metrics import (
    aupro,
    f1_max,
    image_auroc,
    image_auroc_scorer,
    make_aupro_scorer,
    pixel_auroc,
    pro_curve,
)


def _mann_whitney_auc(positive_scores, negative_scores):
    """AUROC as the fraction of (positive, negative) pairs ranked right."""
    wins = sum(
        1.0 if p > n else 0.5 if p == n else 0.0
        for p, n in itertools.product(positive_scores, negative_scores)
    )
    return wins / (len(positive_scores) * len(negative_scores))


def _two_region_example():
    """Two images: a 4x4 one with a 4-pixel and a 1-pixel defect, a 3x3 good one."""
    mask = np.zeros((4, 4), dtype=bool)
    mask[0:2, 0:2] = True  # region A, 4 pixels
    mask[3, 3] = True  # region B, 1 pixel
    anomaly_map = np.zeros((4, 4))
    anomaly_map[0:2, 0:2] = [[0.9, 0.8], [0.3, 0.2]]
    anomaly_map[3, 3] = 0.6
    anomaly_map[0, 3] = 0.7  # good pixel
    anomaly_map[2, 0] = 0.5  # good pixel
    good_map = np.zeros((3, 3))
    good_map[1, 1] = 0.55
    return [mask, None], [anomaly_map, good_map]


# The example by hand. There are 11 + 9 = 20 good pixels and 2 regions;
# PRO = (overlap of A + overlap of B) / 2.
#   threshold  newly above         FPR         PRO
#   0.9        A pixel             0/20 = 0    (1/4 + 0) / 2 = 0.125
#   0.8        A pixel             0           (2/4 + 0) / 2 = 0.25
#   0.7        good pixel          1/20 = 0.05 0.25
#   0.6        B                   0.05        (2/4 + 1) / 2 = 0.75
#   0.55       good pixel          2/20 = 0.1  0.75
#   0.5        good pixel          3/20 = 0.15 0.75
#   0.3        A pixel             0.15        (3/4 + 1) / 2 = 0.875
#   0.2        A pixel             0.15        (4/4 + 1) / 2 = 1
#   0          17 good pixels      20/20 = 1   1
HAND_CURVE = {
    np.inf: (0.0, 0.0),
    0.9: (0.0, 0.125),
    0.8: (0.0, 0.25),
    0.7: (0.05, 0.25),
    0.6: (0.05, 0.75),
    0.55: (0.1, 0.75),
    0.5: (0.15, 0.75),
    0.3: (0.15, 0.875),
    0.2: (0.15, 1.0),
    0.0: (1.0, 1.0),
}


def test_pro_curve_hand_example():
    fpr, pro, thresholds = pro_curve(*_two_region_example())

    assert thresholds[0] == np.inf
    assert np.all(np.diff(thresholds) < 0)
    assert set(thresholds) <= set(HAND_CURVE)
    # 0.55 may only be left out because (0.1, 0.75) lies on the horizontal
    # run from (0.05, 0.75) to (0.15, 0.75).
    assert set(HAND_CURVE) - set(thresholds) <= {0.55}
    expected = np.array([HAND_CURVE[t] for t in thresholds])
    np.testing.assert_allclose(fpr, expected[:, 0])
    np.testing.assert_allclose(pro, expected[:, 1])


@pytest.mark.parametrize(
    "fpr_limit, expected",
    [
        # area 0.05 * 0.25 + 0.05 * 0.75 = 0.05
        (0.1, 0.05 / 0.1),
        # area 0.05 * 0.25 + 0.07 * 0.75 = 0.065, the curve cut at 0.12
        (0.12, 0.065 / 0.12),
        # area 0.0125 + 0.10 * 0.75 + 0.15 * 1 = 0.2375
        (0.3, 0.2375 / 0.3),
        (1.0, 0.0125 + 0.075 + 0.85),
    ],
)
def test_aupro_hand_example(fpr_limit, expected):
    masks, maps = _two_region_example()
    assert aupro(masks, maps, fpr_limit=fpr_limit) == pytest.approx(expected)


def test_pro_regions_are_8_connected():
    # (1, 0) and (2, 1) touch at a corner: one region of 3 pixels, of which
    # only (2, 1) is detected, so PRO = 1/3. With 4-connectivity it would be
    # (0/2 + 1/1) / 2 = 0.5.
    mask = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=bool)
    anomaly_map = np.zeros((3, 3))
    anomaly_map[2, 1] = 1.0
    fpr, pro, thresholds = pro_curve([mask], [anomaly_map])
    np.testing.assert_allclose(fpr, [0, 0, 1])
    np.testing.assert_allclose(pro, [0, 1 / 3, 1])
    np.testing.assert_array_equal(thresholds, [np.inf, 1.0, 0.0])


def _brute_force_point(masks, maps, threshold):
    """FPR and PRO at one threshold, straight from their definitions."""
    overlaps, false_positives, n_good = [], 0, 0
    for mask, anomaly_map in zip(masks, maps):
        predicted = anomaly_map >= threshold
        regions, n_regions = ndimage.label(mask, structure=np.ones((3, 3)))
        for region in range(1, n_regions + 1):
            overlaps.append(predicted[regions == region].mean())
        false_positives += np.sum(predicted & ~mask)
        n_good += np.sum(~mask)
    return false_positives / n_good, np.mean(overlaps)


def _brute_force_aupro(masks, maps, fpr_limit):
    thresholds = np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]
    points = [(0.0, 0.0)] + [_brute_force_point(masks, maps, t) for t in thresholds]
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


@pytest.mark.parametrize("seed", range(5))
def test_pro_curve_matches_brute_force(seed):
    rng = np.random.RandomState(seed)
    shapes = [(6, 7), (5, 5), (8, 4)]
    masks = [rng.rand(*shape) < 0.3 for shape in shapes]
    # Few distinct values, so that good and defective pixels tie.
    maps = [rng.randint(0, 6, size=shape) for shape in shapes]

    fpr, pro, thresholds = pro_curve(masks, maps)
    for x, y, threshold in zip(fpr[1:], pro[1:], thresholds[1:]):
        assert (x, y) == pytest.approx(_brute_force_point(masks, maps, threshold))
    for fpr_limit in (0.05, 0.3, 1.0):
        assert aupro(masks, maps, fpr_limit=fpr_limit) == pytest.approx(
            _brute_force_aupro(masks, maps, fpr_limit)
        )


@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_aupro_perfect_constant_and_inverted_maps(fpr_limit):
    masks = [np.zeros((5, 6), dtype=bool), np.zeros((7, 4), dtype=bool)]
    masks[0][1:3, 1:4] = True
    masks[1][6, 0] = True
    perfect = [mask.astype(float) for mask in masks]
    assert aupro(masks, perfect, fpr_limit=fpr_limit) == pytest.approx(1.0)
    # A constant map gives the diagonal from (0, 0) to (1, 1), whose area
    # up to the limit is limit**2 / 2.
    constant = [np.ones(mask.shape) for mask in masks]
    assert aupro(masks, constant, fpr_limit=fpr_limit) == pytest.approx(fpr_limit / 2)
    inverted = [1.0 - m for m in perfect]
    assert aupro(masks, inverted, fpr_limit=fpr_limit) == pytest.approx(0.0)


def test_pixel_auroc():
    rng = np.random.RandomState(0)
    shapes = [(5, 6), (4, 4), (7, 3)]
    masks = [rng.rand(*shape) < 0.25 for shape in shapes]
    maps = [rng.randint(0, 5, size=shape).astype(np.float32) for shape in shapes]
    defective = np.concatenate([m[k] for k, m in zip(masks, maps)])
    good = np.concatenate([m[~k] for k, m in zip(masks, maps)])

    result = pixel_auroc(masks, maps)
    assert result == pytest.approx(_mann_whitney_auc(defective, good))
    assert result == pytest.approx(
        roc_auc_score(
            np.concatenate([k.ravel() for k in masks]),
            np.concatenate([m.ravel() for m in maps]),
        )
    )


def test_pixel_metrics_accept_paths_and_none(tmp_path):
    mask = np.zeros((4, 5), dtype=bool)
    mask[1:3, 2] = True
    path = tmp_path / "mask.png"
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    maps = [np.arange(20.0).reshape(4, 5), np.zeros((2, 3))]

    assert pixel_auroc([path, None], maps) == pixel_auroc([mask, None], maps)
    assert aupro([str(path), None], maps) == aupro(
        [mask, np.zeros((2, 3), dtype=bool)], maps
    )


@pytest.mark.parametrize("metric", [pixel_auroc, pro_curve, aupro])
def test_pixel_metrics_errors(metric):
    mask = np.zeros((3, 3), dtype=bool)
    mask[0, 0] = True
    amap = np.zeros((3, 3))
    with pytest.raises(ValueError, match="2 masks but 1 anomaly maps"):
        metric([mask, None], [amap])
    with pytest.raises(ValueError, match="at least one image"):
        metric([], [])
    with pytest.raises(ValueError, match=r"anomaly_maps\[0\] must be 2-D"):
        metric([mask], [np.zeros((3, 3, 1))])
    with pytest.raises(ValueError, match="NaN"):
        metric([mask], [np.full((3, 3), np.nan)])
    with pytest.raises(TypeError, match="must hold numbers"):
        metric([mask], [np.full((3, 3), "a")])
    with pytest.raises(ValueError, match=r"masks\[1\]: .*expected \(2, 2\)"):
        metric([mask, mask], [amap, np.zeros((2, 2))])
    with pytest.raises(ValueError, match="both defective and good pixels"):
        metric([None], [amap])
    with pytest.raises(ValueError, match="both defective and good pixels"):
        metric([np.ones((3, 3), dtype=bool)], [amap])


def test_aupro_fpr_limit_validation():
    masks, maps = _two_region_example()
    for fpr_limit in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fpr_limit"):
            aupro(masks, maps, fpr_limit=fpr_limit)


def test_image_auroc():
    rng = np.random.RandomState(0)
    y_true = np.where(rng.rand(40) < 0.4, -1, 1)
    y_score = np.round(rng.randn(40) + 0.8 * y_true, 1)  # rounding makes ties

    result = image_auroc(y_true, y_score)
    assert result == pytest.approx(roc_auc_score(y_true, y_score))
    assert result == pytest.approx(
        _mann_whitney_auc(y_score[y_true == 1], y_score[y_true == -1])
    )
    assert image_auroc([1, 1, -1], [3.0, 2.0, 1.0]) == 1.0
    assert image_auroc([1, 1, -1], [1.0, 2.0, 3.0]) == 0.0


@pytest.mark.parametrize("metric", [image_auroc, f1_max])
def test_image_metrics_errors(metric):
    with pytest.raises(ValueError, match=r"both labels \+1 \(good\) and -1"):
        metric([0, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"both labels \+1 \(good\) and -1"):
        metric([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        metric([1, -1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN or infinity"):
        metric([1, -1], [0.1, np.nan])


def _brute_force_f1_max(y_true, y_score):
    """Best F1 over every way to split the sorted scores, with its rule."""
    candidates = np.append(np.unique(y_score), np.inf)
    return max(
        f1_score(y_true, np.where(y_score < t, -1, 1), pos_label=-1) for t in candidates
    )


@pytest.mark.parametrize("seed", range(5))
def test_f1_max_matches_brute_force(seed):
    rng = np.random.RandomState(seed)
    y_true = np.where(rng.rand(30) < 0.3, -1, 1)
    y_true[:2] = [-1, 1]
    y_score = np.round(rng.randn(30) + y_true, 1)

    f1, threshold = f1_max(y_true, y_score)
    assert f1 == pytest.approx(_brute_force_f1_max(y_true, y_score))
    reached = f1_score(y_true, np.where(y_score < threshold, -1, 1), pos_label=-1)
    assert reached == pytest.approx(f1)


def test_f1_max_threshold():
    # Scores sorted: -0.2 (defect), 0.4 (good), 0.5 (defect), 0.9 (good).
    # Predicting the three lowest defective: TP=2, FP=1, FN=0, F1=4/5; the
    # threshold lies midway between 0.5 and 0.9.
    assert f1_max([1, 1, -1, -1], [0.9, 0.4, 0.5, -0.2]) == pytest.approx((0.8, 0.7))
    # Predicting everything defective is best: F1 = 2*3 / (2*3 + 1) = 6/7.
    f1, threshold = f1_max([-1, -1, 1, -1], [0.1, 0.2, 0.3, 0.4])
    assert (f1, threshold) == (pytest.approx(6 / 7), np.inf)
    # Two adjacent floats: the threshold must still separate them.
    low = 1.0
    high = np.nextafter(low, 2.0)
    f1, threshold = f1_max([-1, 1], [low, high])
    assert f1 == 1.0
    assert low < threshold <= high


MASKS_BY_NAME = {
    "good_0.png": None,
    "good_1.png": None,
    "bad_0.png": np.eye(4, dtype=bool),
    "bad_1.png": np.pad(np.ones((2, 2), dtype=bool), ((0, 2), (2, 0))),
}


class _FakeDetector(OutlierMixin, BaseEstimator):
    """Maps are `quality` times the truth: 1 is perfect, 0 is constant."""

    def __init__(self, quality=1.0):
        self.quality = quality

    def fit(self, X, y=None):
        self.is_fitted_ = True
        return self

    def anomaly_maps(self, X):
        maps = []
        for path in X:
            mask = MASKS_BY_NAME[Path(path).name]
            maps.append(self.quality * (np.zeros((4, 4)) if mask is None else mask))
        return maps

    def decision_function(self, X):
        return np.array([-self.quality * m.any() for m in self.anomaly_maps(X)])

    def predict(self, X):
        return np.where(self.decision_function(X) < 0, -1, 1)


@pytest.fixture
def fake_dataset(tmp_path):
    images = [tmp_path / name for name in MASKS_BY_NAME]
    labels = np.array([1, 1, -1, -1])
    masks = dict(zip(images, MASKS_BY_NAME.values()))
    # One mask given as a PNG path, as lazy loaders return them.
    mask_path = tmp_path / "bad_1_mask.png"
    Image.fromarray(MASKS_BY_NAME["bad_1.png"].astype(np.uint8) * 255).save(mask_path)
    masks[images[3]] = mask_path
    return images, labels, masks


def test_aupro_scorer(fake_dataset):
    images, labels, masks = fake_dataset
    scorer = make_aupro_scorer(masks, fpr_limit=0.2)
    X = [str(image) for image in images]

    assert scorer(_FakeDetector(quality=1.0).fit(X), X) == pytest.approx(1.0)
    assert scorer(_FakeDetector(quality=0.0).fit(X), X, labels) == pytest.approx(0.1)
    restored = pickle.loads(pickle.dumps(scorer))
    assert restored(_FakeDetector(quality=0.0), X) == pytest.approx(0.1)
    assert "fpr_limit=0.2" in repr(scorer)


def test_scorers_in_grid_search(fake_dataset):
    images, labels, masks = fake_dataset
    X = [str(image) for image in images]
    search = GridSearchCV(
        _FakeDetector(),
        {"quality": [0.0, 1.0]},
        scoring={
            "aupro": make_aupro_scorer(masks),
            "image_auroc": image_auroc_scorer,
            "roc_auc": "roc_auc",
        },
        refit="aupro",
        cv=[([0], [0, 1, 2, 3]), ([1], [0, 1, 2, 3])],
    ).fit(X, labels)

    results = search.cv_results_
    np.testing.assert_allclose(results["mean_test_aupro"], [0.15, 1.0])
    np.testing.assert_allclose(results["mean_test_image_auroc"], [0.5, 1.0])
    np.testing.assert_allclose(results["mean_test_roc_auc"], [0.5, 1.0])
    assert search.best_params_ == {"quality": 1.0}


def test_aupro_scorer_errors(fake_dataset):
    images, labels, masks = fake_dataset
    scorer = make_aupro_scorer(masks)
    detector = _FakeDetector()
    with pytest.raises(TypeError, match="X must be a sequence of image paths"):
        scorer(detector, [np.zeros((4, 4))])
    with pytest.raises(ValueError, match="no mask for the image .*other.png"):
        scorer(detector, [images[0], images[0].parent / "other.png"])
    with pytest.raises(ValueError, match="both defective and good pixels"):
        scorer(detector, images[:2])
    with pytest.raises(TypeError, match="masks"):
        make_aupro_scorer(list(masks.values()))
    with pytest.raises(ValueError, match="fpr_limit"):
        make_aupro_scorer(masks, fpr_limit=0)


def test_image_auroc_scorer_rejects_01_labels(fake_dataset):
    images, _, _ = fake_dataset
    detector = _FakeDetector().fit(images)
    assert image_auroc_scorer(detector, images, [1, 1, -1, -1]) == 1.0
    with pytest.raises(ValueError, match="both labels"):
        image_auroc_scorer(detector, images, [0, 0, 1, 1])
