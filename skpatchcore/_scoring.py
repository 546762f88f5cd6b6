"""Image-level anomaly score from patch distances (paper eq. 6-7)."""

import numpy as np
from scipy.special import logsumexp


def reweighted_scores(support_distances):
    """The paper's re-weighted image anomaly score, eq. 7.

    For each image, ``m_test`` is its patch farthest from the memory bank and
    ``m*`` that patch's nearest bank feature, at distance ``s* = |m_test - m*|``.
    With ``N_b(m*)`` the ``b`` bank features nearest to ``m*`` (``m*`` itself
    first), the score is::

        s = (1 - exp(s*) / sum_{m in N_b(m*)} exp(|m_test - m|)) * s*

    The fraction is a softmax over the distances from ``m_test`` to
    ``N_b(m*)``; it is evaluated as ``exp(s* - logsumexp(distances))`` so that
    large distances never overflow, and ``1 - fraction`` as ``-expm1(...)``
    so that no precision is lost when the fraction is small. For ``b = 1`` the
    formula would give 0 for every image; re-weighting is then turned off and
    ``s = s*``.

    Parameters
    ----------
    support_distances : ndarray of shape (n_images, b)
        Column 0 holds ``s*``; columns 1 to b-1 hold the distances from
        ``m_test`` to the other members of ``N_b(m*)``.

    Returns
    -------
    scores : ndarray of shape (n_images,)
        Anomaly scores, higher is more anomalous.
    """
    support_distances = np.asarray(support_distances, dtype=np.float64)
    nearest = support_distances[:, 0]
    if support_distances.shape[1] == 1:
        return nearest
    log_fraction = nearest - logsumexp(support_distances, axis=1)
    return -np.expm1(log_fraction) * nearest
