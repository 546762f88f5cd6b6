"""Selection of the smallest ranking keys of each query, tile by tile."""

import torch

# Column spans compared position by position before the per-row selection
# of :func:`smallest_per_row`.
_SELECTION_GROUPS = 4


def smallest_per_row(keys, k):
    """The ``k`` smallest values of each row of ``keys`` and their columns.

    Parameters
    ----------
    keys : torch.Tensor of shape (n_rows, n_columns)
        Ranking keys, integer or float.

    k : int
        Values kept per row, at most ``n_columns``.

    Returns
    -------
    values : torch.Tensor of shape (n_rows, k)
        Ascending.

    columns : torch.Tensor of shape (n_rows, k)
        Column of each value; among equal values, any of them.

    Notes
    -----
    The columns are cut into ``_SELECTION_GROUPS`` equal spans and each row
    compared position by position across them first. A span position whose
    minimum is among the ``k`` smallest such minima holds every value below
    the row's k-th smallest (at most ``k`` positions can hold one), so
    selecting among those ``k * _SELECTION_GROUPS`` entries gives exactly
    the row's ``k`` smallest values. Faster than one ``torch.topk`` over
    every column on ranking tiles; docs/results.rst, "Prediction stages on
    the CPU" (the selection row and "Earlier measurements"), has the times.
    """
    n_rows, n_columns = keys.shape
    span = n_columns // _SELECTION_GROUPS
    if n_columns % _SELECTION_GROUPS or span < 4 * k:
        return torch.topk(keys, k, dim=1, largest=False)
    span_minima = keys.reshape(n_rows, _SELECTION_GROUPS, span).amin(dim=1)
    _, positions = torch.topk(span_minima, k, dim=1, largest=False, sorted=False)
    offsets = torch.arange(0, n_columns, span, device=keys.device)
    columns = (positions[:, None, :] + offsets[None, :, None]).reshape(n_rows, -1)
    values, picked = torch.topk(keys.gather(1, columns), k, dim=1, largest=False)
    return values, columns.gather(1, picked)
