"""Every private name of skpatchcore that a benchmark uses, in one place.

Benchmarks time and compare the package's stages, so some of them reach
past its public API: underscore modules, functions, attributes and module
settings. These move as the package is refactored. The scripts take them
from here only, so that a move is mended in this file alone;
``tests/test_benchmarks.py`` runs every script, and fails until it is.

Importing this module imports torch and skpatchcore: the scripts import it
where they need it.
"""

import numpy as np

from skpatchcore import _detector
from skpatchcore._bank import search as _search
from skpatchcore._bank.builder import BankBuilder
from skpatchcore._bank.coreset import _greedy_steps as greedy_steps
from skpatchcore._bank.search import MemoryBank
from skpatchcore._calibration import thresholds
from skpatchcore._conformal import pvalues as conformal_pvalues
from skpatchcore._feature_batch import FeatureBatch
from skpatchcore._features import patch_features as _patch_features
from skpatchcore._features.backbones import load_backbone
from skpatchcore._features.patch_features import PatchFeatures
from skpatchcore._images import input_geometry, load_image, to_model_input
from skpatchcore._scoring.maps import model_input_maps, to_original_geometry
from skpatchcore._scoring.patch_scores import score_batch
from skpatchcore.datasets import _read_elpv_labels as read_elpv_labels

__all__ = [
    "CANDIDATE_SELECTION",
    "CPU_PIXELS_PER_THREAD",
    "FIT_STAGES",
    "INT8_RANKING",
    "QUERY_TILE",
    "BankBuilder",
    "MemoryBank",
    "PatchFeatures",
    "conformal_pvalues",
    "extractor_networks",
    "fitted_searcher",
    "greedy_steps",
    "input_geometry",
    "load_backbone",
    "load_image",
    "model_input_maps",
    "read_elpv_labels",
    "score_features",
    "thresholds",
    "to_model_input",
    "to_original_geometry",
]

# Module settings that speed.py sets to another value for one call, to time
# what they replaced: (module, attribute).
INT8_RANKING = (_search, "_INT8_RANKING")
CANDIDATE_SELECTION = (_search, "smallest_per_row")
QUERY_TILE = (_search, "_QUERY_TILE")
CPU_PIXELS_PER_THREAD = (_patch_features, "_CPU_PIXELS_PER_THREAD")

# The functions whose wall times scale.py adds up into fit stages:
# stage -> (owner, name), patched where the caller looks them up. The
# coreset's time is build's less _extract's.
FIT_STAGES = {
    "build": (BankBuilder, "build"),
    "features": (BankBuilder, "_extract"),
    "calibration": (_detector, "held_out_values"),
}


def fitted_searcher(detector):
    """The nearest-neighbour search over a fitted detector's memory bank."""
    return detector._model.search


def score_features(detector, searcher, features):
    """Image scores and patch-score grids of patch ``features`` (an array of
    grids, as ``iter_batches`` yields) against ``searcher``, exactly as
    ``score_samples`` computes them."""
    batch = FeatureBatch(
        np.ascontiguousarray(features.reshape(-1, features.shape[-1])),
        tuple(grid.shape[:2] for grid in features),
        (None,) * len(features),
    )
    scores, distances = score_batch(batch, searcher, detector.n_reweight_neighbors)
    return scores, distances.reshape(features.shape[:3])


def extractor_networks(extractor):
    """The network a fitted extractor runs (batch norms folded), the network
    as loaded, and where the first is held: speed.py swaps it there."""
    engine = extractor._engine
    return engine._folded, extractor.model_, (engine, "_folded")
