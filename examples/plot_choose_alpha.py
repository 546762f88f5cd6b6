"""
==============================================
Choosing a false-alarm rate with p-values
==============================================

A quality engineer wants to know how often a good part will be sent to a
second look, not what an anomaly score of 13.6 means.
:meth:`~skpatchcore.PatchCoreDetector.pvalues` turns every score into a
conformal p-value: "this cell is as unusual as 1 good cell in 20" reads
``p = 0.05``. A float ``contamination=alpha`` then flags the images with
``p <= alpha``, so that a good image is flagged with probability at most
``alpha``. This example fits a detector on good solar cells of the ELPV
dataset, keeps 20 of them out of the memory bank to calibrate the p-values,
and compares rates on a test set with good and defective cells.
"""

# SPDX-License-Identifier: BSD-3-Clause

# %%
# Fit with calibration images held out
# ------------------------------------
# ``calibration_holdout=20`` keeps 20 training cells out of the memory bank:
# they are scored against the bank as new cells are, so the p-values of
# new good cells are exactly calibrated. With 20 calibration images the
# smallest p-value is 1/21, so rates below about 0.05 cannot be asked for.
import numpy as np

from skpatchcore import PatchCoreDetector
from skpatchcore.datasets import load_elpv

data = load_elpv(
    "mono", train_size=60, n_test_normal=30, n_test_defective=30, random_state=0
)
X_test, y_test = data.test_images, data.test_labels
detector = PatchCoreDetector(
    backbone="efficientnet_lite0",
    image_size=224,
    resize=None,
    calibration_holdout=20,
    contamination=0.1,
    random_state=0,
).fit(data.train_images)
print(
    f"{detector.n_calibration_images_} calibration cells, bank from "
    f"{detector.n_train_images_ - detector.n_calibration_images_} cells"
)

# %%
# P-values of the test cells
# --------------------------
# Good cells get p-values spread over (0, 1]; defective cells crowd near the
# smallest value, 1/21.
import matplotlib.pyplot as plt

p = detector.pvalues(X_test)
fig, ax = plt.subplots(figsize=(6, 3.5))
bins = np.linspace(0, 1, 22)
ax.hist(p[y_test == 1], bins=bins, alpha=0.6, label="good cells")
ax.hist(p[y_test == -1], bins=bins, alpha=0.6, label="defective cells")
ax.set_xlabel("p-value")
ax.set_ylabel("test cells")
ax.legend()
fig.tight_layout()

# %%
# What each rate costs and buys
# -----------------------------
# ``p <= alpha`` is the decision at any rate, with no refit; the defects
# caught grow with ``alpha``. The share of good cells flagged is at most
# ``alpha`` on average over draws of the calibration cells, but with only 20
# of them (and 30 good test cells) one draw's share scatters around it:
# more calibration images make it steadier. Here the choice is ``alpha =
# 0.1``, the ``contamination`` the detector was fitted with, and
# ``predict`` agrees with ``p <= 0.1``.
for alpha in (0.05, 0.1, 0.2, 0.3):
    flagged = p <= alpha
    print(
        f"alpha {alpha:.2f}: good cells flagged {flagged[y_test == 1].mean():.2f}, "
        f"defects caught {flagged[y_test == -1].mean():.2f}"
    )
assert np.array_equal(detector.predict(X_test) == -1, p <= 0.1)

# %%
# Realized against nominal rate
# -----------------------------
# :func:`~skpatchcore.plotting.plot_reliability` draws the share of good
# test cells flagged at every ``alpha``. The dotted staircase is the rate
# that good cells exchangeable with the 20 calibration cells reach on
# average, ``floor(alpha * 21) / 21``; 30 good test cells scatter around it.
from skpatchcore.plotting import plot_reliability

ax = plot_reliability(p[y_test == 1], n_calibration=detector.n_calibration_images_)
ax.set_title("good test cells flagged")
plt.show()
