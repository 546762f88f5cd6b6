import math

import numpy as np
import pytest
import torch
from conftest import brute_force_k_center

from skpatchcore._bank.builder import BankBuilder, plan_chunks
from skpatchcore._bank.coreset import random_projection
from skpatchcore._feature_batch import FeatureBatch


class ToyFeatures:
    """Stands in for the engine's feature stage: each "image" is its grid."""

    def __init__(self, feature_dim):
        self.feature_dim = feature_dim
        self.device = torch.device("cpu")

    def batches(self, sources, batch_size):
        for start in range(0, len(sources), batch_size):
            grids = sources[start : start + batch_size]
            yield FeatureBatch(
                np.concatenate([g.reshape(-1, self.feature_dim) for g in grids]),
                tuple(g.shape[:2] for g in grids),
                (None,) * len(grids),
            )


def toy_images(n_images, grid=(2, 3), dim=6, seed=0):
    rng = np.random.default_rng(seed)
    return list(rng.normal(size=(n_images, *grid, dim)).astype(np.float32))


def build(images, coreset_ratio=0.2, **params):
    params = (
        dict(
            projection_dim=4,
            method="partitioned",
            chunk_size=18,
            n_jobs=None,
            batch_size=3,
            random_state=np.random.RandomState(0),
            verbose=0,
        )
        | params
    )
    features = ToyFeatures(images[0].shape[2])
    counts = np.array([math.prod(image.shape[:2]) for image in images])
    n_bank = math.ceil(coreset_ratio * counts.sum())
    return BankBuilder(features, **params).build(
        images, n_bank, counts, keep_images=[i for i in (1, 4) if i < len(images)]
    )


def test_partitioned_bank_is_the_union_of_brute_force_chunk_coresets():
    images = toy_images(20)
    bank, bank_images, kept = build(images)
    # Replay the draws: shuffle, projection, one start per chunk.
    replay = np.random.RandomState(0)
    # 3 images of 6 patches fit in a chunk of 18: 7 chunks of 3, ..., 3, 2.
    chunks = np.array_split(replay.permutation(20), 7)
    projection = random_projection(6, 4, replay)
    sizes = [6 * len(chunk) for chunk in chunks]
    starts = [replay.randint(size) for size in sizes]
    # 0.2 * 120 = 24 points: 3.6 for each chunk of 18 patches, 2.4 for the
    # last one of 12; the 4 left over go to the first four.
    shares = [4, 4, 4, 4, 3, 3, 2]
    expected, expected_images = [], []
    for chunk, start, share in zip(chunks, starts, shares):
        features = np.concatenate([images[i].reshape(6, 6) for i in chunk])
        chosen = brute_force_k_center(features @ projection, share, start)
        expected.append(features[chosen])
        expected_images.append(chunk[chosen // 6])
    np.testing.assert_allclose(bank, np.concatenate(expected), rtol=1e-6)
    np.testing.assert_array_equal(bank_images, np.concatenate(expected_images))
    kept_grids = kept.grids()
    np.testing.assert_array_equal(kept_grids[0], images[1])
    np.testing.assert_array_equal(kept_grids[1], images[4])


def test_one_chunk_is_the_greedy_coreset_of_all_patches():
    from skpatchcore._bank.coreset import greedy_coreset

    images = toy_images(5)
    bank, bank_images, _ = build(images, method="auto", chunk_size=30)
    features = np.concatenate([image.reshape(6, 6) for image in images])
    chosen = greedy_coreset(
        features, 6, projection_dim=4, random_state=np.random.RandomState(0)
    )
    np.testing.assert_array_equal(bank, features[chosen])
    np.testing.assert_array_equal(bank_images, chosen // 6)


@pytest.mark.parametrize(
    "method, chunk_size, expected",
    [
        ("auto", 60, [10]),  # all 60 patches fit in one chunk
        ("auto", 59, [5, 5]),
        ("greedy", 6, [10]),
        ("partitioned", 60, [10]),
        ("partitioned", 13, [2, 2, 2, 2, 2]),  # 2 images of 6 patches a chunk
        ("partitioned", 1, [1] * 10),  # at least one image a chunk
    ],
)
def test_plan_chunks(method, chunk_size, expected):
    chunks = plan_chunks(
        10,
        6,
        method=method,
        chunk_size=chunk_size,
        random_state=np.random.RandomState(0),
    )
    assert [len(chunk) for chunk in chunks] == expected
    assert sorted(np.concatenate(chunks).tolist()) == list(range(10))


def test_keeping_every_patch_selects_nothing():
    images = toy_images(4)
    bank, bank_images, _ = build(images, coreset_ratio=1.0)
    assert len(bank) == 24
    for row, image in zip(bank, bank_images):
        assert any(np.array_equal(row, patch) for patch in images[image].reshape(6, 6))


@pytest.mark.slow
def test_parallel_chunks_give_the_same_bank():
    images = toy_images(30)
    one, one_images, _ = build(images)
    two, two_images, _ = build(images, n_jobs=2)
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(one_images, two_images)


def test_covering_radius_within_twice_the_best_of_each_chunk():
    # Gonzalez's bound, which the partitioned bank inherits chunk by chunk:
    # every patch lies within twice the optimal k-center radius of its chunk.
    from itertools import combinations

    images = toy_images(6, grid=(2, 2), dim=2, seed=3)
    bank, bank_images, _ = build(
        images, coreset_ratio=0.25, projection_dim=None, chunk_size=8
    )
    chunks = plan_chunks(
        6, 4, method="partitioned", chunk_size=8, random_state=np.random.RandomState(0)
    )
    for chunk in chunks:
        points = np.concatenate([images[i].reshape(4, 2) for i in chunk])
        centers = bank[np.isin(bank_images, chunk)]
        radius = np.linalg.norm(points[:, None] - centers[None], axis=2).min(1).max()
        best = min(
            np.linalg.norm(points[:, None] - points[list(c)][None], axis=2).min(1).max()
            for c in combinations(range(len(points)), len(centers))
        )
        assert radius <= 2 * best + 1e-6


def test_plan_chunks_of_images_with_their_own_patches():
    # Chunks of 20 patches hold 2 images when each may have 10.
    chunks = plan_chunks(
        5,
        np.array([3, 10, 4, 10, 2]),
        method="partitioned",
        chunk_size=20,
        random_state=np.random.RandomState(0),
    )
    assert [len(chunk) for chunk in chunks] == [2, 2, 1]
    # 17 patches in all fit in one chunk: the greedy coreset of all of them.
    (chunk,) = plan_chunks(
        5, np.array([3, 4, 4, 4, 2]), method="auto", chunk_size=20, random_state=None
    )
    np.testing.assert_array_equal(chunk, np.arange(5))


def test_rows_of_images_with_their_own_grids_name_their_image():
    rng = np.random.default_rng(5)
    grids = [(2, 3), (4, 1), (1, 1), (3, 3), (2, 2)]
    images = [rng.normal(size=(*grid, 6)).astype(np.float32) for grid in grids]
    counts = np.array([math.prod(grid) for grid in grids])
    builder = BankBuilder(
        ToyFeatures(6),
        projection_dim=4,
        method="partitioned",
        chunk_size=9,
        n_jobs=None,
        batch_size=2,
        random_state=np.random.RandomState(0),
        verbose=0,
    )
    bank, bank_images, kept = builder.build(
        images, int(counts.sum()), counts, keep_images=[3, 1]
    )
    # Every patch is kept, each named after the image it comes from.
    assert len(bank) == counts.sum()
    for row, image in zip(bank, bank_images):
        assert any(np.array_equal(row, p) for p in images[image].reshape(-1, 6))
    assert sorted(np.bincount(bank_images).tolist()) == sorted(counts.tolist())
    # The kept images come back on their own grids.
    np.testing.assert_array_equal(kept.grids()[0], images[3])
    np.testing.assert_array_equal(kept.grids()[1], images[1])
    assert kept.grid_shapes == ((3, 3), (4, 1))
