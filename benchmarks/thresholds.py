"""Good images kept and defects caught by each rule for the "auto" thresholds.

Fits one :class:`~skpatchcore.PatchCoreDetector` per data set and reads its
held-out training scores (``calibration_scores_``) and the largest held-out
anomaly-map value of each calibration image (``calibration_map_maxima_``).
Every candidate rule turns these into an image threshold (``offset_``) and a
pixel threshold (``pixel_threshold_``) without refitting; the test images are
scored and mapped once, and each pair of thresholds is applied to them as
``predict`` and ``predict_masks`` would.

Two markdown tables are printed, a column per data set. ``predict``: good
test images kept (+1; the true-negative rate) and defective ones caught (-1;
the true-positive rate), as counts. ``predict_masks``, on the data sets with
masks: normal pixels of all test images left unmarked and defect pixels
marked. The last ``predict`` row, the F1-best threshold on the test labels
themselves (:func:`skpatchcore.metrics.f1_max`), is a reference for what
labelled defects can buy, not a rule. The "auto" row is computed here with
NumPy, independently of the package; the fitted ``offset_`` and
``pixel_threshold_`` are listed below the tables to compare.

Usage, from the repository root::

    python benchmarks/thresholds.py
    python benchmarks/thresholds.py --datasets elpv_mono --train-size 10 --n-test 5
    python benchmarks/thresholds.py --datasets elpv_mono,mpdd_metal_plate \\
        --folder-subset --train-size 4 --n-test 2   # plumbing check
"""

import argparse
import sys
import time

import numpy as np
from _common import (
    DATASETS,
    add_folder_options,
    add_split_options,
    command_line,
    dataset_notes,
    load_dataset,
    markdown_table,
    print_run_facts,
    split_choices,
)

BACKBONE = "efficientnet_lite0"
# The columns' order when --datasets is not given.
DEFAULT_DATASETS = ("elpv_mono", "elpv_poly", "mpdd_metal_plate", "kolektorsdd")


def _quantile(q):
    return lambda values: np.quantile(values, q)


def _upper_fence(values):
    q1, q3 = np.quantile(values, [0.25, 0.75])
    return q3 + 1.5 * (q3 - q1)


def _whisker(values):
    return values[values <= _upper_fence(values)].max()


def _median_mad(k):
    def rule(values):
        median = np.median(values)
        return median + k * 1.4826 * np.median(np.abs(values - median))

    return rule


# Each rule maps the held-out anomaly values of the calibration images
# (higher = more anomalous: minus calibration_scores_, or
# calibration_map_maxima_) to the value above which an image is flagged.
RULES = {
    "max (the former auto)": np.max,
    "99 % quantile": _quantile(0.99),
    "Q3 + 1.5 IQR": _upper_fence,
    "whisker: max <= Q3 + 1.5 IQR (auto)": _whisker,
    "median + 3 MAD": _median_mad(3.0),
    "median + 2 MAD": _median_mad(2.0),
    "95 % quantile (contamination=0.05)": _quantile(0.95),
    "90 % quantile (contamination=0.1)": _quantile(0.9),
}
REFERENCE = "reference: F1-best on the test labels"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--datasets",
        default=",".join(DEFAULT_DATASETS),
        help=f"comma-separated subset of {', '.join(DEFAULT_DATASETS)}",
    )
    add_folder_options(parser)
    add_split_options(parser)
    parser.add_argument(
        "--seed", type=int, default=0, help="random_state and the ELPV split"
    )
    args = parser.parse_args(argv)
    args.datasets = split_choices(parser, "--datasets", args.datasets, DEFAULT_DATASETS)
    for name in ("train_size", "n_test", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def measure(train, test, masks, args):
    """One fit, one pass over the test images; what every rule needs.

    Returns the fitted detector, the test ``score_samples``, the sorted map
    values of the normal and of the defect pixels of all test images (None
    when the data set has no masks), and the fit time.
    """
    from skpatchcore import PatchCoreDetector
    from skpatchcore.datasets import load_mask

    detector = PatchCoreDetector(
        backbone=BACKBONE,
        coreset_ratio=args.coreset_ratio,
        batch_size=args.batch_size,
        device="cpu",
        random_state=args.seed,
    )
    start = time.perf_counter()
    detector.fit(train)
    fit_seconds = time.perf_counter() - start
    if masks is None:
        return detector, detector.score_samples(test), None, fit_seconds
    scores, normal, defect = [], [], []
    for start in range(0, len(test), args.batch_size):
        batch = slice(start, start + args.batch_size)
        maps, batch_scores = detector.anomaly_maps(
            test[batch], return_score_samples=True
        )
        scores.append(batch_scores)
        for anomaly_map, mask in zip(maps, masks[batch]):
            mask = load_mask(mask, anomaly_map.shape)
            normal.append(anomaly_map[~mask])
            defect.append(anomaly_map[mask])
    pixels = np.sort(np.concatenate(normal)), np.sort(np.concatenate(defect))
    return detector, np.concatenate(scores), pixels, fit_seconds


def _share_above(sorted_values, threshold):
    """Fraction of ``sorted_values`` above ``threshold``."""
    n_below = np.searchsorted(sorted_values, threshold, side="right")
    return 1 - n_below / len(sorted_values)


def _image_cell(scores, labels, offset):
    """Good images kept and defective images caught at ``offset``, as counts."""
    good, defective = scores[labels == 1], scores[labels == -1]
    kept, caught = (good >= offset).sum(), (defective < offset).sum()
    return f"{kept}/{len(good)}, {caught}/{len(defective)}"


def rule_cells(detector, scores, pixels, labels):
    """Per rule: the predict cell and the predict_masks cell (None without masks).

    The last entry, the F1-best threshold on the test labels, is a reference.
    """
    from skpatchcore.metrics import f1_max

    cells = {}
    for rule, threshold_of in RULES.items():
        offset = -threshold_of(-detector.calibration_scores_)
        pixel_cell = None
        if pixels is not None:
            normal, defect = pixels
            pixel_threshold = threshold_of(detector.calibration_map_maxima_)
            kept = 1 - _share_above(normal, pixel_threshold)
            caught = _share_above(defect, pixel_threshold)
            pixel_cell = f"{100 * kept:.2f} %, {100 * caught:.1f} %"
        cells[rule] = _image_cell(scores, labels, offset), pixel_cell
    _, best = f1_max(labels, scores)
    cells[REFERENCE] = _image_cell(scores, labels, best), "—"
    return cells


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    command = command_line(__file__, argv)
    columns = {}
    datasets, notes = dataset_notes(args.datasets, args)
    for name in datasets:
        train, test, labels, masks = load_dataset(name, args, lazy=True)
        print(f"[thresholds] {DATASETS[name]} ...", flush=True)
        detector, scores, pixels, fit_seconds = measure(train, test, masks, args)
        columns[name] = rule_cells(detector, scores, pixels, labels)
        n_defective = int((labels == -1).sum())
        notes.append(
            f"{DATASETS[name]}: {detector.n_train_images_} training images, "
            f"{detector.n_calibration_images_} calibrated; "
            f"{len(labels) - n_defective} good and {n_defective} "
            f"defective test images; fitted offset_ {detector.offset_:.3f}, "
            f"pixel_threshold_ {detector.pixel_threshold_:.3f}; fit {fit_seconds:.0f} s"
        )

    print_run_facts(
        command,
        f"backbone {BACKBONE} (ImageNet weights), coreset_ratio "
        f"{args.coreset_ratio}, other parameters default, seed {args.seed}, CPU; "
        f"ELPV {args.train_size} training cells, {args.n_test} good and "
        f"{args.n_test} defective test cells",
    )
    rules = [*RULES, REFERENCE]
    print()
    print("predict at offset_: good test images kept, defective ones caught")
    print()
    header = ["rule", *(DATASETS[name] for name in columns)]
    rows = [[rule, *(cells[rule][0] for cells in columns.values())] for rule in rules]
    print(markdown_table(header, rows))
    with_masks = [name for name, cells in columns.items() if cells[rules[0]][1]]
    if with_masks:
        print()
        print(
            "predict_masks at pixel_threshold_: normal test pixels kept, "
            "defect pixels caught"
        )
        print()
        header = ["rule", *(DATASETS[name] for name in with_masks)]
        rows = [
            [rule, *(columns[name][rule][1] for name in with_masks)]
            for rule in rules[:-1]
        ]
        print(markdown_table(header, rows))
    print()
    for line in notes:
        print(f"- {line}")
    print()
    print(f"Total run time: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
