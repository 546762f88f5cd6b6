"""PatchCore industrial anomaly detection as a scikit-learn estimator."""

from ._detector import PatchCoreDetector
from ._ensemble import PatchCoreEnsemble
from ._feature_extractor import PatchFeatureExtractor
from ._folder_scoring import score_folder

__version__ = "0.1.0.dev0"

__all__ = [
    "PatchCoreDetector",
    "PatchCoreEnsemble",
    "PatchFeatureExtractor",
    "score_folder",
]
