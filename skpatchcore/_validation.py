"""Checks the estimators share: labels, parameters, and what changed since fit."""

import numbers

import numpy as np
from sklearn.utils._param_validation import Interval, InvalidParameterError
from sklearn.utils.validation import column_or_1d

# Parameters that only say how to run: changing them after fit takes effect at
# the next call. Every other parameter defines the fitted model.
RUNTIME_PARAMS = ("device", "batch_size", "n_jobs", "memory", "verbose")


def same_value(a, b):
    """Whether two parameter values are equal, whatever their types."""
    try:
        return bool(a == b)
    except (TypeError, ValueError):
        return False


def check_no_bools(estimator):
    """Refuse True/False for a numeric parameter.

    ``bool`` is an ``int`` to Python, so scikit-learn's numeric intervals let
    ``patch_size=True`` through, to fail deep inside torch.
    """
    for name, constraints in estimator._parameter_constraints.items():
        value = getattr(estimator, name)
        numeric = [c for c in constraints if isinstance(c, Interval)]
        if isinstance(value, (bool, np.bool_)) and numeric:
            kind = "an int" if numeric[0].type is numbers.Integral else "a number"
            raise InvalidParameterError(
                f"The {name!r} parameter of {type(estimator).__name__} must be "
                f"{kind}, not a bool; got {value!r}."
            )


def good_images(sources, y):
    """The images of ``sources`` labelled +1 in ``y``; all of them if y is None."""
    if y is None:
        return sources
    y = column_or_1d(y, warn=True)
    if len(y) != len(sources):
        raise ValueError(
            f"y has {len(y)} labels for the {len(sources)} images of X; one "
            "label per image is needed."
        )
    if y.dtype.kind not in "iuf" or not np.isin(y, (-1, 1)).all():
        try:
            found = np.unique(y).tolist()
        except TypeError:
            found = sorted({repr(label) for label in y.tolist()})
        shown = ", ".join(map(str, found[:10])) + (", ..." if len(found) > 10 else "")
        hint = ""
        if set(found) <= {0, 1}:
            hint = (
                " Labels coded 0/1 are refused, as 1 means good in some "
                "conventions and anomalous in others."
            )
        raise ValueError(
            "y must label each image of X +1 (good) or -1 (anomalous), as "
            f"predict does; got the values {shown}.{hint}"
        )
    good = np.flatnonzero(y == 1)
    if len(good) == 0:
        raise ValueError(
            "y labels every image of X -1 (anomalous): the detector is fitted "
            "on the +1 (good) images only, and there are none."
        )
    return [sources[i] for i in good]


def changed_params(fitted, current):
    """Descriptions of the model-defining parameters that differ from ``fitted``."""
    return [
        f"{key}={fitted.get(key, '<absent>')!r} at fit, now "
        f"{current.get(key, '<absent>')!r}"
        for key in sorted(fitted.keys() | current.keys())
        if key.rpartition("__")[2] not in RUNTIME_PARAMS
        and (
            key not in fitted
            or key not in current
            or not (
                current[key] is fitted[key] or same_value(current[key], fitted[key])
            )
        )
    ]


def check_unchanged_since_fit(fitted, current, action="predict"):
    """Refuse to go on with parameters that no longer describe the model."""
    changed = changed_params(fitted, current)
    if changed:
        raise ValueError(
            f"Cannot {action}: parameters changed since fit ({', '.join(changed)}). "
            "They define the fitted model: call fit again, or set them back."
        )
