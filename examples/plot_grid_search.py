"""
==================================================
Tuning PatchCore with GridSearchCV and NoveltyCV
==================================================

:class:`~skpatchcore.PatchCoreDetector` is a scikit-learn estimator, so its
parameters can be tuned with :class:`~sklearn.model_selection.GridSearchCV`.
Two things differ from tuning a classifier: the detector must be fitted on
normal images only, and its labels are +1 (normal) and -1 (anomaly). This
example searches over ``patch_size`` and ``coreset_ratio`` on a small set of
ELPV solar cells and checks the chosen parameters on held-out cells.
"""

# SPDX-License-Identifier: BSD-3-Clause

# %%
# Labelled images
# ---------------
# Model selection needs defective images too, to measure how well each
# candidate separates them from normal ones. We take 45 cells, one third of
# them defective, and keep 15 of them aside for a final check. The labels
# follow the convention of ``predict``: +1 for normal, -1 for anomalous.
import numpy as np
from sklearn.model_selection import train_test_split

from skpatchcore.datasets import load_elpv

data = load_elpv(
    "mono", train_size=10, n_test_normal=30, n_test_defective=15, random_state=0
)
X_search, X_holdout, y_search, y_holdout = train_test_split(
    data.test_images,
    data.test_labels,
    test_size=15,
    stratify=data.test_labels,
    random_state=0,
)
print(f"search: {len(X_search)} images, {np.sum(y_search == -1)} defective")
print(f"held out: {len(X_holdout)} images, {np.sum(y_holdout == -1)} defective")

# %%
# Cross-validation that fits on normal images only
# -------------------------------------------------
# :class:`~skpatchcore.model_selection.NoveltyCV` wraps any splitter. Its test
# folds are those of the splitter, so each holds both classes; its training
# folds lose their anomalies, which would otherwise enter the memory bank.
from sklearn.model_selection import StratifiedKFold

from skpatchcore.model_selection import NoveltyCV

cv = NoveltyCV(StratifiedKFold(3, shuffle=True, random_state=0))
for fold, (train, test) in enumerate(cv.split(X_search, y_search)):
    print(
        f"fold {fold}: fit on {len(train)} normal images; "
        f"score {np.sum(y_search[test] == 1)} normal and "
        f"{np.sum(y_search[test] == -1)} defective images"
    )

# %%
# The search
# ----------
# ``scoring="roc_auc"`` works as is. For an estimator that is not a
# classifier, scikit-learn feeds ``decision_function`` to
# :func:`~sklearn.metrics.roc_auc_score` and takes the larger label, +1, as
# the positive class. That is the AUROC of "normal" against a score that is
# higher for normal images, which is exactly the usual anomaly-detection AUROC
# of "anomaly" against the anomaly score ``-decision_function``.
# :data:`skpatchcore.metrics.image_auroc_scorer` gives the same value, and
# also refuses labels other than +1 and -1 (with 0/1 labels ``roc_auc`` would
# silently report one minus the AUROC).
#
# ``refit=True`` refits the best parameters on all of ``X_search``:
# :meth:`~skpatchcore.PatchCoreDetector.fit` leaves out the images that ``y``
# labels -1, so the refitted detector learns from the normal images only.
# (The detector's ``fit`` would do the same for every training fold, so a
# plain ``StratifiedKFold`` gives the same search; ``NoveltyCV`` makes it
# visible in the folds.)
#
# Small images (128x128) keep the example fast; ``patch_size`` is the side of
# the neighbourhood averaged around each feature position, and
# ``coreset_ratio`` the fraction of training patches kept in the memory bank.
#
# Neither parameter changes the backbone's outputs, which are the costly
# part of every fit: ``memory`` stores them per image in a folder (here a
# temporary one; pass a folder of your own to keep them between sessions),
# so that each image goes through the backbone once for the whole search
# rather than once per candidate and fold. The results are identical.
import tempfile

from sklearn.model_selection import GridSearchCV

from skpatchcore import PatchCoreDetector

cache_folder = tempfile.mkdtemp(prefix="skpatchcore-")
detector = PatchCoreDetector(
    backbone="efficientnet_lite0",
    image_size=128,
    resize=None,
    random_state=0,
    memory=cache_folder,
)
param_grid = {"patch_size": [1, 3, 5], "coreset_ratio": [0.01, 0.1]}
search = GridSearchCV(detector, param_grid, scoring="roc_auc", cv=cv, refit=True)
search.fit(X_search, y_search)

results = search.cv_results_
print("rank  patch_size  coreset_ratio  ROC AUC (mean +- std)")
for i in np.argsort(results["rank_test_score"], kind="stable"):
    print(
        f"{results['rank_test_score'][i]:4d}  {results['param_patch_size'][i]:10d}"
        f"  {results['param_coreset_ratio'][i]:13g}"
        f"  {results['mean_test_score'][i]:.3f} +- {results['std_test_score'][i]:.3f}"
    )
print("best parameters:", search.best_params_)

# %%
# The same means as a grid: one cell per pair of parameters.
import matplotlib.pyplot as plt

patch_sizes, ratios = param_grid["patch_size"], param_grid["coreset_ratio"]
mean_auroc = np.empty((len(ratios), len(patch_sizes)))
for params, score in zip(results["params"], results["mean_test_score"]):
    row = ratios.index(params["coreset_ratio"])
    mean_auroc[row, patch_sizes.index(params["patch_size"])] = score

fig, ax = plt.subplots(figsize=(5, 3), layout="constrained")
image = ax.imshow(mean_auroc, cmap="viridis")
ax.set_xticks(range(len(patch_sizes)), labels=patch_sizes)
ax.set_yticks(range(len(ratios)), labels=ratios)
ax.set_xlabel("patch_size")
ax.set_ylabel("coreset_ratio")
for (row, column), score in np.ndenumerate(mean_auroc):
    color = "black" if image.norm(score) > 0.6 else "white"
    ax.text(column, row, f"{score:.3f}", ha="center", va="center", color=color)
fig.colorbar(image, ax=ax, label="mean ROC AUC over the folds")
plt.show()

# %%
# The refitted detector
# ---------------------
# ``best_estimator_`` was fitted, with the best parameters, on every normal
# image of the search set; it is evaluated on the held-out images, which took
# no part in the choice.
from skpatchcore.metrics import image_auroc

best = search.best_estimator_
print(f"fitted on {best.n_train_images_} normal images")
holdout_auroc = image_auroc(y_holdout, best.decision_function(X_holdout))
print(f"held-out image AUROC: {holdout_auroc:.3f}")

# %%
# The cached outputs stay in ``cache_folder`` until it is deleted; this
# example leaves nothing behind.
import shutil

shutil.rmtree(cache_folder)

# %%
# With so few images the cross-validated scores are noisy, as their standard
# deviations show: on real data, search on as many labelled images as you can
# spare, and keep a held-out set to report the final score.
