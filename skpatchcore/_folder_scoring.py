"""Scoring many images with parallel processes or a dask cluster."""

import copy
import pickle
import threading
import uuid
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed
from sklearn.utils import gen_batches
from sklearn.utils.validation import check_is_fitted

from ._images import check_images, reusable_sources
from ._progress import progress_bar

# Fitted detectors by token, in each process that scores: a worker loads the
# detector of a call once, at its first chunk, and keeps the latest only.
_DETECTORS = {}
_LOCK = threading.Lock()


def score_folder(
    detector, X, *, n_jobs=None, chunk_size=64, maps_folder=None, verbose=0
):
    """``score_samples`` of many images, in parallel, in the order given.

    The images are split into chunks of ``chunk_size``, scored by
    ``n_jobs`` joblib workers, or by the workers of a dask cluster inside
    ``joblib.parallel_backend("dask")``. The fitted detector travels to each
    worker once per call, not with every chunk: it is pickled once into a
    NumPy array, which joblib memory-maps for its local processes and the
    dask backend scatters to the cluster, and each worker unpickles it at
    its first chunk and keeps it for the others.

    Parameters
    ----------
    detector : PatchCoreDetector or PatchCoreEnsemble
        A fitted detector. It is not modified.

    X : array-like, list of images or folder
        Images in any form accepted by ``fit``: typically the path of a
        folder, which stands for its image files sorted by name, or a list
        of image files. The workers read the files themselves, so with a
        cluster the paths must be readable from its machines.

    n_jobs : int, default=None
        Workers scoring chunks at once, through :class:`joblib.Parallel`:
        ``None`` means 1 unless in a :func:`joblib.parallel_backend` context
        (e.g. ``"dask"``, where it takes the cluster's workers), -1 all
        processors. With local processes, each gets an equal share of the
        cores for its torch threads (joblib's default).

    chunk_size : int, default=64
        Images per task. Each worker scores its chunk in batches of the
        detector's ``batch_size``; larger chunks cost fewer task round
        trips, smaller ones spread the work more evenly.

    maps_folder : str, path-like or None, default=None
        If given, each image's anomaly map, as ``anomaly_maps`` returns it
        (float32, at the image's own resolution), is saved by the worker
        that scores it as ``<name>.npy`` in this folder (created if needed):
        ``<name>`` is the image file's stem, or the image's position in
        ``X``, zero-padded, for an image given in memory. Two files with the
        same stem are refused. None computes no maps, which is faster.

    verbose : int, default=0
        Show a progress bar over the images when positive, advanced as the
        chunks come back.

    Returns
    -------
    scores : ndarray of shape (n_images,)
        ``detector.score_samples(X)``: higher is more normal.

    Raises
    ------
    ValueError
        If ``chunk_size`` is not a positive integer, or two images would
        write their maps to the same file.
    sklearn.exceptions.NotFittedError
        If ``detector`` is not fitted.

    See Also
    --------
    PatchCoreDetector.score_samples : Scoring in this process.

    Notes
    -----
    Scores are those of ``detector.score_samples(X)`` up to float32
    rounding: the backbone of each worker sees the images in its own
    batches (see ``batch_size`` of :class:`PatchCoreDetector`).

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore import PatchCoreDetector, score_folder
    >>> rng = np.random.default_rng(0)
    >>> good = rng.integers(100, 140, size=(4, 64, 64), dtype=np.uint8)
    >>> detector = PatchCoreDetector(
    ...     backbone="efficientnet_lite0", image_size=64, resize=None,
    ...     feature_dim=64, random_state=0).fit(good)
    >>> scores = score_folder(detector, good, chunk_size=2)
    >>> bool(np.allclose(scores, detector.score_samples(good), rtol=1e-5))
    True
    """
    if isinstance(chunk_size, bool) or not (
        isinstance(chunk_size, (int, np.integer)) and chunk_size > 0
    ):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
    check_is_fitted(detector)
    sources = reusable_sources(check_images(X))
    names = None
    if maps_folder is not None:
        names = _map_names(sources)
        maps_folder = Path(maps_folder)
        maps_folder.mkdir(parents=True, exist_ok=True)
    quiet = copy.copy(detector)
    if "verbose" in quiet.get_params(deep=False):
        # The workers show no bars of their own.
        quiet.set_params(verbose=0)
    token = uuid.uuid4().hex
    payload = np.frombuffer(pickle.dumps(quiet, protocol=5), dtype=np.uint8)
    chunks = list(gen_batches(len(sources), chunk_size))
    scores = []
    # Tasks that run in this process find the detector itself.
    with _LOCK:
        _DETECTORS[token] = quiet
    try:
        found = Parallel(n_jobs=n_jobs, return_as="generator")(
            delayed(_score_chunk)(
                token,
                payload,
                sources[chunk],
                None if names is None else names[chunk],
                maps_folder,
            )
            for chunk in chunks
        )
        with progress_bar(len(sources), "scoring", "images", verbose) as bar:
            for chunk_scores in found:
                scores.append(chunk_scores)
                bar.update(len(chunk_scores))
    finally:
        with _LOCK:
            _DETECTORS.pop(token, None)
    return np.concatenate(scores or [np.empty(0)])


def _map_names(sources):
    """File name (no suffix) of each image's map; duplicates are refused."""
    width = len(str(max(len(sources) - 1, 0)))
    names = [
        source.stem if isinstance(source, Path) else f"{position:0{width}d}"
        for position, source in enumerate(sources)
    ]
    seen = {}
    for position, name in enumerate(names):
        if name in seen:
            raise ValueError(
                f"Images {seen[name]} and {position} of X would both write their "
                f"map to {name}.npy: give image files with distinct names."
            )
        seen[name] = position
    return names


def _detector(token, payload):
    """The detector of ``token``, unpickled from ``payload`` at its first use."""
    with _LOCK:
        detector = _DETECTORS.get(token)
        if detector is None:
            detector = pickle.loads(payload.tobytes())
            # One call's detector at a time: an earlier call's is done.
            _DETECTORS.clear()
            _DETECTORS[token] = detector
    return detector


def _score_chunk(token, payload, sources, names, maps_folder):
    """Scores of one chunk of images, its maps saved if ``names`` are given."""
    detector = _detector(token, payload)
    if names is None:
        return detector.score_samples(sources)
    maps, scores = detector.anomaly_maps(sources, return_score_samples=True)
    for name, image_map in zip(names, maps):
        np.save(maps_folder / f"{name}.npy", image_map)
    return scores
