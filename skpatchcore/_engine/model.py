"""The PatchCore engine under the estimators: no scikit-learn in here."""

from .._scoring.maps import image_maps
from .._scoring.patch_scores import score_batch


class PatchCoreModel:
    """A fitted PatchCore model: features, memory bank, scorer and maps.

    The estimators validate, orchestrate, calibrate and persist; this holds
    the data's way through the method, the same for square inputs and for
    images of their own shapes (every stage takes a :class:`FeatureBatch`).

    Parameters
    ----------
    features : PatchFeatures
        Images to patch features.

    search : MemoryBank
        The memory bank and its nearest-neighbour search.

    n_reweight_neighbors : int
        ``b`` of eq. 7.

    sigma : float
        Gaussian smoothing of the maps, in model-input pixels.

    distance : {"euclidean", "cosine"}, default="euclidean"
        What patch distances measure. For "cosine", ``features`` must give
        unit vectors (:class:`~skpatchcore._scoring.distances.UnitFeatures`)
        and the bank must hold them.

    image_score : {"reweighted", "max"} or float, default="reweighted"
        How an image's patch distances become its score.
    """

    def __init__(
        self,
        features,
        search,
        n_reweight_neighbors,
        sigma,
        distance="euclidean",
        image_score="reweighted",
    ):
        self.features = features
        self.search = search
        self.n_reweight_neighbors = int(n_reweight_neighbors)
        self.sigma = float(sigma)
        self.distance = distance
        self.image_score = image_score

    def to(self, device):
        """Run the backbone and the search on ``device``; returns self."""
        self.features.to(device)
        self.search = self.search.to(device)
        return self

    def score(self, batch, exclude=None):
        """Image anomaly scores and patch distances; see :func:`score_batch`."""
        return score_batch(
            batch,
            self.search,
            self.n_reweight_neighbors,
            exclude,
            distance=self.distance,
            image_score=self.image_score,
        )

    def image_maps(self, batch, distances):
        """Maps at each image's own resolution."""
        return image_maps(distances, batch, self.sigma)

    def predict(self, sources, batch_size):
        """Yield ``(batch, anomaly scores, patch distances)`` per batch of images."""
        for batch in self.features.batches(sources, batch_size):
            scores, distances = self.score(batch)
            yield batch, scores, distances
