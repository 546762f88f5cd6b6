"""Greedy k-center coreset selection (paper §3.2, Algorithm 1)."""

import numpy as np
import torch


def random_projection(n_features, projection_dim, random_state):
    """A Gaussian Johnson-Lindenstrauss matrix of shape (n_features, projection_dim).

    Entries are N(0, 1 / projection_dim), so squared distances are preserved
    in expectation.
    """
    return random_state.normal(
        scale=1.0 / np.sqrt(projection_dim), size=(n_features, projection_dim)
    ).astype(np.float32)


def greedy_coreset(features, n_samples, *, projection_dim, random_state, device="cpu"):
    """Indices of a greedy k-center coreset of ``features``.

    Starting from one randomly drawn point, the point farthest from all points
    chosen so far is added until ``n_samples`` are chosen (minimax facility
    location, eq. 5). Distances are measured after a random linear projection
    to ``projection_dim`` dimensions (skipped when ``projection_dim`` is None
    or not smaller than the feature length). Memory stays linear in the
    number of points: only each point's distance to its nearest chosen point
    is kept.

    Parameters
    ----------
    features : ndarray of shape (n_points, n_features)
        The memory bank to subsample.

    n_samples : int
        Coreset size, at most ``n_points``.

    projection_dim : int or None
        Dimension of the random projection.

    random_state : numpy.random.RandomState
        Draws the projection and then the starting point.

    device : str or torch.device, default="cpu"
        Where the distance updates run.

    Returns
    -------
    indices : ndarray of shape (n_samples,)
        Row indices into ``features``, in the order they were chosen; the
        first is the random starting point.
    """
    n_points, n_features = features.shape
    if not 1 <= n_samples <= n_points:
        raise ValueError(f"n_samples must be in [1, {n_points}]; got {n_samples}.")
    points = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    if projection_dim is not None and projection_dim < n_features:
        matrix = random_projection(n_features, projection_dim, random_state)
        points = points @ torch.from_numpy(matrix)
    points = points.to(device)
    start = int(random_state.randint(n_points))
    threads = torch.get_num_threads()
    if points.device.type == "cpu":
        # Each step is a handful of small tensor operations: with several
        # threads, their synchronisation costs more than the work, and far
        # more when other processes share the cores (measured on 47,040 x 128
        # points and two busy cores: 4.8 s with one thread, 192 s with two).
        torch.set_num_threads(1)
    try:
        return _greedy_steps(points, n_samples, start)
    finally:
        torch.set_num_threads(threads)


def _greedy_steps(points, n_samples, start):
    """Algorithm 1's loop on prepared points; see :func:`greedy_coreset`."""
    squared_norms = (points * points).sum(dim=1)

    def squared_distances_to(index):
        center = points[index]
        distances = squared_norms - 2.0 * (points @ center) + squared_norms[index]
        return distances.clamp_(min=0.0)

    chosen = np.empty(n_samples, dtype=np.int64)
    chosen[0] = start
    nearest = squared_distances_to(start)
    # Chosen points are marked below every real distance, so rounding can
    # never pick one twice, even among exact duplicates.
    nearest[start] = -1.0
    for i in range(1, n_samples):
        index = int(torch.argmax(nearest))
        chosen[i] = index
        torch.minimum(nearest, squared_distances_to(index), out=nearest)
        nearest[index] = -1.0
    return chosen
