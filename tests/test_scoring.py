import math

import numpy as np
import torch

from skpatchcore._scoring import reweighting


def reweighted_scores(support_distances):
    """Eq. 7 in float64, as the detector evaluates it."""
    tensor = torch.tensor(support_distances, dtype=torch.float64)
    return reweighting.reweighted_scores(tensor, tensor.shape[1]).numpy()


def test_eq7_by_hand():
    # s* = 1, other members of N_b(m*) at distances 2 and 3 from m_test:
    # s = (1 - e^1 / (e^1 + e^2 + e^3)) * 1
    expected = (1 - math.e / (math.e + math.e**2 + math.e**3)) * 1.0
    assert math.isclose(
        reweighted_scores([[1.0, 2.0, 3.0]])[0], expected, rel_tol=1e-12
    )
    # m* in a dense nominal region (its neighbours as close to m_test as m*
    # itself) gets a smaller weight than m* in a sparse one.
    dense = reweighted_scores([[2.0, 2.1, 2.1]])[0]
    sparse = reweighted_scores([[2.0, 6.0, 6.0]])[0]
    assert math.isclose(
        dense,
        (1 - math.exp(2) / (math.exp(2) + 2 * math.exp(2.1))) * 2.0,
        rel_tol=1e-12,
    )
    assert dense < sparse


def test_b_equal_one_is_the_maximum_distance():
    np.testing.assert_array_equal(reweighted_scores([[1.5], [0.25]]), [1.5, 0.25])


def test_stable_for_large_distances():
    # exp(800) overflows float64; the score must stay finite and exact.
    scores = reweighted_scores([[800.0, 801.0, 802.0]])
    weight = 1 - 1 / (1 + math.e + math.e**2)
    assert np.isfinite(scores).all()
    assert math.isclose(scores[0], weight * 800.0, rel_tol=1e-12)


def test_weight_bounds():
    rng = np.random.default_rng(0)
    s_star = rng.uniform(0.1, 5, size=100)
    others = s_star[:, None] + rng.uniform(0, 3, size=(100, 8))
    support = np.column_stack([s_star, others])
    weights = reweighted_scores(support) / s_star
    # m* is the bank feature nearest to m_test, so exp(s*) is the smallest
    # term of the sum: the fraction is at most 1/b and the weight lies in
    # [1 - 1/b, 1).
    assert np.all(weights >= 1 - 1 / 9 - 1e-12)
    assert np.all(weights < 1)


def test_float32_as_an_exported_graph_evaluates_it():
    support = torch.tensor([[1.0, 2.0, 3.0], [800.0, 801.0, 802.0]])
    scores = reweighting.reweighted_scores(support, 3)
    assert scores.dtype == torch.float32
    np.testing.assert_allclose(
        scores.numpy(), reweighted_scores(support.double().numpy()), rtol=1e-5
    )


def test_support_keeps_the_center_first_and_skips_its_duplicates():
    centers = torch.tensor([7, 3])
    # Row 0: a duplicate of m* (row 5, distance 0) ranks before m* itself.
    candidates = torch.tensor([[5, 7, 2, 9], [3, 1, 4, 8]])
    distances = torch.tensor([[0.0, 0.0, 1.5, 2.0], [0.0, 0.5, 0.7, 3.0]])
    support = reweighting.support_rows(centers, candidates, distances, 3)
    assert support.tolist() == [[7, 5, 2], [3, 1, 4]]
