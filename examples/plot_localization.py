"""
=====================================
Localizing defects on metal plates
=====================================

PatchCore scores every patch of an image, so besides an image-level decision
it gives a map of where an image looks abnormal. This example fits a
:class:`~skpatchcore.PatchCoreDetector` on good metal plates of the MPDD
dataset and compares its anomaly maps and predicted masks with the
ground-truth masks, using pixel AUROC and AUPRO.

MPDD is not shipped with skpatchcore. Set the environment variable
``SKPATCHCORE_MPDD`` to the ``metal_plate`` folder, laid out like MVTec AD
(see :func:`~skpatchcore.datasets.load_mvtec_folder`). Without it, the
example runs on ELPV solar cells, which have no masks: it then shows the maps
but computes no pixel-level metric.
"""

# SPDX-License-Identifier: BSD-3-Clause

# %%
# Load the data
# -------------
import os
from pathlib import Path

import numpy as np

from skpatchcore.datasets import load_elpv, load_mvtec_folder

mpdd = Path(os.environ.get("SKPATCHCORE_MPDD", "../shared/data/mpdd_metal_plate"))
if mpdd.is_dir():
    data = load_mvtec_folder(mpdd)
else:
    print(f"No MPDD folder at {mpdd}: using ELPV cells, without masks.")
    data = load_elpv(
        "mono", train_size=40, n_test_normal=20, n_test_defective=20, random_state=0
    )
has_masks = any(mask is not None for mask in data.test_masks)
print(
    f"{data.category}: {len(data.train_images)} training images, "
    f"{np.sum(data.test_labels == 1)} good and {np.sum(data.test_labels == -1)} "
    "defective test images"
)

# %%
# Fit and score
# -------------
# The plates are square, so ``resize=None`` feeds the whole image to the
# backbone: no border is cropped away. Anomaly maps are returned at each
# image's own resolution (here 512x512), so they line up with the masks.
from skpatchcore import PatchCoreDetector
from skpatchcore.metrics import aupro, image_auroc, pixel_auroc

detector = PatchCoreDetector(
    backbone="efficientnet_lite0",
    image_size=224,
    resize=None,
    coreset_ratio=0.1,
    random_state=0,
).fit(data.train_images)

# One pass gives the maps and the image scores together.
maps, scores = detector.anomaly_maps(data.test_images, return_score_samples=True)
print(f"image AUROC: {image_auroc(data.test_labels, scores):.3f}")
if has_masks:
    print(f"pixel AUROC: {pixel_auroc(data.test_masks, maps):.3f}")
    print(f"AUPRO (FPR <= 0.3): {aupro(data.test_masks, maps):.3f}")

# %%
# Pixel AUROC pools all pixels, so large defects dominate it. AUPRO, the
# normalized area under the per-region overlap curve up to a false positive
# rate of 30%, gives every connected defect the same weight, however small.
#
# The hardest cases
# -----------------
# :func:`~skpatchcore.plotting.plot_extremes` shows the good images with the
# highest anomaly scores (the likeliest false alarms) and the defective images
# with the lowest (the likeliest misses), with the ground truth outlined in
# green. Each panel gives the image's anomaly score, ``-score_samples``, and
# says whether it exceeds the detector's image threshold ``-offset_``, i.e.
# whether ``predict`` flags it. When none of the likeliest misses is
# flagged, a third row shows the clearest catches. All maps share one colour
# scale of anomaly scores; given the detector, the colours turn hot at its
# ``pixel_threshold_`` (the black line of the colorbar), and a border band
# that the model never saw would be greyed out (here ``resize=None`` feeds
# it the whole image).
from skpatchcore.plotting import plot_anomaly_map, plot_extremes

fig = plot_extremes(
    data.test_images,
    data.test_labels,
    scores,
    maps,
    masks=data.test_masks,
    n=4,
    detector=detector,
)

# %%
# Predicted masks
# ---------------
# ``predict_masks`` marks the pixels whose map value exceeds
# ``pixel_threshold_``, the largest map value met on the training images when
# each was scored without its own patches, once the images above the box
# plot's upper fence are set aside. Here it is drawn as a dashed white
# line over three defective images, next to the ground truth.
import matplotlib.pyplot as plt

defective = np.flatnonzero(data.test_labels == -1)[:3]
images = [data.test_images[i] for i in defective]
masks = detector.predict_masks(images)
# One colour scale for the three maps, which includes the threshold.
vmin = min(min(maps[i].min() for i in defective), detector.pixel_threshold_)
vmax = max(max(maps[i].max() for i in defective), detector.pixel_threshold_)

fig, axes = plt.subplots(1, len(defective), figsize=(10, 3.6), layout="constrained")
for ax, i, pred_mask in zip(axes, defective, masks):
    plot_anomaly_map(
        data.test_images[i],
        maps[i],
        mask=data.test_masks[i],
        pred_mask=pred_mask,
        ax=ax,
        vmin=vmin,
        vmax=vmax,
        detector=detector,
    )
    ax.set_title(f"test image #{i}", fontsize="small")
colorbar = fig.colorbar(
    axes[-1].images[-1],
    ax=axes,
    label="anomaly score (black line: pixel threshold)",
)
colorbar.ax.axhline(detector.pixel_threshold_, color="black", linewidth=2)
fig.suptitle(f"Predicted masks at pixel_threshold_ = {detector.pixel_threshold_:.2f}")
plt.show()
