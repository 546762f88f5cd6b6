"""Reliability figure of p-values: realized against nominal false-alarm rate."""

from numbers import Integral

import numpy as np
from sklearn.utils._param_validation import Interval, validate_params


@validate_params(
    {
        "pvalues": ["array-like", list],
        "alphas": ["array-like", None],
        "n_calibration": [Interval(Integral, 1, None, closed="left"), None],
        "ax": "no_validation",
        "label": [str, None],
    },
    prefer_skip_nested_validation=True,
)
def plot_reliability(pvalues, *, alphas=None, n_calibration=None, ax=None, label=None):
    """Plot the share of good images flagged at each rate ``alpha``.

    An image is flagged at ``alpha`` when its p-value (from
    :meth:`~skpatchcore.PatchCoreDetector.pvalues`) is at most ``alpha``, as
    ``predict`` does with ``contamination=alpha``. For good images the
    realized share should follow the diagonal from below: above it, the
    detector raises more false alarms than asked; far below it, it is
    stricter than asked and lets defects through that the rate would allow
    it to catch.

    Parameters
    ----------
    pvalues : array-like of shape (n_images,) or list of array-like
        P-values of good images that the detector did not train on. A list
        of arrays (for instance one per random split of the good images)
        draws their mean and a band of one standard error of that mean.

    alphas : array-like of shape (n_alphas,), default=None
        Nominal rates at which to count; None takes 101 rates from 0 to
        0.5.

    n_calibration : int, default=None
        Number of calibration images (``n_calibration_images_``). When
        given, the rate that exchangeable good images reach exactly,
        ``floor(alpha (n + 1)) / (n + 1)``, is drawn as a dotted staircase.

    ax : matplotlib Axes, default=None
        Where to draw; None creates a new figure.

    label : str, default=None
        Legend label of the realized rate.

    Returns
    -------
    ax : matplotlib Axes
        The axes drawn on.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore.plotting import plot_reliability
    >>> p = (1 + np.arange(99)) / 100
    >>> ax = plot_reliability(p, n_calibration=99)
    >>> ax.get_xlabel()
    'nominal false-alarm rate (alpha)'
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(
            'Plotting needs matplotlib: pip install "skpatchcore[plot]"'
        ) from exc
    alphas = np.linspace(0, 0.5, 101) if alphas is None else np.asarray(alphas)
    nested = isinstance(pvalues, list) and all(np.ndim(p) == 1 for p in pvalues)
    groups = [np.asarray(p, dtype=float) for p in pvalues] if nested else None
    if not nested:
        groups = [np.asarray(pvalues, dtype=float)]
    if any(g.ndim != 1 or g.size == 0 for g in groups):
        raise ValueError(
            "pvalues must be a non-empty 1-D array, or a list of them; got "
            f"shapes {[g.shape for g in groups]}."
        )
    if any(np.any((g <= 0) | (g > 1) | ~np.isfinite(g)) for g in groups):
        raise ValueError("p-values must lie in (0, 1].")
    rates = np.array([[np.mean(g <= a) for a in alphas] for g in groups])
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 4.5))
    mean = rates.mean(axis=0)
    (line,) = ax.plot(alphas, mean, label=label or "realized")
    if len(groups) > 1:
        error = rates.std(axis=0, ddof=1) / np.sqrt(len(groups))
        ax.fill_between(
            alphas, mean - error, mean + error, color=line.get_color(), alpha=0.25
        )
    top = float(alphas.max()) if alphas.size else 1.0
    ax.plot([0, top], [0, top], color="grey", linestyle="--", label="nominal")
    if n_calibration is not None:
        exact = np.floor(alphas * (n_calibration + 1) + 1e-9) / (n_calibration + 1)
        ax.step(
            alphas,
            exact,
            where="post",
            color="black",
            linestyle=":",
            label=f"exchangeable, n = {n_calibration}",
        )
    ax.set_xlabel("nominal false-alarm rate (alpha)")
    ax.set_ylabel("good images flagged")
    ax.set_xlim(0, top)
    ax.set_ylim(0, None)
    ax.legend(loc="upper left")
    return ax
