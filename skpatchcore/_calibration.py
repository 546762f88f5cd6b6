"""Thresholds from held-out scores of training images, for every estimator.

A calibration image is scored against the memory bank without the entries
taken from it (leave one image out), which is close to how an unseen good
image is scored, or, with ``calibration_holdout``, against the whole bank,
which it was kept out of. Its held-out ``score_samples`` and the largest
value of its held-out anomaly map, at the image's own resolution where
``predict_masks`` compares maps with the pixel threshold, set ``offset_`` and
``pixel_threshold_``.
"""

import math
import warnings

import numpy as np

from ._conformal import map_threshold, n_rejectable, score_threshold
from ._progress import progress_bar


def upper_whisker(values):
    """Largest of ``values`` not above Tukey's fence ``Q3 + 1.5 IQR``.

    It ends the upper whisker of a box plot: the largest value once those a
    box plot draws as outliers are set aside. Being one of ``values``, it is
    finite when they are.
    """
    q1, q3 = np.quantile(values, [0.25, 0.75])
    return values[values <= q3 + 1.5 * (q3 - q1)].max()


def thresholds(scores, maxima, contamination):
    """``offset_`` and ``pixel_threshold_`` from held-out calibration values.

    Parameters
    ----------
    scores : ndarray of shape (n_calibration,)
        Held-out ``score_samples`` (higher is more normal).

    maxima : ndarray of shape (n_calibration,)
        Largest held-out anomaly-map value of each image.

    contamination : "auto" or float
        "auto": the most anomalous values that are not outliers by Tukey's
        rule; a float ``alpha``: the conformal thresholds at which a good
        image exchangeable with the calibration images is flagged with
        probability at most ``alpha`` (see :mod:`._conformal`).

    Returns
    -------
    offset, pixel_threshold : float
    """
    if contamination == "auto":
        return float(-upper_whisker(-scores)), float(upper_whisker(maxima))
    n = len(scores)
    if n_rejectable(n, contamination) == 0:
        warnings.warn(
            f"contamination={contamination} is below 1 / (n_calibration_images "
            f"+ 1) = {1.0 / (n + 1):.3g}: with {n} calibration images no "
            "p-value can be that small, so predict and predict_masks flag "
            "nothing. Calibrate on at least "
            f"{math.ceil(1.0 / contamination) - 1} images (max_calibration_images, "
            "or calibration_holdout) or raise contamination.",
            UserWarning,
            stacklevel=2,
        )
    return (
        score_threshold(scores, contamination),
        map_threshold(maxima, contamination),
    )


def draw_sample(n_seen, n_new, n_earlier, max_images, random_state):
    """A uniform sample of calibration images among all images seen.

    Of ``n_seen`` images of earlier calls (``n_earlier`` of which hold
    held-out values) and ``n_new`` new ones, at most ``max_images`` are
    drawn: how many of the earlier ones stay, then which new images join.

    Returns
    -------
    new_images : ndarray of int
        Positions of the new calibration images among the new images.

    n_kept : int
        Earlier calibration images kept.
    """
    n_sample = min(max_images, n_seen + n_new)
    n_kept = 0
    if n_seen:
        n_drawn = random_state.hypergeometric(n_seen, n_new, n_sample)
        n_kept = min(n_earlier, int(n_drawn))
    new_images = np.arange(n_new)
    if n_new > n_sample - n_kept:
        new_images = np.sort(random_state.choice(n_new, n_sample - n_kept, False))
    return new_images, n_kept


def held_out_values(
    model, batch, images, bank_images, batch_size, verbose, keep_maps=False
):
    """Held-out ``score_samples`` and map maxima of training images.

    Parameters
    ----------
    model : PatchCoreModel
        The engine with its new bank.

    batch : FeatureBatch
        Patch features of the calibration images.

    images : ndarray of int
        Training image of each of the batch's images.

    bank_images : ndarray of int or None
        Training image of each bank entry (-1: of an earlier call). None
        when the calibration images were held out of the bank: they are
        then scored against the whole bank, as new images are.

    batch_size : int
        Images scored together.

    verbose : int
        Show a progress bar when positive.

    keep_maps : bool, default=False
        Also return the held-out maps, at each image's own resolution.

    Returns
    -------
    scores, maxima : ndarray of shape (n_held_out,)
        Of the images that could be scored: an image whose patches only meet
        bank entries of its own (the whole bank came from it) is left out.

    held_out : ndarray of bool of shape (len(images),)
        The images kept.

    maps : list of ndarray
        Only if ``keep_maps``: the held-out maps of the images kept.
    """
    scores, maxima, kept_maps = [np.empty(0)], [np.empty(0)], []
    with progress_bar(len(images), "calibration", "images", verbose) as bar:
        for start in range(0, len(images), batch_size):
            part = np.arange(start, min(start + batch_size, len(images)))
            features = batch.select(part)
            exclude = None if bank_images is None else (images[part], bank_images)
            anomaly, distances = model.score(features, exclude=exclude)
            maps = model.image_maps(features, distances)
            scores.append(-anomaly)
            maxima.append(np.array([m.max() for m in maps]))
            if keep_maps:
                kept_maps.extend(maps)
            bar.update(len(part))
    scores, maxima = np.concatenate(scores), np.concatenate(maxima)
    held_out = np.isfinite(scores) & np.isfinite(maxima)
    if keep_maps:
        maps = [m for m, kept in zip(kept_maps, held_out) if kept]
        return scores[held_out], maxima[held_out], held_out, maps
    return scores[held_out], maxima[held_out], held_out
