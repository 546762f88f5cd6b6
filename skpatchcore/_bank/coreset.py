"""Greedy k-center coreset selection (paper §3.2, Algorithm 1), whole or by chunks."""

import numpy as np
import torch

from .._torch_utils import as_tensor, one_torch_thread


def random_projection(n_features, projection_dim, random_state):
    """A Gaussian Johnson-Lindenstrauss matrix of shape (n_features, projection_dim).

    Entries are N(0, 1 / projection_dim), so squared distances are preserved
    in expectation.
    """
    return random_state.normal(
        scale=1.0 / np.sqrt(projection_dim), size=(n_features, projection_dim)
    ).astype(np.float32)


def selection_projection(n_features, projection_dim, random_state):
    """The projection the selection runs on, or None when it would not shrink."""
    if projection_dim is None or projection_dim >= n_features:
        return None
    return random_projection(n_features, projection_dim, random_state)


def project(features, projection):
    """``features`` as float32 rows after ``projection`` (None: unchanged)."""
    points = np.ascontiguousarray(features, dtype=np.float32)
    if projection is None:
        return points
    return (torch.from_numpy(points) @ torch.from_numpy(projection)).numpy()


def greedy_coreset(features, n_samples, *, projection_dim, random_state, device="cpu"):
    """Indices of a greedy k-center coreset of ``features``.

    Starting from one randomly drawn point, the point farthest from all points
    chosen so far is added until ``n_samples`` are chosen (minimax facility
    location, eq. 5). Distances are measured after a random linear projection
    to ``projection_dim`` dimensions (skipped when ``projection_dim`` is None
    or not smaller than the feature length). Memory stays linear in the
    number of points: only each point's distance to its nearest chosen point
    is kept. Time grows as ``n_points * n_samples``.

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
    projection = selection_projection(n_features, projection_dim, random_state)
    points = project(features, projection)
    start = int(random_state.randint(n_points))
    return greedy_k_center(points, n_samples, start, device=device)


def greedy_k_center(points, n_samples, start, device="cpu"):
    """Algorithm 1 on points as they are, from a given first point.

    Parameters
    ----------
    points : ndarray of shape (n_points, n_dims)
        Float32 points, already projected.

    n_samples : int
        Number of points to choose, in ``[1, n_points]``.

    start : int
        Row of the first chosen point.

    device : str or torch.device, default="cpu"
        Where the distance updates run.

    Returns
    -------
    indices : ndarray of shape (n_samples,)
        Rows of ``points`` in the order they were chosen.
    """
    n_points = len(points)
    if not 1 <= n_samples <= n_points:
        raise ValueError(f"n_samples must be in [1, {n_points}]; got {n_samples}.")
    points = as_tensor(np.ascontiguousarray(points, dtype=np.float32)).to(device)
    if points.device.type != "cpu":
        return _greedy_steps_on_device(points, n_samples, start)
    # Each step is a handful of small tensor operations: with several
    # threads, their synchronisation costs more than the work, and far more
    # when other processes share the cores (docs/results.rst, first "Notes"
    # section, "Where skpatchcore is ahead", fit s).
    with one_torch_thread():
        return _greedy_steps(points, n_samples, start)


def _greedy_steps(points, n_samples, start):
    """Algorithm 1's loop on prepared points; see :func:`greedy_k_center`."""
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


def _greedy_steps_on_device(points, n_samples, start):
    """Algorithm 1's loop without reading anything back to the host per step.

    On a GPU, ``int(argmax)`` at every step would wait for the device each
    time; here the chosen rows stay on the device until the end, so the
    steps are queued back to back. Same choices as :func:`_greedy_steps`,
    ties included (``argmax`` takes the first largest value in both).
    """
    squared_norms = (points * points).sum(dim=1)
    chosen = torch.empty(n_samples, dtype=torch.int64, device=points.device)
    chosen[0] = start
    index = chosen[:1]
    nearest = torch.empty(len(points), dtype=points.dtype, device=points.device)
    for i in range(n_samples):
        center = points.index_select(0, index)[0]
        distances = squared_norms - 2.0 * (points @ center)
        distances = (distances + squared_norms.index_select(0, index)).clamp_(min=0.0)
        if i == 0:
            nearest.copy_(distances)
        else:
            torch.minimum(nearest, distances, out=nearest)
        nearest.index_fill_(0, index, -1.0)
        if i + 1 < n_samples:
            index = torch.argmax(nearest).reshape(1)
            chosen[i + 1 : i + 2] = index
    return chosen.cpu().numpy()


def split_budget(n_samples, chunk_sizes):
    """Share ``n_samples`` coreset points among chunks in proportion to their sizes.

    Each chunk gets the floor of its proportional share, and the points left
    over go one each to the chunks with the largest remainders (ties to the
    earlier chunk), so that the shares add up to ``n_samples`` exactly. A
    chunk whose share would be zero gets one point, taken from the largest
    share; with fewer points than chunks, each chunk gets one.

    Parameters
    ----------
    n_samples : int
        Total coreset size, at most the chunks' total size.

    chunk_sizes : array-like of int
        Points in each chunk, at least one each.

    Returns
    -------
    shares : ndarray of shape (n_chunks,)
        Coreset points to select in each chunk, between 1 and its size.
    """
    sizes = np.asarray(chunk_sizes, dtype=np.int64)
    if n_samples <= len(sizes):
        return np.ones_like(sizes)
    exact = n_samples * sizes / sizes.sum()
    shares = np.floor(exact).astype(np.int64)
    leftover = n_samples - int(shares.sum())
    order = np.argsort(-(exact - shares), kind="stable")
    shares[order[:leftover]] += 1
    for empty in np.flatnonzero(shares == 0):
        shares[np.argmax(shares)] -= 1
        shares[empty] = 1
    return shares
