"""The engine's dense mode: the whole scoring as one torch module, for export.

:class:`ScoringGraph` computes, from images at the model input size, what
:meth:`PatchCoreDetector.score_samples` and the model-input maps of
:meth:`PatchCoreDetector.anomaly_maps` compute, with tensor operations only
(no NumPy, SciPy or Python loops over images), so that ``torch.jit.trace``
and ``torch.onnx.export`` can record it with the memory bank inside. It runs
the engine's own parts: the patch aggregation, eq. 7 with its support set,
and the map operators; only the search is its own, the exact search written
as one product over the whole bank, which a trace can record.
"""

import copy
import functools
import math

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted
from torch import nn

from .._bank.search import _RERANK_MARGIN
from .._images import image_size_pair
from .._scoring.distances import from_euclidean, top_mean, unit_length
from .._scoring.maps import axis_operator
from .._scoring.reweighting import reweighted_scores, support_rows


def _keep_output(outputs, layer, module, args, output):
    """Forward hook: record a tapped layer's output of its first call."""
    outputs.setdefault(layer, output)


class ScoringGraph(nn.Module):
    """Images at the model input size to ``score_samples`` and anomaly maps.

    Parameters
    ----------
    detector : PatchCoreDetector
        A fitted detector searching exactly (``nn_algorithm_ == "exact"``).
        Its network is copied onto the CPU; the detector is not modified.

    Attributes
    ----------
    backbone : torch.nn.Module
        Copy of the detector's backbone, on the CPU; the submodules that run
        after its last tapped layer are ``torch.nn.Identity``.
    token_grid : TokenGrid or None
        For a vision transformer, the extractor's conversion of its tokens
        to maps on the patch grid.
    """

    def __init__(self, detector):
        super().__init__()
        extractor = detector.feature_extractor_
        # The extractor's LayerTaps ends the forward pass by raising an
        # exception from a hook after the last tap, which torch.export cannot
        # record. The copy's own hooks stay inert (they act only inside
        # LayerTaps.forward); these record without raising, and the rest of
        # the forward pass runs through the submodules that
        # build_feature_network replaced by Identity, so it costs nothing.
        self.backbone = copy.deepcopy(extractor.model_.backbone).cpu()
        self.layers = extractor.layers_
        # A vision transformer's tokens become maps as in the extractor.
        self.token_grid = copy.deepcopy(extractor.model_.token_grid)
        self._outputs = {}
        for layer in self.layers:
            self.backbone.get_submodule(layer).register_forward_hook(
                functools.partial(_keep_output, self._outputs, layer)
            )
        self.aggregator = copy.deepcopy(extractor._engine.aggregator).cpu()
        self.grid_shape = tuple(extractor.grid_shape_)
        self.input_shape = image_size_pair(extractor.image_size)
        self.distance = detector.distance
        self.image_score = detector.image_score
        bank = detector.memory_bank_
        self.n_support = min(detector.n_reweight_neighbors, len(bank))
        # Candidates measured again after the ranking by a matrix product:
        # for the nearest bank feature of a patch, and for N_b(m*).
        self.n_candidates = min(len(bank), 1 + _RERANK_MARGIN)
        self.n_support_candidates = min(len(bank), self.n_support + _RERANK_MARGIN)
        for name in ("mean", "std"):
            values = torch.tensor(getattr(extractor, f"{name}_"), dtype=torch.float32)
            self.register_buffer(name, values.view(1, 3, 1, 1))
        bank = torch.from_numpy(np.array(bank, dtype=np.float32))
        self.register_buffer("bank", bank)
        self.register_buffer("bank_norms", (bank * bank).sum(dim=1))
        sigma = float(detector.sigma)
        for name, grid_length, input_length in zip(
            ("rows", "columns"), self.grid_shape, self.input_shape
        ):
            self.register_buffer(
                name, axis_operator(grid_length, input_length, sigma).clone()
            )

    def patch_features(self, images):
        """Patch features as :class:`PatchFeatureExtractor` computes them.

        Parameters
        ----------
        images : torch.Tensor of shape (n_images, 3, height, width)
            RGB in [0, 1] at the model input size.

        Returns
        -------
        features : torch.Tensor of shape (n_images, n_patches, n_features)
            One row per grid position, row-major.
        """
        inputs = (images - self.mean) / self.std
        if self.token_grid is not None:
            inputs = self.token_grid.fit_input(inputs)
        self._outputs.clear()
        try:
            self.backbone(inputs)
            maps = [self._outputs[name] for name in self.layers]
        finally:
            self._outputs.clear()
        if self.token_grid is not None:
            maps = [self.token_grid(tokens, inputs.shape[-2:]) for tokens in maps]
        stacked = self.aggregator(maps, self.grid_shape)
        if self.distance == "cosine":
            stacked = unit_length(stacked, 1)
        return stacked.flatten(2).transpose(1, 2)

    def _candidates(self, queries, n_candidates):
        """Bank rows nearest to each query, and their distances, unsorted.

        As in :class:`MemoryBank`, a matrix product ranks the bank and the
        best candidates are measured again as norms of differences, which
        suffer no cancellation.
        """
        ranking = self.bank_norms - 2.0 * torch.matmul(queries, self.bank.T)
        _, rows = torch.topk(ranking, n_candidates, dim=-1, largest=False)
        distances = torch.linalg.vector_norm(
            self.bank[rows] - queries.unsqueeze(-2), dim=-1
        )
        return distances, rows

    def nearest(self, features):
        """Distance to, and row of, the nearest bank feature of each patch.

        Parameters
        ----------
        features : torch.Tensor of shape (n_images, n_patches, n_features)
            Patch features.

        Returns
        -------
        distances : torch.Tensor of shape (n_images, n_patches)
            Euclidean distances.
        rows : torch.Tensor of shape (n_images, n_patches)
            Bank row of each nearest feature.
        """
        distances, candidates = self._candidates(features, self.n_candidates)
        distances, best = torch.min(distances, dim=2, keepdim=True)
        return distances.squeeze(2), torch.gather(candidates, 2, best).squeeze(2)

    def support(self, centers):
        """``N_b(m*)`` of each ``m*``: itself first, then its nearest others.

        Searched here rather than tabulated for every bank row at export
        time: a table costs a search of the whole bank against itself, whose
        time grows with the square of the bank size (20,000 rows took 9 s on
        two CPU cores),
        where this search costs one bank row per image.

        Parameters
        ----------
        centers : torch.Tensor of shape (n_images,)
            Bank row of ``m*`` per image.

        Returns
        -------
        support : torch.Tensor of shape (n_images, b)
            Bank rows.
        """
        if self.n_support == 1:
            return centers.unsqueeze(1)
        distances, candidates = self._candidates(
            self.bank[centers], self.n_support_candidates
        )
        return support_rows(centers, candidates, distances, self.n_support)

    def image_scores(self, features, distances, rows):
        """Score of each image, as the detector's ``image_score`` sets it.

        Parameters
        ----------
        features : torch.Tensor of shape (n_images, n_patches, n_features)
            Patch features.
        distances, rows : torch.Tensor of shape (n_images, n_patches)
            From :meth:`nearest`.

        Returns
        -------
        scores : torch.Tensor of shape (n_images,)
            Anomaly scores, higher is more anomalous.
        """
        if self.image_score != "reweighted":
            fraction = 0.0 if self.image_score == "max" else self.image_score
            return top_mean(distances, fraction, math.prod(self.grid_shape))
        worst = torch.argmax(distances, dim=1, keepdim=True)
        m_test = torch.gather(
            features, 1, worst.unsqueeze(2).expand(-1, -1, features.shape[2])
        )
        support = self.support(torch.gather(rows, 1, worst).squeeze(1))
        support_distances = torch.linalg.vector_norm(self.bank[support] - m_test, dim=2)
        support_distances = from_euclidean(support_distances, self.distance)
        return reweighted_scores(support_distances, self.n_support)

    def maps(self, distances):
        """Patch distances upsampled to the model input and smoothed.

        Parameters
        ----------
        distances : torch.Tensor of shape (n_images, n_patches)
            From :meth:`nearest`.

        Returns
        -------
        maps : torch.Tensor of shape (n_images, height, width)
            As ``model_input_maps`` computes them.
        """
        grids = distances.reshape(-1, *self.grid_shape)
        return torch.matmul(torch.matmul(self.rows, grids), self.columns.T)

    def forward(self, images):
        """Score images and map their anomalies.

        Parameters
        ----------
        images : torch.Tensor of shape (n_images, 3, height, width)
            Float32 RGB in [0, 1] at the model input size.

        Returns
        -------
        score_samples : torch.Tensor of shape (n_images,)
            Minus the eq. 7 score: higher is more normal.
        maps : torch.Tensor of shape (n_images, height, width)
            Anomaly maps on the model input; higher is more anomalous.
        """
        features = self.patch_features(images)
        distances, rows = self.nearest(features)
        distances = from_euclidean(distances, self.distance)
        return -self.image_scores(features, distances, rows), self.maps(distances)


def check_exportable(detector):
    """Refuse a detector whose scoring the graph cannot reproduce.

    Parameters
    ----------
    detector : PatchCoreDetector
        What was passed to an export function.

    Raises
    ------
    ValueError
        If it searches approximately, has no fixed input shape, or its
        parameters changed since fit.
    sklearn.exceptions.NotFittedError
        If it is not fitted.
    """
    # Checked first: fitting would not help.
    if detector.nn_algorithm not in ("exact", "auto"):
        _refuse_approximate(detector.nn_algorithm)
    check_is_fitted(detector)
    detector._check_unchanged_since_fit("export")
    if detector.nn_algorithm_ != "exact":
        _refuse_approximate(detector.nn_algorithm_)
    if detector.feature_extractor_.grid_shape_ is None:
        raise ValueError(
            f"resize={detector.resize!r} gives each image a model input of its "
            "own shape, and an exported graph takes one fixed input shape: "
            "fit the detector with resize=None or an int to export it."
        )


def example_input(graph, n_images=2):
    """Random images of the graph's input shape, for tracing.

    Parameters
    ----------
    graph : ScoringGraph
        The graph.
    n_images : int, default=2
        Batch size; torch.export would fix a batch size of 1 as a constant.

    Returns
    -------
    images : torch.Tensor of shape (n_images, 3, height, width)
        Float32 values in [0, 1].
    """
    generator = torch.Generator().manual_seed(0)
    return torch.rand(n_images, 3, *graph.input_shape, generator=generator)


def build_scoring_graph(detector):
    """The scoring graph of ``detector``, checked and run once.

    Parameters
    ----------
    detector : PatchCoreDetector
        A fitted detector.

    Returns
    -------
    graph : ScoringGraph
        In eval mode, without gradients.

    Raises
    ------
    ValueError
        If :func:`check_exportable` refuses the detector, or its backbone
        cannot run to the end of its forward pass.
    sklearn.exceptions.NotFittedError
        If it is not fitted.
    """
    check_exportable(detector)
    graph = ScoringGraph(detector).eval().requires_grad_(False)
    try:
        with torch.no_grad():
            graph(example_input(graph))
    except Exception as exc:
        # The detector stops its backbone at the last used layer; the graph
        # runs it to the end, through the later layers replaced by Identity,
        # which a module's own forward code may not accept.
        backbone = type(graph.backbone).__name__
        raise ValueError(
            f"The backbone {backbone} cannot be exported: its forward pass, "
            f"run to the end with the layers after {graph.layers[-1]!r} "
            f"removed, fails ({type(exc).__name__}: {exc}). Pass as backbone "
            f"a module whose forward ends at {graph.layers[-1]!r}, and fit "
            "again."
        ) from exc
    return graph


def _refuse_approximate(algorithm):
    raise ValueError(
        "Only nn_algorithm='exact' can be exported, got a detector searching "
        f"with {algorithm!r}: the graph searches the whole memory bank, so it "
        "would not give the approximate neighbours this detector scores "
        "with. Fit the detector with nn_algorithm='exact' to export it "
        "(nn_algorithm='auto' chooses 'ivf' for large banks)."
    )
