"""Input normalisation: the backbones' own, and the check of a user's."""

import numbers
from collections.abc import Sequence

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The EfficientNet-Lite weights were trained on inputs scaled to [-1, 1].
_LITE_MEAN = (0.5, 0.5, 0.5)
_LITE_STD = (0.5, 0.5, 0.5)


def check_normalization(normalization):
    """Validate a user's input normalisation.

    Parameters
    ----------
    normalization : tuple or list
        A pair ``(mean, std)`` of sequences of three numbers: the per-channel
        mean to subtract from [0, 1] RGB images and the standard deviation
        to divide by.

    Returns
    -------
    mean : tuple of float
        The three means.
    std : tuple of float
        The three standard deviations.

    Raises
    ------
    TypeError
        If ``normalization`` is not a pair, or a member is not a sequence of
        numbers.
    ValueError
        If ``mean`` or ``std`` does not have three finite values, or a
        standard deviation is not positive.

    Examples
    --------
    >>> from skpatchcore._features.normalization import check_normalization
    >>> check_normalization(([0.5, 0.5, 0.5], (0.25, 0.25, 0.25)))
    ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    """
    if not isinstance(normalization, (tuple, list)) or len(normalization) != 2:
        raise TypeError(
            "normalization must be None or a pair (mean, std) of per-channel "
            f"sequences such as ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), got "
            f"{normalization!r}."
        )
    checked = []
    for name, values in zip(("mean", "std"), normalization):
        if isinstance(values, (str, bytes)) or not (
            isinstance(values, (Sequence, np.ndarray))
            and all(
                isinstance(value, numbers.Real) and not isinstance(value, bool)
                for value in np.ravel(np.asarray(values, dtype=object))
            )
        ):
            raise TypeError(
                f"normalization {name} must be a sequence of 3 numbers, one per "
                f"RGB channel, got {values!r}."
            )
        array = np.asarray(values, dtype=np.float64)
        if array.shape != (3,):
            raise ValueError(
                f"normalization {name} must have 3 values, one per RGB "
                f"channel, got {values!r}."
            )
        if not np.isfinite(array).all():
            raise ValueError(
                f"normalization {name} must be finite, got {values!r}."
            )
        checked.append(tuple(float(value) for value in array))
    mean, std = checked
    if min(std) <= 0:
        raise ValueError(
            f"normalization std must be positive in every channel, got {std}."
        )
    return mean, std
