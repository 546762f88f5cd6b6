import pickle
from pathlib import Path

import joblib
import numpy as np
import pytest
from conftest import FAST_PARAMS
from sklearn.exceptions import NotFittedError

from skpatchcore import PatchCoreDetector, _folder_scoring, score_folder


def test_scores_and_maps_as_in_this_process(fast_detector, elpv_small, tmp_path):
    X = elpv_small.test_images
    maps, expected = fast_detector.anomaly_maps(X, return_score_samples=True)
    scores = score_folder(fast_detector, X, chunk_size=3, maps_folder=tmp_path)
    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    for path, expected_map in zip(X, maps):
        saved = np.load(tmp_path / f"{Path(path).stem}.npy")
        assert saved.dtype == np.float32
        np.testing.assert_allclose(saved, expected_map, rtol=1e-5, atol=1e-6)
    assert len(list(tmp_path.iterdir())) == len(X)
    # Nothing of the call is left in this process.
    assert not _folder_scoring._DETECTORS


# Worker processes import torch and load the detector: tens of seconds.
@pytest.mark.slow
def test_processes_keep_the_input_order(fast_detector, elpv_small):
    # Reversed so that order is not that of the files' names.
    X = list(reversed(elpv_small.test_images))
    expected = fast_detector.score_samples(X)
    scores = score_folder(fast_detector, X, n_jobs=2, chunk_size=1)
    np.testing.assert_allclose(scores, expected, rtol=1e-5)


def test_a_worker_loads_the_detector_once(fast_detector, elpv_small, monkeypatch):
    payload = np.frombuffer(pickle.dumps(fast_detector), dtype=np.uint8)
    loads, real_loads = [], pickle.loads

    def counting_loads(data):
        loads.append(len(data))
        return real_loads(data)

    monkeypatch.setattr(_folder_scoring.pickle, "loads", counting_loads)
    monkeypatch.setattr(_folder_scoring, "_DETECTORS", {})
    X = elpv_small.test_images
    first = [
        _folder_scoring._score_chunk("a", payload, X[i : i + 2], None, None)
        for i in range(0, len(X), 2)
    ]
    assert len(loads) == 1
    # A new call's token replaces the earlier detector.
    _folder_scoring._score_chunk("b", payload, X[:2], None, None)
    assert len(loads) == 2 and list(_folder_scoring._DETECTORS) == ["b"]
    np.testing.assert_allclose(
        np.concatenate(first), fast_detector.score_samples(X), rtol=1e-5
    )


@pytest.mark.slow
def test_dask_cluster_scores_as_this_process(fast_detector, elpv_small, tmp_path):
    distributed = pytest.importorskip("distributed")
    X = elpv_small.test_images
    maps, expected = fast_detector.anomaly_maps(X, return_score_samples=True)
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            worker_dashboard_address=None,
        ) as cluster,
        distributed.Client(cluster) as client,
        joblib.parallel_backend("dask"),
    ):
        scores = score_folder(fast_detector, X, chunk_size=2, maps_folder=tmp_path)
        # Each worker that scored holds the one detector of the call.
        held = client.run(lambda: len(_folder_scoring._DETECTORS))
    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    assert set(held.values()) <= {0, 1} and sum(held.values()) >= 1
    for path, expected_map in zip(X, maps):
        np.testing.assert_allclose(
            np.load(tmp_path / f"{Path(path).stem}.npy"),
            expected_map,
            rtol=1e-5,
            atol=1e-6,
        )


def test_images_in_memory_and_an_ensemble(elpv_small, cell_arrays, tmp_path):
    from skpatchcore import PatchCoreEnsemble

    ensemble = PatchCoreEnsemble(
        [
            ("a", PatchCoreDetector(**FAST_PARAMS)),
            ("b", PatchCoreDetector(**FAST_PARAMS)),
        ]
    ).fit(cell_arrays[:4])
    X = cell_arrays[4:]
    scores = score_folder(ensemble, X, chunk_size=3, maps_folder=tmp_path)
    np.testing.assert_allclose(scores, ensemble.score_samples(X), rtol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "0.npy",
        "1.npy",
        "2.npy",
        "3.npy",
    ]


def test_bad_input_is_refused(fast_detector, elpv_small, tmp_path):
    with pytest.raises(NotFittedError):
        score_folder(PatchCoreDetector(), elpv_small.test_images)
    for chunk_size in (0, 2.0, True):
        with pytest.raises(ValueError, match="chunk_size"):
            score_folder(fast_detector, elpv_small.test_images, chunk_size=chunk_size)
    twice = [elpv_small.test_images[0]] * 2
    with pytest.raises(ValueError, match="same|both write"):
        score_folder(fast_detector, twice, maps_folder=tmp_path)
