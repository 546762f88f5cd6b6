"""The paper's image score (eq. 6-7), in torch for the detector and its export."""

import math

import torch


def reweighted_scores(support_distances, n_support):
    """The paper's re-weighted image anomaly score, eq. 7.

    For each image, ``m_test`` is its patch farthest from the memory bank and
    ``m*`` that patch's nearest bank feature, at distance ``s* = |m_test - m*|``.
    With ``N_b(m*)`` the ``b`` bank features nearest to ``m*`` (``m*`` itself
    first), the score is::

        s = (1 - exp(s*) / sum_{m in N_b(m*)} exp(|m_test - m|)) * s*

    The fraction is a softmax over the distances from ``m_test`` to
    ``N_b(m*)``, evaluated as ``exp(s* - logsumexp(distances))`` so that
    large distances never overflow. ``m*`` is the bank feature nearest to
    ``m_test``, so ``s*`` is the smallest of the ``b`` distances and the
    fraction at most ``1 / b <= 1/2``: ``1 - fraction`` then loses no
    precision, and the exported graph needs no ``expm1``, which ONNX lacks.
    For ``b = 1`` the formula would give 0 for every image; re-weighting is
    then turned off and ``s = s*``.

    Parameters
    ----------
    support_distances : torch.Tensor of shape (n_images, b)
        Column 0 holds ``s*``; columns 1 to b-1 hold the distances from
        ``m_test`` to the other members of ``N_b(m*)``. Computed in their
        dtype (float64 in the detector, float32 in an exported graph).

    n_support : int
        ``b``, the number of columns: given as a number, so that a traced
        graph records no branch on a tensor's shape.

    Returns
    -------
    scores : torch.Tensor of shape (n_images,)
        Anomaly scores, higher is more anomalous.
    """
    nearest = support_distances[:, 0]
    if n_support == 1:
        return nearest
    log_fraction = nearest - torch.logsumexp(support_distances, dim=1)
    return (1.0 - torch.exp(log_fraction)) * nearest


def support_rows(centers, candidates, distances, n_support):
    """``N_b(m*)`` of each ``m*`` in ``centers``: itself, then its nearest others.

    Parameters
    ----------
    centers : torch.Tensor of shape (n_images,)
        Bank row of each ``m*``.

    candidates : torch.Tensor of shape (n_images, n_candidates)
        Bank rows near each ``m*``, at least ``n_support`` of them.

    distances : torch.Tensor of shape (n_images, n_candidates)
        Their distances from ``m*``.

    n_support : int
        ``b``, at least 2.

    Returns
    -------
    support : torch.Tensor of shape (n_images, n_support)
        Bank rows, ``m*`` first. An exact duplicate of ``m*`` may rank
        before it among the candidates; it counts among the others, and
        ``m*`` stays first.
    """
    centers = centers.unsqueeze(1)
    distances = distances.masked_fill(candidates == centers, math.inf)
    _, others = torch.topk(distances, n_support - 1, dim=1, largest=False)
    return torch.cat([centers, torch.gather(candidates, 1, others)], dim=1)
