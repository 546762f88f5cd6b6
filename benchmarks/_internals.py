"""Every private name of skpatchcore that a benchmark uses, in one place.

Benchmarks time and compare the package's stages, so some of them reach
past its public API: underscore modules, functions, attributes and module
settings. These move as the package is refactored. The scripts take them
from here only, so that a move is mended in this file alone;
``tests/test_benchmarks.py`` runs every script, and fails until it is.

Importing this module imports torch and skpatchcore: the scripts import it
where they need it.
"""

from skpatchcore import PatchCoreDetector, _feature_extractor, _memory_bank
from skpatchcore._anomaly_maps import model_input_maps, to_original_geometry
from skpatchcore._backbones import _SamePaddingConv2d as SamePaddingConv2d
from skpatchcore._backbones import load_backbone
from skpatchcore._bank_builder import BankBuilder
from skpatchcore._coreset import _greedy_steps as greedy_steps
from skpatchcore._images import input_geometry, load_image, to_model_input
from skpatchcore._memory_bank import MemoryBank
from skpatchcore.datasets import _read_elpv_labels as read_elpv_labels

__all__ = [
    "CANDIDATE_SELECTION",
    "CPU_PIXELS_PER_THREAD",
    "FIT_STAGES",
    "INT8_RANKING",
    "QUERY_TILE",
    "BankBuilder",
    "MemoryBank",
    "SamePaddingConv2d",
    "extractor_networks",
    "fitted_searcher",
    "greedy_steps",
    "input_geometry",
    "load_backbone",
    "load_image",
    "model_input_maps",
    "read_elpv_labels",
    "score_features",
    "to_model_input",
    "to_original_geometry",
]

# Module settings that speed.py sets to another value for one call, to time
# what they replaced: (module, attribute).
INT8_RANKING = (_memory_bank, "_INT8_RANKING")
CANDIDATE_SELECTION = (_memory_bank, "smallest_per_row")
QUERY_TILE = (_memory_bank, "_QUERY_TILE")
CPU_PIXELS_PER_THREAD = (_feature_extractor, "_CPU_PIXELS_PER_THREAD")

# The methods whose wall times scale.py adds up into fit stages:
# stage -> (class, method). The coreset's time is build's less _extract's.
FIT_STAGES = {
    "build": (BankBuilder, "build"),
    "features": (BankBuilder, "_extract"),
    "calibration": (PatchCoreDetector, "_held_out_scores"),
}


def fitted_searcher(detector):
    """The nearest-neighbour search over a fitted detector's memory bank."""
    return detector._searcher


def score_features(detector, searcher, features):
    """Image scores and patch scores of patch ``features`` against ``searcher``,
    exactly as ``score_samples`` computes them."""
    return detector._score_features(searcher, features)


def extractor_networks(extractor):
    """The network a fitted extractor runs (batch norms folded), the network
    as loaded, and the attribute that holds the first: speed.py swaps it."""
    return extractor._network, extractor.model_, "_network"
