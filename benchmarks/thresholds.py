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
"""

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from quality import command_line, print_run_facts  # noqa: E402

REPO = HERE.parent
DATA = REPO / ".." / "shared" / "data"
BACKBONE = "efficientnet_lite0"
DATASETS = {
    "elpv_mono": "ELPV mono",
    "elpv_poly": "ELPV poly",
    "mpdd_metal_plate": "MPDD metal_plate",
    "kolektorsdd": "KolektorSDD",
}
FOLDERS = {"mpdd_metal_plate": "--mpdd", "kolektorsdd": "--kolektorsdd"}


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
        default=",".join(DATASETS),
        help=f"comma-separated subset of {', '.join(DATASETS)}",
    )
    parser.add_argument(
        "--mpdd",
        default=os.path.normpath(DATA / "mpdd_metal_plate"),
        help="MVTec-style folder of MPDD metal_plate (skipped when absent)",
    )
    parser.add_argument(
        "--kolektorsdd",
        default=os.path.normpath(DATA / "kolektorsdd"),
        help="MVTec-style folder of KolektorSDD (skipped when absent)",
    )
    parser.add_argument(
        "--train-size", type=int, default=100, help="normal ELPV cells to train on"
    )
    parser.add_argument(
        "--n-test",
        type=int,
        default=50,
        help="ELPV test cells of each class, normal and defective",
    )
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--seed", type=int, default=0, help="random_state and the ELPV split"
    )
    args = parser.parse_args(argv)
    args.datasets = [item.strip() for item in args.datasets.split(",") if item]
    unknown = [item for item in args.datasets if item not in DATASETS]
    if unknown or not args.datasets:
        parser.error(
            f"--datasets takes a comma-separated subset of {', '.join(DATASETS)}"
        )
    for name in ("train_size", "n_test", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def load_dataset(name, args):
    """The data set as lazy paths, or None (and why) when it is not there."""
    from skpatchcore.datasets import load_elpv, load_mvtec_folder

    if name in FOLDERS:
        folder = getattr(args, FOLDERS[name].removeprefix("--"))
        if not Path(folder).is_dir():
            return None, f"{DATASETS[name]} skipped: no folder {folder}."
        return load_mvtec_folder(folder), None
    try:
        data = load_elpv(
            name.removeprefix("elpv_"),
            train_size=args.train_size,
            n_test_normal=args.n_test,
            n_test_defective=args.n_test,
            random_state=args.seed,
        )
    except ImportError:
        return None, f"{DATASETS[name]} skipped: elpv-dataset is not installed."
    return data, None


def measure(data, args):
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
    detector.fit(data.train_images)
    fit_seconds = time.perf_counter() - start
    if not any(mask is not None for mask in data.test_masks):
        return detector, detector.score_samples(data.test_images), None, fit_seconds
    scores, normal, defect = [], [], []
    for start in range(0, len(data.test_images), args.batch_size):
        batch = slice(start, start + args.batch_size)
        maps, batch_scores = detector.anomaly_maps(
            data.test_images[batch], return_score_samples=True
        )
        scores.append(batch_scores)
        for anomaly_map, mask in zip(maps, data.test_masks[batch]):
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


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    command = command_line(__file__, argv)
    columns, notes = {}, []
    for name in args.datasets:
        data, skipped = load_dataset(name, args)
        if data is None:
            notes.append(skipped)
            continue
        print(f"[thresholds] {DATASETS[name]} ...", flush=True)
        detector, scores, pixels, fit_seconds = measure(data, args)
        columns[name] = rule_cells(detector, scores, pixels, data.test_labels)
        n_defective = int((data.test_labels == -1).sum())
        notes.append(
            f"{DATASETS[name]}: {detector.n_train_images_} training images, "
            f"{detector.n_calibration_images_} calibrated; "
            f"{len(data.test_labels) - n_defective} good and {n_defective} "
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
