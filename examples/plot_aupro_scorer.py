"""
=================================================
Selecting parameters for localization with AUPRO
=================================================

Image-level AUROC only says whether the detector ranks defective images
above good ones. When the anomaly maps matter, select parameters on a
pixel-level metric instead. This example tunes a
:class:`~skpatchcore.PatchCoreDetector` on the MPDD metal plates by the AUPRO
of its anomaly maps, with :func:`~skpatchcore.metrics.make_aupro_scorer`, and
reports the image AUROC of every candidate alongside.

MPDD is not shipped with skpatchcore: set the environment variable
``SKPATCHCORE_MPDD`` to its ``metal_plate`` folder. Without it, the example
runs on ELPV solar cells, which have no masks, and selects on image AUROC
alone.
"""

# SPDX-License-Identifier: BSD-3-Clause

# %%
# Data for the search and for a final check
# -----------------------------------------
# The search needs defective images with their masks, so the test images are
# split in two: one half joins the good training images in the search, the
# other half is kept aside to evaluate the chosen detector. Labels follow
# ``predict``: +1 good, -1 defective.
import os
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from skpatchcore.datasets import load_elpv, load_mvtec_folder

mpdd = Path(os.environ.get("SKPATCHCORE_MPDD", "../shared/data/mpdd_metal_plate"))
if mpdd.is_dir():
    data = load_mvtec_folder(mpdd)
else:
    print(f"No MPDD folder at {mpdd}: using ELPV cells, without masks.")
    data = load_elpv(
        "mono", train_size=30, n_test_normal=30, n_test_defective=30, random_state=0
    )
has_masks = any(mask is not None for mask in data.test_masks)

test_search, X_holdout, y_test_search, y_holdout = train_test_split(
    data.test_images,
    data.test_labels,
    test_size=0.5,
    stratify=data.test_labels,
    random_state=0,
)
X_search = data.train_images + test_search
y_search = np.concatenate([np.ones(len(data.train_images), dtype=int), y_test_search])
print(f"search: {len(X_search)} images, {np.sum(y_search == -1)} defective")
print(f"held out: {len(X_holdout)} images, {np.sum(y_holdout == -1)} defective")

# %%
# A scorer that knows the masks
# -----------------------------
# A scikit-learn scorer is called with the fitted estimator and the images and
# labels of one test fold, ``scorer(estimator, X, y)``: there is no room for
# masks. :func:`~skpatchcore.metrics.make_aupro_scorer` therefore holds the
# masks of all images, keyed by image path, and looks up those of each fold's
# ``X``. The images must be passed as paths, which is how the loaders of
# :mod:`skpatchcore.datasets` return them; good images map to None.
#
# The scorers are given as a dict, so the search records both metrics for
# every candidate. :data:`~skpatchcore.metrics.image_auroc_scorer` is the
# image-level AUROC computed on ``decision_function``.
from skpatchcore.metrics import image_auroc_scorer, make_aupro_scorer

scoring = {"image_auroc": image_auroc_scorer}
if has_masks:
    masks = {image: None for image in data.train_images}
    masks.update(zip(data.test_images, data.test_masks))
    scoring["aupro"] = make_aupro_scorer(masks, fpr_limit=0.3)
selection_metric = "aupro" if has_masks else "image_auroc"

# %%
# The search
# ----------
# :class:`~skpatchcore.model_selection.NoveltyCV` keeps only good images in
# each training fold, while the stratified test folds hold both classes, so
# every fold has defective pixels to score. The grid crosses ``patch_size``,
# the neighbourhood averaged into each patch feature, with ``sigma``, the
# smoothing of the maps in model-input pixels: both shape the maps directly.
# With several metrics and no single one to refit on, ``refit=False``; the
# chosen parameters are refitted below.
from sklearn.model_selection import GridSearchCV, StratifiedKFold

from skpatchcore import PatchCoreDetector
from skpatchcore.model_selection import NoveltyCV

detector = PatchCoreDetector(
    backbone="efficientnet_lite0",
    image_size=128,
    resize=None,
    coreset_ratio=0.1,
    random_state=0,
)
param_grid = {"patch_size": [1, 3], "sigma": [1.0, 4.0]}
search = GridSearchCV(
    detector,
    param_grid,
    scoring=scoring,
    cv=NoveltyCV(StratifiedKFold(3, shuffle=True, random_state=0)),
    refit=False,
)
search.fit(X_search, y_search)

results = search.cv_results_
for i, params in enumerate(results["params"]):
    line = ", ".join(
        f"{metric} {results[f'mean_test_{metric}'][i]:.3f}" for metric in scoring
    )
    print(f"{params}: {line}")
best_index = int(np.argmin(results[f"rank_test_{selection_metric}"]))
best_params = results["params"][best_index]
print(f"best by {selection_metric}: {best_params}")

# %%
# The candidates side by side, with the standard deviation over the folds.
import matplotlib.pyplot as plt

labels = [f"p={p['patch_size']}\nsigma={p['sigma']:g}" for p in results["params"]]
fig, ax = plt.subplots(figsize=(6, 3.5))
for offset, metric in zip([-0.1, 0.1], scoring):
    ax.errorbar(
        np.arange(len(labels)) + offset,
        results[f"mean_test_{metric}"],
        yerr=results[f"std_test_{metric}"],
        fmt="o",
        capsize=3,
        label=metric,
    )
ax.set_xticks(np.arange(len(labels)), labels)
ax.set_ylabel("cross-validated score")
ax.legend()
fig.tight_layout()
plt.show()

# %%
# Check on the held-out images
# ----------------------------
# The chosen parameters are refitted on the search set, whose images
# labelled -1 ``fit`` leaves out, and evaluated on the held-out half of the
# test images.
from sklearn.base import clone

from skpatchcore.metrics import aupro, image_auroc

best = clone(detector).set_params(**best_params).fit(X_search, y_search)
holdout_scores = best.decision_function(X_holdout)
print(f"held-out image AUROC: {image_auroc(y_holdout, holdout_scores):.3f}")
if has_masks:
    holdout_masks = [masks[image] for image in X_holdout]
    print(f"held-out AUPRO: {aupro(holdout_masks, best.anomaly_maps(X_holdout)):.3f}")
