"""How skpatchcore's fit grows with the number of training images.

Fits :class:`~skpatchcore.PatchCoreDetector` (EfficientNet-Lite0 ImageNet
weights, whole cell resized to 224 x 224, coreset ratio 0.1) on N good ELPV
solar cells for each N of ``--sizes`` and prints one markdown table: fit
seconds and its stages (patch features, coreset, threshold calibration),
peak resident memory, memory-bank size, prediction milliseconds per image and
image AUROC on held-out ELPV cells. Beyond the good cells the package has,
training sets are filled with flipped and 90-degree-rotated copies of them.

At the N of ``--exact-sizes`` it also fits the exact greedy coreset (the
paper's Algorithm 1 on all patches) and reports, for both, the coverage
radius: the largest distance of any training patch to its nearest
memory-bank feature. anomalib's PatchCore runs at the N of
``--anomalib-sizes`` when ``--anomalib-python`` can import it (see
``benchmarks/README.rst``), and a ``wide_resnet50_2`` row with random
weights at ``--wrn-size`` measures memory and speed with 1024-dimensional
features.

Every row runs in its own child process, so that its peak memory is its own.

Usage, from the repository root::

    python benchmarks/scale.py
    python benchmarks/scale.py --sizes 100,300 --exact-sizes 100 --wrn-size 0
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import (
    ANOMALIB_PYTHON,
    anomalib_status,
    command_line,
    coverage_radius,
    int_list,
    load_cells,
    markdown_row,
    markdown_table,
    print_run_facts,
    run_child,
)

IMAGE_SIZE = 224
# Test cells timed in the rows with random weights, which have no AUROC.
SPEED_ONLY_TEST_IMAGES = 10


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )

    parser.add_argument("--sizes", type=int_list, default=[100, 300, 1000, 2624, 10000])
    parser.add_argument("--exact-sizes", type=int_list, default=[100, 300])
    parser.add_argument(
        "--chunk-sizes",
        type=int_list,
        default=[],
        help="coreset_chunk_size of the partitioned rows; default: the detector's",
    )
    parser.add_argument(
        "--radius-sizes",
        type=int_list,
        default=[],
        help="N at which every row also reports its coverage radius "
        "(always at --exact-sizes)",
    )
    parser.add_argument(
        "--nn-algorithms",
        type=lambda text: text.split(","),
        default=["auto"],
        help="nn_algorithm of the skpatchcore rows, one row per value",
    )
    parser.add_argument("--anomalib-sizes", type=int_list, default=[100])
    parser.add_argument(
        "--wrn-size", type=int, default=10000, help="0 leaves the row out"
    )
    parser.add_argument(
        "--wrn-calibration-images",
        type=int,
        default=20,
        help="max_calibration_images of the wide_resnet50_2 row, whose "
        "calibration against a bank of 1024-dimensional features would "
        "otherwise take longer than its features",
    )
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--n-test", type=int, default=50, help="test cells per class")
    parser.add_argument(
        "--partial-images",
        type=int,
        default=100,
        help="images added by one partial_fit call after each fit; 0 leaves "
        "the call out",
    )
    parser.add_argument("--n-jobs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cache",
        default=os.path.join(tempfile.gettempdir(), "skpatchcore-scale-cells"),
        help="folder for the flipped and rotated training cells",
    )
    parser.add_argument("--anomalib-python", default=ANOMALIB_PYTHON)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _timed(owner, name, totals, key):
    """Wrap method ``name`` of ``owner`` to add its wall time to totals[key]."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - start

    setattr(owner, name, wrapper)


def worker(args):
    """Fit and score one row; write its results as JSON."""
    spec = json.loads(args.worker)
    train, test, labels = load_cells(spec["n_train"], args)
    if spec["backbone"] != "efficientnet_lite0":
        # Random weights: speed and memory only, timed on a few test cells.
        test = test[:SPEED_ONLY_TEST_IMAGES]
    out = Path(args.worker_out)
    if spec["method"] == "anomalib":
        result = _anomalib_row(train, test, args)
    else:
        result = _skpatchcore_row(spec, train, test, args)
    result["n_test"] = len(test)
    np.save(out / "scores.npy", np.asarray(result.pop("scores"), dtype=np.float64))
    (out / "result.json").write_text(json.dumps(result))


def _skpatchcore_row(spec, train, test, args):
    from _internals import FIT_STAGES

    from skpatchcore import PatchCoreDetector

    totals = dict.fromkeys(FIT_STAGES, 0.0)
    for stage, (owner, method) in FIT_STAGES.items():
        _timed(owner, method, totals, stage)
    detector = PatchCoreDetector(
        backbone=spec["backbone"],
        weights=spec["weights"],
        image_size=IMAGE_SIZE,
        resize=None,
        coreset_ratio=args.coreset_ratio,
        coreset_method=spec["coreset_method"],
        **({"coreset_chunk_size": spec["chunk_size"]} if "chunk_size" in spec else {}),
        **(
            {"max_calibration_images": spec["calibration_images"]}
            if "calibration_images" in spec
            else {}
        ),
        nn_algorithm=spec.get("nn_algorithm", "auto"),
        n_jobs=args.n_jobs,
        device="cpu",
        random_state=args.seed,
    )
    start = time.perf_counter()
    detector.fit(train)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    _, score_samples = detector.anomaly_maps(test, return_score_samples=True)
    predict_seconds = time.perf_counter() - start
    result = {
        "fit_seconds": fit_seconds,
        "features_seconds": totals["features"],
        "coreset_seconds": totals["build"] - totals["features"],
        "calibration_seconds": totals["calibration"],
        "predict_seconds": predict_seconds,
        "bank_size": int(detector.memory_bank_.shape[0]),
        "feature_dim": int(detector.memory_bank_.shape[1]),
        "scores": -score_samples,
        "search": detector.nn_algorithm_,
        "offset": detector.offset_,
        "offset_sd": _offset_sd(detector, args.seed),
    }
    if spec.get("radius"):
        result["coverage_radius"] = coverage_radius(detector, train)
    if "calibration_images" in spec or not args.partial_images:
        # Also left out of the speed-and-memory row, where partial_fit would
        # only repeat its costs.
        return result
    more = load_cells(len(train) + args.partial_images, args)[0][len(train) :]
    start = time.perf_counter()
    detector.partial_fit(more)
    result["partial_fit_seconds"] = time.perf_counter() - start
    return result


def _offset_sd(detector, seed, n_resamples=200):
    """Bootstrap standard deviation of ``offset_`` over the calibration images.

    How far the threshold moves when the calibration images are drawn
    again: the calibration noise that a change of search is compared with.
    """
    from _internals import thresholds

    rng = np.random.RandomState(seed)
    scores = detector.calibration_scores_
    maxima = detector.calibration_map_maxima_
    offsets = []
    for _ in range(n_resamples):
        drawn = rng.randint(len(scores), size=len(scores))
        offsets.append(thresholds(scores[drawn], maxima[drawn], "auto")[0])
    return float(np.std(offsets))


def _anomalib_row(train, test, args):
    from _anomalib_runner import fit_anomalib_patchcore, predict_anomalib_patchcore
    from _internals import load_backbone
    from PIL import Image

    # The runner takes decoded images (N is small where anomalib runs).
    train, test = ([np.asarray(Image.open(p)) for p in s] for s in (train, test))
    start = time.perf_counter()
    module, layers, mean, std = load_backbone("efficientnet_lite0")
    common = dict(mean=mean, std=std, image_size=IMAGE_SIZE, resize=None, batch_size=16)
    model = fit_anomalib_patchcore(
        train,
        backbone_module=module,
        layers=layers,
        coreset_ratio=args.coreset_ratio,
        num_neighbors=9,
        seed=args.seed,
        **common,
    )
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    scores, _ = predict_anomalib_patchcore(model, test, **common)
    return {
        "fit_seconds": fit_seconds,
        "predict_seconds": time.perf_counter() - start,
        "bank_size": int(model.memory_bank.shape[0]),
        "feature_dim": int(model.memory_bank.shape[1]),
        "scores": scores,
    }


def row_specs(args):
    specs = []
    for n in args.sizes:
        radius = n in args.exact_sizes or n in args.radius_sizes
        for chunk_size in args.chunk_sizes or [None]:
            for algorithm in args.nn_algorithms:
                spec = dict(
                    n_train=n,
                    method="skpatchcore",
                    coreset_method="auto",
                    nn_algorithm=algorithm,
                )
                if chunk_size is not None:
                    spec["chunk_size"] = chunk_size
                if radius:
                    spec["radius"] = True
                specs.append(spec)
        if n in args.exact_sizes:
            specs.append(
                dict(
                    n_train=n,
                    method="skpatchcore",
                    coreset_method="greedy",
                    radius=True,
                )
            )
        if n in args.anomalib_sizes:
            specs.append(dict(n_train=n, method="anomalib"))
    if args.wrn_size:
        specs.append(
            dict(
                n_train=args.wrn_size,
                method="skpatchcore",
                coreset_method="auto",
                backbone="wide_resnet50_2",
                weights=None,
                calibration_images=args.wrn_calibration_images,
            )
        )
    for spec in specs:
        spec.setdefault("backbone", "efficientnet_lite0")
        spec.setdefault("weights", "DEFAULT")
    return specs


def _label(spec):
    if spec["method"] == "anomalib":
        return "anomalib 2.7.0"
    if spec["backbone"] != "efficientnet_lite0":
        return (
            f"skpatchcore {spec['backbone']} (random weights, "
            f"{spec['calibration_images']} calibration images)"
        )
    label = f"skpatchcore {spec['coreset_method']}"
    if "chunk_size" in spec:
        label += f", chunk {spec['chunk_size']}"
    if spec.get("nn_algorithm", "auto") != "auto":
        label += f", nn_algorithm={spec['nn_algorithm']}"
    return label


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    started = time.perf_counter()
    command = command_line(__file__, argv)
    specs = row_specs(args)
    anomalib_problem = None
    if any(spec["method"] == "anomalib" for spec in specs):
        anomalib_problem = anomalib_status(args.anomalib_python)
    headers = (
        "N images",
        "method",
        "fit s",
        "fit ms/img",
        "features s",
        "coreset s",
        "calibration s",
        "peak MiB",
        "bank",
        "predict ms/img",
        "image AUROC",
        "search",
        "offset (bootstrap sd)",
        "coverage radius",
        f"partial_fit +{args.partial_images} s",
    )
    rows, notes = [], []
    from skpatchcore.metrics import image_auroc

    with tempfile.TemporaryDirectory(prefix="skpatchcore-scale-") as tmp:
        for number, spec in enumerate(specs):
            if spec["method"] == "anomalib" and anomalib_problem is not None:
                notes.append(
                    f"anomalib at N={spec['n_train']} skipped: {anomalib_problem}"
                )
                continue
            out = Path(tmp) / str(number)
            out.mkdir()
            python = (
                args.anomalib_python if spec["method"] == "anomalib" else sys.executable
            )
            print(f"[scale] N={spec['n_train']} {_label(spec)} ...", flush=True)
            code, wall, peak = run_child(
                [
                    python,
                    str(Path(__file__).resolve()),
                    "--worker",
                    json.dumps(spec),
                    "--worker-out",
                    str(out),
                    *(f"--{k}={v}" for k, v in _forwarded(args)),
                ]
            )
            if code != 0:
                notes.append(f"N={spec['n_train']} {_label(spec)} failed ({code})")
                continue
            result = json.loads((out / "result.json").read_text())
            auroc = "—"
            if spec["backbone"] == "efficientnet_lite0":
                _, _, labels = load_cells(1, args)
                auroc = f"{image_auroc(labels, -np.load(out / 'scores.npy')):.3f}"
            n = spec["n_train"]

            cells = [
                str(n),
                _label(spec),
                f"{result['fit_seconds']:.0f}",
                f"{1000 * result['fit_seconds'] / n:.0f}",
                *(
                    f"{result[key]:.0f}" if key in result else "—"
                    for key in (
                        "features_seconds",
                        "coreset_seconds",
                        "calibration_seconds",
                    )
                ),
                f"{peak:.0f}",
                f"{result['bank_size']} x {result['feature_dim']}",
                f"{1000 * result['predict_seconds'] / result['n_test']:.0f}",
                auroc,
                result.get("search", "—"),
                f"{result['offset']:.3f} ({result['offset_sd']:.3f})"
                if "offset" in result
                else "—",
                f"{result['coverage_radius']:.2f}"
                if "coverage_radius" in result
                else "—",
                f"{result['partial_fit_seconds']:.0f}"
                if "partial_fit_seconds" in result
                else "—",
            ]
            rows.append(cells)
            print(markdown_row(cells), flush=True)

    print_run_facts(
        command,
        f"ELPV cells (mono and poly), whole cell resized to {IMAGE_SIZE}, "
        f"coreset_ratio {args.coreset_ratio}, n_jobs {args.n_jobs}, seed "
        f"{args.seed}, CPU; test: {args.n_test} good + {args.n_test} defective "
        "cells",
    )
    print()
    print(markdown_table(headers, rows))
    for note in notes:
        print(f"- {note}")
    print(f"\nTotal run time: {time.perf_counter() - started:.0f} s")
    return 0


def _forwarded(args):
    names = ("coreset_ratio", "n_test", "partial_images", "n_jobs", "seed", "cache")
    for name in names:
        yield name.replace("_", "-"), getattr(args, name)


if __name__ == "__main__":
    sys.exit(main())
