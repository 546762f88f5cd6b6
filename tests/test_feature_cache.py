"""The ``memory`` parameter: backbone outputs cached per image on disk."""

import joblib
import numpy as np
import pytest
import torch
from conftest import FAST_PARAMS
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.utils._param_validation import InvalidParameterError

from skpatchcore import PatchCoreDetector, PatchCoreEnsemble, PatchFeatureExtractor
from skpatchcore._features.feature_cache import (
    _to_arrays,
    _to_maps,
    image_keys,
    network_digest,
)

# Backbone passes of every CountingNet, by the number of images in each.
PASSES = []


class CountingNet(torch.nn.Module):
    """Two convolutions that record the batch size of every forward call."""

    def __init__(self, seed=0):
        super().__init__()
        # Seeded weights, leaving the global generator as it was.
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.a = torch.nn.Conv2d(3, 6, 3, padding=1)
            self.b = torch.nn.Conv2d(6, 8, 3, stride=2, padding=1)

    def forward(self, x):
        PASSES.append(len(x))
        return self.b(self.a(x))


COUNTING_PARAMS = dict(
    backbone=CountingNet(),
    layers=("a", "b"),
    image_size=16,
    resize=None,
    feature_dim=8,
    coreset_ratio=0.5,
    batch_size=3,
    random_state=0,
)


def images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 3), np.uint8)


def image_passes(make, call):
    """Images the backbone saw in ``call`` beyond the blank ones of set-up.

    ``make()`` builds the estimator; fitting a fresh one alone gives the
    passes of set-up (pruning, batch-norm folding, probing), which every
    fit runs whatever the cache holds.
    """
    PASSES.clear()
    PatchFeatureExtractor(
        **{
            k: v
            for k, v in make().get_params().items()
            if k in PatchFeatureExtractor().get_params()
        }
    ).fit()
    setup = sum(PASSES)
    PASSES.clear()
    call()
    return sum(PASSES) - setup


def fit_passes(params, X, **changes):
    return image_passes(
        lambda: PatchCoreDetector(**dict(params, **changes)),
        lambda: PatchCoreDetector(**dict(params, **changes)).fit(X),
    )


def test_same_results_with_and_without_memory(elpv_small, tmp_path):
    params = dict(FAST_PARAMS, batch_size=3)
    X, test = elpv_small.train_images, elpv_small.test_images
    plain = PatchCoreDetector(**params).fit(X)
    maps, scores = plain.anomaly_maps(test, return_score_samples=True)
    # The first fit with memory fills the cache, the second reads it back.
    for _ in range(2):
        cached = PatchCoreDetector(memory=tmp_path, **params).fit(X)
        assert np.array_equal(cached.memory_bank_, plain.memory_bank_)
        assert np.array_equal(cached.calibration_scores_, plain.calibration_scores_)
        assert cached.offset_ == plain.offset_
        assert cached.pixel_threshold_ == plain.pixel_threshold_
        cached_maps, cached_scores = cached.anomaly_maps(
            test, return_score_samples=True
        )
        assert np.array_equal(cached_scores, scores)
        for a, b in zip(cached_maps, maps):
            assert np.array_equal(a, b)
    assert any(tmp_path.rglob("output.pkl"))


def test_extractor_features_identical_and_cached(elpv_small, tmp_path):
    params = dict(
        backbone="efficientnet_lite0", image_size=64, resize=None, feature_dim=32
    )
    X = elpv_small.train_images
    plain = PatchFeatureExtractor(**params).fit().transform(X)
    cached = PatchFeatureExtractor(memory=str(tmp_path), **params).fit()
    assert np.array_equal(cached.transform(X), plain)
    # Other aggregation settings read the same layer maps back.
    wider = PatchFeatureExtractor(patch_size=5, memory=tmp_path, **params).fit()
    expected = PatchFeatureExtractor(patch_size=5, **params).fit().transform(X)
    n_entries = len(list(tmp_path.rglob("output.pkl")))
    assert np.array_equal(wider.transform(X), expected)
    assert len(list(tmp_path.rglob("output.pkl"))) == n_entries == len(X)


def test_second_fit_runs_no_backbone_pass(tmp_path):
    X = images(7)
    params = dict(COUNTING_PARAMS, memory=tmp_path)
    assert fit_passes(COUNTING_PARAMS, X) == 7
    assert fit_passes(params, X) == 7
    # Other candidates of a grid search over the later stages run none.
    assert fit_passes(params, X) == 0
    assert fit_passes(params, X, patch_size=5, coreset_ratio=0.2) == 0
    assert fit_passes(params, X, n_reweight_neighbors=2, sigma=1.0) == 0
    assert fit_passes(params, X, contamination=0.1, distance="cosine") == 0
    # Without memory, the backbone runs on every image again.
    assert fit_passes(COUNTING_PARAMS, X) == 7


def test_prediction_reads_the_cache(tmp_path):
    X, test = images(6), images(3, seed=1)
    detector = PatchCoreDetector(memory=tmp_path, **COUNTING_PARAMS).fit(X)
    PASSES.clear()
    scores = detector.score_samples(test)
    assert sum(PASSES) == 3
    PASSES.clear()
    assert np.array_equal(detector.score_samples(test), scores)
    assert PASSES == []
    # memory is a runtime parameter: dropping it keeps the fit usable.
    detector.set_params(memory=None)
    assert np.array_equal(detector.score_samples(test), scores)
    assert sum(PASSES) == 3


@pytest.mark.parametrize(
    "changes",
    [
        dict(backbone=CountingNet(seed=1)),  # other weights
        dict(layers=("b",)),
        dict(normalization=((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))),
        dict(image_size=24),
        dict(batch_size=2),  # other pass sizes: see test_pass_size_is_in_the_key
    ],
    ids=["weights", "layers", "normalization", "image_size", "pass size"],
)
def test_what_the_maps_depend_on_misses_the_cache(changes, tmp_path):
    X = images(6)
    params = dict(COUNTING_PARAMS, memory=tmp_path)
    fit_passes(params, X)
    assert fit_passes(params, X) == 0
    assert fit_passes(params, X, **changes) == 6


def test_image_content_misses_the_cache(tmp_path):
    X = images(6)
    params = dict(COUNTING_PARAMS, memory=tmp_path)
    fit_passes(params, X)
    changed = X.copy()
    changed[4, 0, 0, 0] ^= 1  # one bit of one pixel
    # The pass that holds the changed image runs again, whole.
    assert fit_passes(params, changed) == 3


@pytest.mark.slow
def test_pass_size_is_in_the_key(tmp_path):
    """A map computed in a pass of n images is reused in passes of n only.

    Convolution libraries choose their algorithm by batch size, so that a
    pass of one image can differ in the last bits from a pass of several.
    """
    params = dict(
        backbone="efficientnet_lite0", image_size=64, resize=None, feature_dim=32
    )
    X = images(4)
    pairs = PatchFeatureExtractor(batch_size=2, memory=tmp_path, **params).fit()
    singles = PatchFeatureExtractor(batch_size=1, memory=tmp_path, **params).fit()
    assert np.array_equal(
        pairs.transform(X),
        PatchFeatureExtractor(batch_size=2, **params).fit().transform(X),
    )
    assert np.array_equal(
        singles.transform(X),
        PatchFeatureExtractor(batch_size=1, **params).fit().transform(X),
    )
    assert len(list(tmp_path.rglob("output.pkl"))) == 8


def test_network_digest_follows_weights_and_structure():
    net = CountingNet()
    digest = network_digest(net)
    assert network_digest(CountingNet()) == digest
    assert network_digest(CountingNet(seed=1)) != digest
    changed = CountingNet()
    with torch.no_grad():
        changed.b.bias[0] = torch.nextafter(changed.b.bias[0], torch.tensor(1.0))
    assert network_digest(changed) != digest
    # Same weights, another layer after them.
    other = CountingNet()
    other.a = torch.nn.Sequential(other.a)
    assert network_digest(other) != digest


def test_image_keys_follow_pixels_setting_and_shape():
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    keys = image_keys("s", x)
    assert len(set(keys)) == 2
    assert image_keys("s", x) == keys
    assert image_keys("t", x)[0] != keys[0]
    assert image_keys("s", x[:1])[0] != keys[0]  # another pass size
    assert image_keys("s", x.reshape(2, 3, 4, 16))[0] != keys[0]


@pytest.mark.parametrize("channels_last", [True, False])
def test_stored_maps_keep_their_values_and_layout(channels_last):
    maps = [torch.randn(2, 5, 4, 3), torch.randn(2, 7, 2, 2)]
    if channels_last:
        maps = [m.contiguous(memory_format=torch.channels_last) for m in maps]
    stored = [_to_arrays([m[i : i + 1] for m in maps]) for i in range(2)]
    restored = _to_maps(stored, torch.device("cpu"))
    for original, back in zip(maps, restored):
        assert torch.equal(original, back)
        assert back.stride() == original.stride()


def test_memory_forms_and_clone(tmp_path):
    X = images(4)
    for memory in (str(tmp_path / "a"), tmp_path / "b", joblib.Memory(tmp_path / "c")):
        detector = PatchCoreDetector(memory=memory, **COUNTING_PARAMS)
        assert clone(detector).get_params()["memory"] is not None
        detector.fit(X)
    assert len(list(tmp_path.rglob("output.pkl"))) == 3 * 4
    # A joblib.Memory without a location caches nothing, as in scikit-learn.
    assert fit_passes(dict(COUNTING_PARAMS, memory=joblib.Memory(None)), X) == 4
    params = PatchCoreDetector(memory=str(tmp_path)).get_params()
    assert params["memory"] == str(tmp_path)
    assert clone(PatchCoreDetector(memory=tmp_path)).memory == tmp_path


def test_invalid_memory_is_refused():
    with pytest.raises(InvalidParameterError, match="memory"):
        PatchCoreDetector(memory=3, **COUNTING_PARAMS).fit(images(4))
    with pytest.raises(InvalidParameterError, match="memory"):
        PatchFeatureExtractor(memory=object()).fit()


@pytest.mark.slow
def test_grid_search_with_memory_equals_without(elpv_small, tmp_path):
    X = [*elpv_small.train_images, *elpv_small.test_images]
    y = np.r_[np.ones(len(elpv_small.train_images)), elpv_small.test_labels]
    results = []
    for memory in (None, tmp_path):
        search = GridSearchCV(
            PatchCoreDetector(memory=memory, **FAST_PARAMS),
            {"patch_size": [1, 3], "coreset_ratio": [0.1, 0.25]},
            scoring="roc_auc",
            cv=StratifiedKFold(2, shuffle=True, random_state=0),
        ).fit(X, y)
        results.append(search)
    plain, cached = results
    assert cached.best_params_ == plain.best_params_
    for key in plain.cv_results_:
        if "test_score" in key:
            assert np.array_equal(cached.cv_results_[key], plain.cv_results_[key])
    assert np.array_equal(
        cached.best_estimator_.memory_bank_, plain.best_estimator_.memory_bank_
    )


def test_ensemble_members_share_the_cache(tmp_path):
    X, test = images(6), images(2, seed=1)

    def ensemble(memory):
        fine = PatchCoreDetector(**dict(COUNTING_PARAMS, patch_size=1))
        coarse = PatchCoreDetector(**dict(COUNTING_PARAMS, patch_size=3))
        return PatchCoreEnsemble(
            [("fine", fine), ("coarse", coarse)], random_state=0, memory=memory
        )

    plain = ensemble(None).fit(X)
    PASSES.clear()
    cached = ensemble(tmp_path).fit(X)
    assert [d.memory for d in cached.detectors_] == [tmp_path, tmp_path]
    # Set-up passes are of one blank image; the members' image passes are
    # of batch_size=3 images, run by the first member only.
    assert [n for n in PASSES if n > 1] == [3, 3]
    assert np.array_equal(cached.score_samples(test), plain.score_samples(test))
    # The ensemble's memory, changed after fit, reaches its members.
    cached.set_params(memory=None)
    cached.score_samples(test)
    assert [d.memory for d in cached.detectors_] == [None, None]


def test_partial_fit_and_pickle_with_memory(tmp_path):
    X, more, test = images(6), images(3, seed=2), images(2, seed=1)
    plain = PatchCoreDetector(**COUNTING_PARAMS).fit(X).partial_fit(more)
    # memory set after fit is a runtime change: partial_fit takes it.
    cached = PatchCoreDetector(**COUNTING_PARAMS).fit(X)
    cached.set_params(memory=tmp_path).partial_fit(more)
    assert np.array_equal(cached.memory_bank_, plain.memory_bank_)
    scores = plain.score_samples(test)
    assert np.array_equal(cached.score_samples(test), scores)
    # A saved detector keeps its memory and reads the cache after loading.
    path = tmp_path / "detector.joblib"
    joblib.dump(cached, path)
    loaded = joblib.load(path)
    assert loaded.memory == tmp_path
    PASSES.clear()
    assert np.array_equal(loaded.score_samples(test), scores)
    assert [n for n in PASSES if n > 1] == []
