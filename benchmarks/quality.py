"""Detection quality of skpatchcore against anomalib's PatchCore.

Fits skpatchcore's :class:`~skpatchcore.PatchCoreDetector` and anomalib's
``PatchcoreModel`` (through ``_anomalib_runner.py``) on the same data sets,
with the same backbone module and weights, image size, resize, coreset ratio
and re-weighting neighbours, and prints one markdown table: image AUROC,
pixel AUROC, AUPRO, fit seconds, predict milliseconds per image and peak
memory of each (data set, method) run. ``--backbone`` and ``--geometry``
choose the backbone (or an ensemble of the three EfficientNet-Lite ones,
skpatchcore only) and how images become model inputs; ``ablation.py`` runs
this script's workers over a grid of them.

Every run happens in its own child process, so that its peak resident memory
is that child's own (``os.wait4``); anomalib runs under a separate
interpreter (``--anomalib-python``) where anomalib is installed. See
``benchmarks/README.rst`` for the set-up and for what exactly is timed.

Usage, from the repository root::

    python benchmarks/quality.py
    python benchmarks/quality.py --train-size 10 --n-test 10   # plumbing check
"""

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from _common import (
    ANOMALIB_PYTHON,
    DATASETS,
    add_folder_options,
    anomalib_status,
    command_line,
    dataset_notes,
    load_dataset,
    markdown_table,
    peak_rss_mib,
    print_run_facts,
    run_child,
    split_choices,
)

# The input sizes each EfficientNet-Lite's weights were trained at:
# (image_size, resize) of the paper's resize-then-crop.
NATIVE_SIZES = {
    "efficientnet_lite0": (224, 256),
    "efficientnet_lite1": (240, 274),
    "efficientnet_lite2": (260, 297),
}
ENSEMBLE = "ensemble"
BACKBONES = (*NATIVE_SIZES, ENSEMBLE)
GEOMETRIES = {
    "crop": "shorter side resized, centre square cropped",
    "squash": "whole image resized to a square",
    "keep_aspect": "shorter side resized, longer in proportion, no crop",
}
METHODS = ("skpatchcore", "anomalib")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_folder_options(parser)
    parser.add_argument(
        "--datasets",
        default=",".join(DATASETS),
        help=f"comma-separated subset of {', '.join(DATASETS)}",
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated subset of {', '.join(METHODS)}",
    )
    parser.add_argument(
        "--train-size",
        type=int,
        default=100,
        help="normal ELPV cells to train on (MPDD and KolektorSDD are used "
        "whole unless --folder-subset)",
    )
    parser.add_argument(
        "--n-test",
        type=int,
        default=50,
        help="ELPV test cells of each class, normal and defective (at most)",
    )
    parser.add_argument(
        "--backbone",
        choices=BACKBONES,
        default="efficientnet_lite0",
        help=f"'{ENSEMBLE}': a PatchCoreEnsemble of the three EfficientNet-Lite "
        "backbones (skpatchcore only)",
    )
    parser.add_argument(
        "--geometry",
        choices=GEOMETRIES,
        default="crop",
        help="model input of each image, at the backbone's native size: "
        + "; ".join(f"{name}: {text}" for name, text in GEOMETRIES.items()),
    )
    parser.add_argument(
        "--image-size",
        type=int,
        help="input size of every backbone instead of its native one: the "
        "crop's side (resize in the native proportion), the square's side or "
        "the shorter side",
    )
    parser.add_argument(
        "--layers",
        type=lambda text: tuple(name for name in text.split(",") if name),
        help="comma-separated layers to tap instead of the backbone's default "
        "(one backbone only)",
    )
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument(
        "--distance",
        choices=("euclidean", "cosine"),
        default="euclidean",
        help="skpatchcore's distance option (anomalib rows stay Euclidean)",
    )
    parser.add_argument(
        "--image-score",
        default="reweighted",
        help="skpatchcore's image_score: reweighted, max, or a fraction in (0, 1]",
    )
    parser.add_argument("--num-neighbors", type=int, default=9)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="random_state of skpatchcore, torch/numpy seed of anomalib, and the "
        "ELPV split",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="prediction passes over the test set; the median time is reported",
    )
    parser.add_argument(
        "--anomalib-python",
        default=ANOMALIB_PYTHON,
        help="interpreter with anomalib installed (rows skipped when unusable)",
    )
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.datasets = split_choices(parser, "--datasets", args.datasets, DATASETS)
    args.methods = split_choices(parser, "--methods", args.methods, METHODS)
    for name in ("train_size", "n_test", "repeat", "batch_size", "num_neighbors"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < args.coreset_ratio <= 1:
        parser.error("--coreset-ratio must be in (0, 1]")
    if args.layers and args.backbone == ENSEMBLE:
        parser.error("--layers names the layers of one backbone, not of an ensemble")
    if args.image_size is not None and args.image_size < 1:
        parser.error("--image-size must be at least 1")
    if args.image_score not in ("reweighted", "max"):
        try:
            args.image_score = float(args.image_score)
        except ValueError:
            parser.error("--image-score must be reweighted, max or a number")
    return args


def input_settings(backbone, geometry, image_size=None):
    """``image_size`` and ``resize`` of a backbone in ``geometry``.

    At the backbone's native size, or at ``image_size`` (the crop's side,
    the square's side or the shorter side) with the crop's resize in the
    native proportion.
    """
    native_size, resize = NATIVE_SIZES[backbone]
    if image_size is None:
        image_size = native_size
    else:
        resize = round(resize * image_size / native_size)
    if geometry == "squash":
        resize = None
    elif geometry == "keep_aspect":
        resize = "keep_aspect"
    return {"image_size": image_size, "resize": resize}


def make_detector(args):
    """The skpatchcore estimator of ``args.backbone`` and ``args.geometry``."""
    from skpatchcore import PatchCoreDetector, PatchCoreEnsemble

    def detector(backbone):
        return PatchCoreDetector(
            backbone=backbone,
            **input_settings(backbone, args.geometry, args.image_size),
            layers=args.layers,
            coreset_ratio=args.coreset_ratio,
            n_reweight_neighbors=args.num_neighbors,
            distance=args.distance,
            image_score=args.image_score,
            batch_size=args.batch_size,
            device="cpu",
            random_state=args.seed,
        )

    if args.backbone != ENSEMBLE:
        return detector(args.backbone)
    return PatchCoreEnsemble(
        [(name.removeprefix("efficientnet_"), detector(name)) for name in NATIVE_SIZES],
        random_state=args.seed,
    )


def _fit_predict_skpatchcore(train, test, args):
    detector = make_detector(args)
    start = time.perf_counter()
    detector.fit(train)
    fit_seconds = time.perf_counter() - start

    predict_times, score_times = [], []
    for _ in range(args.repeat):
        start = time.perf_counter()
        maps, score_samples = detector.anomaly_maps(test, return_score_samples=True)
        predict_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        detector.score_samples(test)
        score_times.append(time.perf_counter() - start)
    scores = -score_samples
    members = getattr(detector, "detectors_", [detector])
    return {
        "scores": scores,
        "maps": maps,
        "fit_seconds": fit_seconds,
        "predict_seconds": float(np.median(predict_times)),
        "score_seconds": float(np.median(score_times)),
        "memory_banks": [list(member.memory_bank_.shape) for member in members],
    }


def _size_multiple(backbone, settings):
    """Grid stride that skpatchcore rounds aspect-kept input sides to."""
    from skpatchcore import PatchFeatureExtractor

    extractor = PatchFeatureExtractor(backbone=backbone, device="cpu", **settings)
    return extractor.fit().size_multiple_


def _fit_predict_anomalib(train, test, args):
    from _anomalib_runner import fit_anomalib_patchcore, predict_anomalib_patchcore
    from _internals import input_geometry, load_backbone, to_original_geometry

    start = time.perf_counter()
    settings = input_settings(args.backbone, args.geometry, args.image_size)
    if args.geometry == "keep_aspect":
        # Input sides rounded to the backbone's grid stride, as skpatchcore
        # rounds them, so that both see the same tensors.
        settings["size_multiple"] = _size_multiple(args.backbone, settings)
    module, layers, mean, std = load_backbone(args.backbone)
    layers = args.layers or layers
    model = fit_anomalib_patchcore(
        train,
        backbone_module=module,
        layers=layers,
        mean=mean,
        std=std,
        **settings,
        coreset_ratio=args.coreset_ratio,
        num_neighbors=args.num_neighbors,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    fit_seconds = time.perf_counter() - start

    predict_times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        scores, input_maps = predict_anomalib_patchcore(
            model,
            test,
            mean=mean,
            std=std,
            **settings,
            batch_size=args.batch_size,
        )
        # Back onto the original image exactly as skpatchcore does, so that
        # both methods are scored against the same full-resolution masks.
        maps = [
            to_original_geometry(map_, input_geometry(*image.shape[:2], **settings))
            for map_, image in zip(input_maps, test)
        ]
        predict_times.append(time.perf_counter() - start)
    return {
        "scores": scores,
        "maps": maps,
        "fit_seconds": fit_seconds,
        "predict_seconds": float(np.median(predict_times)),
        "score_seconds": None,
        "memory_banks": [list(model.memory_bank.shape)],
        "feature_extractor": (
            "hooks" if hasattr(model, "fx_fallback_reason") else "torch.fx"
        ),
    }


def worker(args):
    """Fit and score one method on one data set; write the results to disk."""
    dataset, method = args.worker
    out = Path(args.worker_out)
    import torch

    if method == "anomalib":
        with warnings.catch_warnings():
            # anomalib's imports warn about deprecated timm/dinov2 modules.
            warnings.simplefilter("ignore", FutureWarning)
            import anomalib
            import anomalib.models.image.patchcore.torch_model  # noqa: F401
        version = anomalib.__version__
    else:
        import skpatchcore

        version = skpatchcore.__version__
    train, test, labels, masks = load_dataset(dataset, args)
    baseline_mib = peak_rss_mib()
    run = _fit_predict_skpatchcore if method == "skpatchcore" else _fit_predict_anomalib
    result = run(train, test, args)
    result["peak_rss_in_run_mib"] = peak_rss_mib()
    if masks is not None:
        np.savez(out / "maps.npz", *result["maps"])
    np.save(out / "scores.npy", np.asarray(result.pop("scores"), dtype=np.float64))
    del result["maps"]
    result.update(
        version=version,
        torch_threads=torch.get_num_threads(),
        baseline_rss_mib=baseline_mib,
        n_train=len(train),
        n_test=len(test),
        n_defective=int(np.sum(labels == -1)),
    )
    (out / "result.json").write_text(json.dumps(result))


def _worker_command(python, dataset, method, out, args):
    command = [
        python,
        str(Path(__file__).resolve()),
        "--worker",
        dataset,
        method,
        "--worker-out",
        str(out),
        "--mpdd",
        args.mpdd,
        "--kolektorsdd",
        args.kolektorsdd,
        "--backbone",
        args.backbone,
        "--geometry",
        args.geometry,
        "--train-size",
        str(args.train_size),
        "--n-test",
        str(args.n_test),
        "--coreset-ratio",
        str(args.coreset_ratio),
        "--num-neighbors",
        str(args.num_neighbors),
        "--distance",
        args.distance,
        "--image-score",
        str(args.image_score),
        "--batch-size",
        str(args.batch_size),
        "--seed",
        str(args.seed),
        "--repeat",
        str(args.repeat),
    ]
    if args.image_size is not None:
        command += ["--image-size", str(args.image_size)]
    if args.layers:
        command += ["--layers", ",".join(args.layers)]
    if args.folder_subset:
        command.append("--folder-subset")
    return command


def run_row(dataset, method, args, python, out, labels, masks):
    """Run one worker in a child process and score what it wrote to ``out``.

    Returns the table row and a line of details, or None and a note saying
    that the child failed.
    """
    out.mkdir()
    code, wall, peak = run_child(_worker_command(python, dataset, method, out, args))
    if code != 0:
        return None, f"failed (exit code {code})"
    result = json.loads((out / "result.json").read_text())
    row = {"dataset": dataset, "method": method, "peak_mib": peak}
    row.update(result)
    row.update(score_run(out, labels, masks))
    banks = " + ".join(f"{n:,} x {d}" for n, d in result["memory_banks"])
    detail = (
        f"{method} {result['version']}: {result['n_train']} train, "
        f"{result['n_test']} test ({result['n_defective']} defective); memory "
        f"bank {banks}; RSS after imports and data "
        f"{result['baseline_rss_mib']:.0f} MiB; {result['torch_threads']} torch "
        f"threads; child wall {wall:.0f} s"
    )
    return row, detail


def score_run(out, labels, masks):
    """Image AUROC, pixel AUROC and AUPRO of one run's saved outputs."""
    from skpatchcore.datasets import load_mask
    from skpatchcore.metrics import aupro, image_auroc, pixel_auroc

    scores = np.load(out / "scores.npy")
    metrics = {"image_auroc": image_auroc(labels, -scores)}
    if masks is None:
        metrics["pixel_auroc"] = metrics["aupro"] = None
        return metrics
    with np.load(out / "maps.npz") as saved:
        maps = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    masks = [None if mask is None else load_mask(mask) for mask in masks]
    metrics["pixel_auroc"] = pixel_auroc(masks, maps)
    metrics["aupro"] = aupro(masks, maps)
    return metrics


def _cell(value, digits):
    return "n/a" if value is None else f"{value:.{digits}f}"


METRIC_HEADERS = (
    "image AUROC",
    "pixel AUROC",
    "AUPRO",
    "fit s",
    "predict ms/img",
    "scores-only ms/img",
    "peak MiB",
)


def metric_cells(row):
    """The cells of ``METRIC_HEADERS`` for one row."""
    score_ms = row["score_seconds"]
    return [
        _cell(row["image_auroc"], 3),
        _cell(row["pixel_auroc"], 3),
        _cell(row["aupro"], 3),
        f"{row['fit_seconds']:.1f}",
        f"{1000 * row['predict_seconds'] / row['n_test']:.0f}",
        "—" if score_ms is None else f"{1000 * score_ms / row['n_test']:.0f}",
        f"{row['peak_mib']:.0f}",
    ]


def model_note(backbone, geometry, image_size=None, layers=None):
    """The backbone and input geometry, as the settings line gives them."""
    names = NATIVE_SIZES if backbone == ENSEMBLE else [backbone]
    sizes = []
    for name in names:
        settings = input_settings(name, geometry, image_size)
        if settings["resize"] is None:
            sizes.append(f"{name} squashed to {settings['image_size']} px")
        elif geometry == "keep_aspect":
            sizes.append(f"{name} shorter side {settings['image_size']} px")
        else:
            sizes.append(
                f"{name} resize {settings['resize']}, crop {settings['image_size']}"
            )
    kind = "ensemble of " if backbone == ENSEMBLE else ""
    tapped = f", layers {'+'.join(layers)}" if layers else ""
    return f"{kind}{'; '.join(sizes)} ({geometry}){tapped}, ImageNet weights"


def run_settings(args):
    """The settings line of a run of ``args``."""
    return (
        f"{model_note(args.backbone, args.geometry, args.image_size, args.layers)}"
        f", coreset_ratio "
        f"{args.coreset_ratio}, {args.num_neighbors} re-weighting neighbours, "
        f"distance {args.distance}, image score {args.image_score}, "
        f"batch size {args.batch_size}, seed {args.seed}, CPU, median of "
        f"{args.repeat} prediction passes"
    )


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    started = time.perf_counter()
    command = command_line(__file__, argv)
    datasets, notes = dataset_notes(args.datasets, args)
    methods = list(args.methods)
    if "anomalib" in methods:
        problem = anomalib_status(args.anomalib_python)
        if problem is not None:
            methods.remove("anomalib")
            notes.append(f"anomalib rows skipped: {problem}.")
    if "anomalib" in methods and args.backbone == ENSEMBLE:
        methods.remove("anomalib")
        notes.append("anomalib rows skipped: anomalib has no ensemble of backbones.")
    interpreters = {"skpatchcore": sys.executable, "anomalib": args.anomalib_python}

    rows, details = [], []
    with tempfile.TemporaryDirectory(prefix="skpatchcore-quality-") as tmp:
        for dataset in datasets:
            _, _, labels, masks = load_dataset(dataset, args, lazy=True)
            for method in methods:
                print(f"[quality] {DATASETS[dataset]} / {method} ...", flush=True)
                out = Path(tmp) / f"{dataset}-{method}"
                row, line = run_row(
                    dataset, method, args, interpreters[method], out, labels, masks
                )
                if row is None:
                    notes.append(f"{DATASETS[dataset]} / {method} {line}.")
                    continue
                rows.append(row)
                details.append(f"{DATASETS[dataset]} / {line}")

    print_run_facts(command, run_settings(args))
    print()
    headers = ("data set", "method", *METRIC_HEADERS)
    print(
        markdown_table(
            headers,
            [[DATASETS[r["dataset"]], r["method"], *metric_cells(r)] for r in rows],
        )
    )
    print()
    for line in details + notes:
        print(f"- {line}")
    print()
    print(f"Total run time: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
