"""Ablation on KolektorSDD: input geometry x backbone x coreset ratio.

KolektorSDD's parts are long and thin (500 pixels wide, about 1,250 high),
so how an image becomes a model input matters: a centre square crop drops
most of the part, a squash to a square shrinks it unevenly, and an
aspect-kept resize keeps all of it at the cost of more patches. This script
fits skpatchcore on the whole training set for every combination of input
geometry, backbone (EfficientNet-Lite0, Lite1, Lite2 at their native sizes,
and a :class:`~skpatchcore.PatchCoreEnsemble` of the three) and coreset
ratio, plus anomalib's PatchCore at the settings given by
``--anomalib-runs``, and prints one markdown table: image AUROC, pixel
AUROC, AUPRO, fit seconds, predict milliseconds per image and peak memory.

Every row runs in its own child process through ``quality.py``'s worker, so
data loading, timing, peak memory and metrics are exactly those of
``quality.py`` (see ``benchmarks/README.rst``).

Usage, from the repository root::

    python benchmarks/ablation.py
    python benchmarks/ablation.py --train-size 8 --n-test 4 --geometries crop \\
        --backbones efficientnet_lite0 --ratios 0.1 --anomalib-runs crop:0.1
"""

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import quality
from _common import (
    ANOMALIB_PYTHON,
    KOLEKTORSDD_FOLDER,
    anomalib_status,
    command_line,
    load_dataset,
    markdown_table,
    print_run_facts,
    split_choices,
)

DATASET = "kolektorsdd"
ANOMALIB_BACKBONE = "efficientnet_lite0"


def _anomalib_run(text):
    """``geometry:ratio[:backbone]`` -> (geometry, ratio, backbone)."""
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"{text!r} is not geometry:ratio[:backbone]")
    geometry, ratio = parts[0], float(parts[1])
    backbone = parts[2] if len(parts) == 3 else ANOMALIB_BACKBONE
    if geometry not in quality.GEOMETRIES:
        raise ValueError(f"unknown geometry {geometry!r} in {text!r}")
    if backbone not in quality.NATIVE_SIZES:
        raise ValueError(f"anomalib takes one EfficientNet-Lite backbone, not {text!r}")
    if not 0 < ratio <= 1:
        raise ValueError(f"the ratio of {text!r} must be in (0, 1]")
    return geometry, ratio, backbone


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--kolektorsdd",
        default=KOLEKTORSDD_FOLDER,
        help="MVTec-style folder of KolektorSDD",
    )
    parser.add_argument(
        "--train-size",
        type=int,
        help="first training images to fit on (default: all of them)",
    )
    parser.add_argument(
        "--n-test",
        type=int,
        help="first test images of each class, good and crack (default: all)",
    )
    parser.add_argument(
        "--geometries",
        default=",".join(quality.GEOMETRIES),
        help=f"comma-separated subset of {', '.join(quality.GEOMETRIES)}",
    )
    parser.add_argument(
        "--backbones",
        default=",".join(quality.BACKBONES),
        help=f"comma-separated subset of {', '.join(quality.BACKBONES)}",
    )
    parser.add_argument(
        "--ratios", default="0.01,0.1", help="comma-separated coreset ratios"
    )
    parser.add_argument(
        "--anomalib-runs",
        default="crop:0.1,squash:0.1,crop:0.01,squash:0.01,keep_aspect:0.01",
        help="comma-separated geometry:ratio[:backbone] of the anomalib rows "
        f"(backbone {ANOMALIB_BACKBONE} unless given); '' for none",
    )
    parser.add_argument("--num-neighbors", type=int, default=9)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="random_state of every fit")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="prediction passes over the test set; the median time is reported",
    )
    parser.add_argument(
        "--anomalib-python",
        default=ANOMALIB_PYTHON,
        help="interpreter with anomalib installed (rows skipped when unusable)",
    )
    args = parser.parse_args(argv)
    args.geometries = split_choices(
        parser, "--geometries", args.geometries, quality.GEOMETRIES
    )
    args.backbones = split_choices(
        parser, "--backbones", args.backbones, quality.BACKBONES
    )
    try:
        args.ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
        args.anomalib_runs = [
            _anomalib_run(run.strip())
            for run in args.anomalib_runs.split(",")
            if run.strip()
        ]
    except ValueError as exc:
        parser.error(str(exc))
    if not args.ratios or not all(0 < r <= 1 for r in args.ratios):
        parser.error("--ratios takes comma-separated numbers in (0, 1]")
    for name in ("train_size", "n_test"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not Path(args.kolektorsdd).is_dir():
        parser.error(f"no KolektorSDD folder {args.kolektorsdd}")
    return args


def worker_args(args, n_train, n_test):
    """``quality.py``'s arguments for the KolektorSDD worker, cut as asked."""
    return quality.parse_args(
        [
            "--datasets",
            DATASET,
            "--kolektorsdd",
            args.kolektorsdd,
            "--folder-subset",
            "--train-size",
            str(n_train),
            "--n-test",
            str(n_test),
            "--num-neighbors",
            str(args.num_neighbors),
            "--batch-size",
            str(args.batch_size),
            "--seed",
            str(args.seed),
            "--repeat",
            str(args.repeat),
            "--anomalib-python",
            args.anomalib_python,
        ]
    )


def planned_runs(args, anomalib_ok):
    """(method, geometry, backbone, ratio) of every row, in table order."""
    runs = [
        ("skpatchcore", geometry, backbone, ratio)
        for geometry in args.geometries
        for backbone in args.backbones
        for ratio in args.ratios
    ]
    if anomalib_ok:
        runs += [
            ("anomalib", geometry, backbone, ratio)
            for geometry, ratio, backbone in args.anomalib_runs
        ]
    return runs


def _short(backbone):
    return backbone.removeprefix("efficientnet_")


def _row_summary(row):
    cells = dict(zip(quality.METRIC_HEADERS, quality.metric_cells(row)))
    return ", ".join(f"{name} {value}" for name, value in cells.items())


def ablation_table(rows, best_anomalib):
    """The markdown table, anomalib's best row (by image AUROC) marked."""
    headers = ("geometry", "backbone", "coreset ratio", "method")
    cell_rows = []
    for row in rows:
        method = f"{row['method']} {row['version']}"
        if row is best_anomalib:
            method += " (best)"
        cell_rows.append(
            [
                row["geometry"],
                _short(row["backbone"]),
                f"{row['ratio']:g}",
                method,
                *quality.metric_cells(row),
            ]
        )
    return markdown_table((*headers, *quality.METRIC_HEADERS), cell_rows)


def _margins(best, reference):
    """How ``best`` compares with ``reference`` on the three quality metrics."""
    parts = []
    for key, name in (
        ("image_auroc", "image AUROC"),
        ("pixel_auroc", "pixel AUROC"),
        ("aupro", "AUPRO"),
    ):
        parts.append(f"{name} {100 * (best[key] - reference[key]):+.1f} points")
    return ", ".join(parts)


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    command = command_line(__file__, argv)
    from skpatchcore.datasets import load_mvtec_folder

    data = load_mvtec_folder(args.kolektorsdd)
    n_train = min(args.train_size or len(data.train_images), len(data.train_images))
    n_test = args.n_test or len(data.test_images)
    base = worker_args(args, n_train, n_test)
    _, _, labels, masks = load_dataset(DATASET, base, lazy=True)

    notes = []
    anomalib_ok = bool(args.anomalib_runs)
    if anomalib_ok:
        problem = anomalib_status(args.anomalib_python)
        if problem is not None:
            anomalib_ok = False
            notes.append(f"anomalib rows skipped: {problem}.")
    interpreters = {"skpatchcore": sys.executable, "anomalib": args.anomalib_python}
    runs = planned_runs(args, anomalib_ok)

    rows, details = [], []
    with tempfile.TemporaryDirectory(prefix="skpatchcore-ablation-") as tmp:
        for i, (method, geometry, backbone, ratio) in enumerate(runs):
            name = f"{geometry} / {_short(backbone)} / {ratio:g} / {method}"
            print(f"[ablation] {i + 1}/{len(runs)} {name} ...", flush=True)
            run_args = copy.copy(base)
            run_args.geometry, run_args.backbone = geometry, backbone
            run_args.coreset_ratio = ratio
            row, line = quality.run_row(
                DATASET,
                method,
                run_args,
                interpreters[method],
                Path(tmp) / f"run{i}",
                labels,
                masks,
            )
            if row is None:
                notes.append(f"{name} {line}.")
                print(f"[ablation] {name} {line}", flush=True)
                continue
            row.update(geometry=geometry, backbone=backbone, ratio=ratio)
            rows.append(row)
            details.append(f"{name}: {line}")
            print(f"[ablation]   {_row_summary(row)}", flush=True)

    print_run_facts(
        command,
        f"KolektorSDD, {n_train} training images, {len(labels)} test images; "
        "each backbone at its native size "
        + ", ".join(
            f"{_short(name)} {size}/{resize}"
            for name, (size, resize) in quality.NATIVE_SIZES.items()
        )
        + " (image_size/resize of the crop; the squash and the shorter side "
        f"of keep_aspect use image_size), {args.num_neighbors} re-weighting "
        f"neighbours, batch size {args.batch_size}, seed {args.seed}, CPU, "
        f"median of {args.repeat} prediction passes",
    )
    ours = [row for row in rows if row["method"] == "skpatchcore"]
    theirs = [row for row in rows if row["method"] == "anomalib"]
    best_anomalib = max(theirs, key=lambda row: row["image_auroc"], default=None)
    print()
    print(ablation_table(rows, best_anomalib))
    print()
    if ours and best_anomalib is not None:
        best = max(ours, key=lambda row: row["image_auroc"])
        print(
            f"- Best skpatchcore row by image AUROC ({best['geometry']} / "
            f"{_short(best['backbone'])} / {best['ratio']:g}) against anomalib's "
            f"best ({best_anomalib['geometry']} / "
            f"{_short(best_anomalib['backbone'])} / {best_anomalib['ratio']:g}): "
            f"{_margins(best, best_anomalib)}."
        )
    for line in details + notes:
        print(f"- {line}")
    print()
    print(f"Total run time: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
