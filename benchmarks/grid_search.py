"""The README's grid search timed without and with ``memory``, in one run.

``GridSearchCV`` over ``patch_size`` and ``coreset_ratio`` (6 candidates x
3 stratified folds, then the refit of the best one) on labelled ELPV mono
cells with EfficientNet-Lite0, as the README's model-selection example:
once with ``memory=None`` (every fit and every fold's scoring runs the
backbone) and once with ``memory`` in an empty temporary folder (each
image's backbone pass is computed once, then read back). The table gives
the wall time of each search, their ratio, the best parameters and whether
``cv_results_`` agree to the bit. A warm-up fit runs first, so that neither
search pays for the first backbone passes of the process.

Usage, from the repository root::

    python benchmarks/grid_search.py
    python benchmarks/grid_search.py --n-normal 6 --n-defective 3 \\
        --patch-sizes 1,3 --coreset-ratios 0.1 --folds 2 --image-size 64
"""

import argparse
import shutil
import tempfile
import time

import numpy as np
from _common import (
    command_line,
    int_list,
    markdown_row,
    markdown_table,
    print_run_facts,
)


def float_list(text):
    """Comma-separated numbers, for ``--coreset-ratios``."""
    return [float(item) for item in text.split(",") if item.strip()]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--n-normal", type=int, default=80, help="normal cells")
    parser.add_argument("--n-defective", type=int, default=40, help="defective cells")
    parser.add_argument("--patch-sizes", type=int_list, default=[1, 3, 5])
    parser.add_argument("--coreset-ratios", type=float_list, default=[0.01, 0.1])
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument(
        "--image-size",
        type=int,
        default=224,
        help="model input side; the cells are resized to 8/7 of it, then "
        "centre-cropped (the detector's 256/224 by default)",
    )
    parser.add_argument(
        "--backbone",
        default="efficientnet_lite0",
        help="backbone of every candidate, e.g. wide_resnet50_2 (with "
        "--random-weights offline: its time, not its quality)",
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="seeded random weights of a torchvision ResNet (layer2 and "
        "layer3), for timing only",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def backbone_params(args):
    """The backbone parameters that every detector of a run shares.

    Random weights are drawn once, as a module with seeded weights: with
    ``weights=None`` every fit would draw others, which neither the results
    nor the cache could share.
    """
    if not args.random_weights:
        return {"backbone": args.backbone}
    import torch
    import torchvision

    torch.manual_seed(args.seed)
    module = torchvision.models.get_model(args.backbone, weights=None)
    return {"backbone": module, "layers": ("layer2", "layer3")}


def load_cells(args):
    """Labelled ELPV mono cells: ``n_normal`` +1 then ``n_defective`` -1."""
    from skpatchcore.datasets import load_elpv

    data = load_elpv(
        "mono",
        n_test_normal=args.n_normal,
        n_test_defective=args.n_defective,
        random_state=args.seed,
    )
    return list(data.test_images), np.asarray(data.test_labels)


def search(args, images, labels, memory):
    """The fitted ``GridSearchCV`` and its wall time in seconds."""
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    from skpatchcore import PatchCoreDetector

    detector = PatchCoreDetector(
        **backbone_params(args),
        image_size=args.image_size,
        resize=round(args.image_size * 256 / 224),
        memory=memory,
        random_state=args.seed,
    )
    grid = GridSearchCV(
        detector,
        {"patch_size": args.patch_sizes, "coreset_ratio": args.coreset_ratios},
        scoring="roc_auc",
        cv=StratifiedKFold(args.folds, shuffle=True, random_state=args.seed),
    )
    start = time.perf_counter()
    grid.fit(images, labels)
    return grid, time.perf_counter() - start


def same_results(a, b):
    """Whether two searches' fold scores and best parameters agree exactly."""
    keys = [key for key in a.cv_results_ if "test_score" in key]
    return a.best_params_ == b.best_params_ and all(
        np.array_equal(a.cv_results_[key], b.cv_results_[key]) for key in keys
    )


def main(argv=None):
    from skpatchcore import PatchCoreDetector

    args = parse_args(argv)
    images, labels = load_cells(args)
    n_candidates = len(args.patch_sizes) * len(args.coreset_ratios)
    print_run_facts(
        command_line(__file__, argv),
        f"{len(images)} ELPV mono cells ({int(np.sum(labels == -1))} defective), "
        f"{n_candidates} candidates x {args.folds} folds + refit, "
        f"{args.backbone}{' (random weights)' if args.random_weights else ''} "
        f"at {args.image_size}, seed {args.seed}",
    )
    # Warm-up: the process's first backbone passes are slow.
    PatchCoreDetector(
        **backbone_params(args), image_size=args.image_size, resize=None
    ).fit(images[:2])

    plain, plain_s = search(args, images, labels, memory=None)
    folder = tempfile.mkdtemp(prefix="skpatchcore-grid-")
    try:
        cached, cached_s = search(args, images, labels, memory=folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    same = same_results(plain, cached)
    rows = []
    for name, grid, seconds in (
        ("None", plain, plain_s),
        ("temporary folder", cached, cached_s),
    ):
        best = grid.best_params_
        rows.append(
            [
                name,
                f"{seconds:.1f}",
                f"{seconds / plain_s:.2f}",
                f"patch_size={best['patch_size']}, "
                f"coreset_ratio={best['coreset_ratio']:g}",
                f"{grid.best_score_:.4f}",
            ]
        )
    print()
    print(
        markdown_table(
            ("memory", "search s", "ratio to None", "best parameters", "best AUROC"),
            rows,
        )
    )
    print()
    print(markdown_row(["cv_results_ identical", "yes" if same else "NO"]))
    if not same:
        raise SystemExit("the searches with and without memory disagree")


if __name__ == "__main__":
    main()
