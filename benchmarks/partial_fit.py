"""What ``partial_fit`` approximates: one fit on all images against two calls.

For each data set the good training images are split in two halves, A and B
(seeded), and three detectors are compared on the same test images: fitted
on A alone, fitted on A + B at once, and ``partial_fit(A)`` followed by
``partial_fit(B)``. The table gives image AUROC, pixel AUROC and AUPRO (where
masks exist), the coverage radius of the bank over all training patches of
A + B (the largest distance of any of them to its nearest bank feature), the
bank size and the seconds of the last call.

Usage, from the repository root::

    python benchmarks/partial_fit.py
    python benchmarks/partial_fit.py --elpv-size 4 --n-test 2 --folder-subset
"""

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from _common import (
    MPDD_FOLDER,
    command_line,
    coverage_radius,
    first_images,
    load_cells,
    markdown_row,
    markdown_table,
    print_run_facts,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--mpdd", default=MPDD_FOLDER)
    parser.add_argument("--elpv-size", type=int, default=600, help="A + B cells")
    parser.add_argument("--n-test", type=int, default=50, help="ELPV cells per class")
    parser.add_argument(
        "--folder-subset",
        action="store_true",
        help="cut MPDD to its first --elpv-size training images and --n-test "
        "test images of each class too (plumbing checks); by default it is "
        "used whole",
    )
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cache",
        default=os.path.join(
            os.environ.get("TMPDIR", "/tmp"), "skpatchcore-scale-cells"
        ),
    )
    return parser.parse_args(argv)


def data_sets(args):
    """(name, train, test, labels, masks, resize) of each available data set."""
    from skpatchcore.datasets import load_mvtec_folder

    if Path(args.mpdd).is_dir():
        mpdd = load_mvtec_folder(args.mpdd)
        loaded = mpdd.train_images, mpdd.test_images, mpdd.test_labels, mpdd.test_masks
        if args.folder_subset:
            loaded = first_images(*loaded, args.elpv_size, args.n_test)
        yield ("MPDD metal_plate", *loaded, 256)
    train, test, labels = load_cells(args.elpv_size, args)
    yield "ELPV cells", train, test, labels, None, None


def evaluate(detector, train, test, labels, masks):
    from skpatchcore.datasets import load_mask
    from skpatchcore.metrics import aupro, image_auroc, pixel_auroc

    maps, scores = detector.anomaly_maps(test, return_score_samples=True)
    row = {"image AUROC": image_auroc(labels, scores)}
    if masks is not None:
        masks = [None if mask is None else load_mask(mask) for mask in masks]
        row["pixel AUROC"] = pixel_auroc(masks, maps)
        row["AUPRO"] = aupro(masks, maps)
    row["coverage radius"] = coverage_radius(detector, train)
    row["bank"] = len(detector.memory_bank_)
    return row


def main(argv=None):
    from skpatchcore import PatchCoreDetector

    args = parse_args(argv)
    command = command_line(__file__, argv)
    headers = (
        "data set",
        "how",
        "image AUROC",
        "pixel AUROC",
        "AUPRO",
        "coverage radius",
        "bank",
        "last call s",
    )
    rows = []
    for name, train, test, labels, masks, resize in data_sets(args):
        order = np.random.RandomState(args.seed).permutation(len(train))
        half = len(train) // 2
        a = [train[i] for i in order[:half]]
        b = [train[i] for i in order[half:]]
        params = dict(
            backbone="efficientnet_lite0",
            resize=resize,
            coreset_ratio=args.coreset_ratio,
            device="cpu",
            random_state=args.seed,
        )
        detectors = {}
        start = time.perf_counter()
        detectors["fit(A)"] = PatchCoreDetector(**params).fit(a)
        fit_a = time.perf_counter() - start
        start = time.perf_counter()
        detectors["fit(A + B)"] = PatchCoreDetector(**params).fit(a + b)
        fit_ab = time.perf_counter() - start
        partial = PatchCoreDetector(**params).partial_fit(a)
        start = time.perf_counter()
        detectors["partial_fit(A), partial_fit(B)"] = partial.partial_fit(b)
        partial_b = time.perf_counter() - start
        seconds = [fit_a, fit_ab, partial_b]
        for (how, detector), last in zip(detectors.items(), seconds):
            row = evaluate(detector, a + b, test, labels, masks)
            cells = [
                name,
                how,
                f"{row['image AUROC']:.3f}",
                f"{row['pixel AUROC']:.3f}" if "pixel AUROC" in row else "n/a",
                f"{row['AUPRO']:.3f}" if "AUPRO" in row else "n/a",
                f"{row['coverage radius']:.2f}",
                str(row["bank"]),
                f"{last:.0f}",
            ]
            rows.append(cells)
            print(markdown_row(cells), flush=True)
    print_run_facts(
        command,
        f"efficientnet_lite0, coreset_ratio {args.coreset_ratio}, seed "
        f"{args.seed}; MPDD resize 256 / crop 224, ELPV whole cell at 224",
    )
    print()
    print(markdown_table(headers, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
