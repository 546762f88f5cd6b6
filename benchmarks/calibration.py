"""Realized false-alarm rates of conformal p-values and of a float contamination.

On each data set, the good images (training and test together) are split at
random into training and test images ``--splits`` times, the training set
keeping its usual size; the defective test images are always tested. Each
split is fitted twice with Lite0: leave-one-image-out calibration (the
default) and ``calibration_holdout=--holdout`` (calibration images kept out
of the memory bank). For each ``alpha`` of ``--alphas``:

- image level: a good test image is a false alarm when its p-value
  (``pvalues``) is at most ``alpha``; ``predict`` with
  ``contamination=alpha`` flags the images whose ``score_samples`` fall
  below the ``offset_`` that ``fit`` sets for it (the same thresholds
  function, applied to ``calibration_scores_``), and the script counts the
  test images on which the two decisions differ (it should be none);
- pixel level: a good test image is a false alarm when any pixel of its map
  exceeds the ``pixel_threshold_`` that ``contamination=alpha`` sets; a
  defective image is caught when a pixel inside its ground-truth mask does
  (data sets with masks only).

Every image (and mask) is read once and resized to ``--side`` pixels on its
shorter side before the splits, the size the detector's own ``resize=256``
gives it: each split then decodes and maps images of that size, which cuts
the run's time several-fold (MPDD's images are 1024 x 1024), and the maps
and masks are compared at that size.

The patch features of an image do not depend on the split, so each image's
are computed once and served again to every later fit and prediction (the
engine's ``batches`` is wrapped for the run; a cache miss runs the backbone
as usual). The backbone then sees each image in one batch composition only,
which fixes the float32 rounding that batch composition moves (by a relative
1e-5 at most, see ``batch_size``).

The tables give the rate that good images exchangeable with the
calibration images would have (``floor(alpha (n + 1)) / (n + 1)``, the
guarantee's own finite-sample value), the mean over splits and its standard
error (standard deviation over splits / sqrt(splits)), and the share of
defective images caught. A second table gives the cost of holding images
out of the bank: image AUROC, bank size and fit time.

Usage, from the repository root::

    python benchmarks/calibration.py
    python benchmarks/calibration.py --datasets mpdd_metal_plate,elpv_mono --splits 5
    python benchmarks/calibration.py --datasets mpdd_metal_plate --folder-subset \\
        --train-size 4 --n-test 2 --splits 2   # plumbing check
    # Data sets run apart (in parallel), then one table:
    python benchmarks/calibration.py --datasets elpv_mono --save mono.json
    python benchmarks/calibration.py --datasets elpv_poly --save poly.json
    python benchmarks/calibration.py --report mono.json,poly.json
"""

import argparse
import json
import sys
import time
import warnings

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
DEFAULT_DATASETS = ("mpdd_metal_plate", "kolektorsdd", "elpv_mono", "elpv_poly")
MODES = ("leave-one-out", "held-out")


def _holdout(text):
    value = float(text)
    if value >= 1 and value == int(value):
        return int(value)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError("a fraction in (0, 1) or a count >= 1")
    return value


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
    parser.add_argument("--splits", type=int, default=20, help="random splits")
    parser.add_argument(
        "--alphas", default="0.01,0.05,0.1", help="comma-separated false-alarm rates"
    )
    parser.add_argument(
        "--holdout",
        type=_holdout,
        default=0.5,
        help="calibration_holdout of the held-out fits: a fraction or a count",
    )
    add_split_options(parser)
    parser.add_argument(
        "--seed", type=int, default=0, help="first split's seed and the ELPV split"
    )
    parser.add_argument(
        "--side",
        type=int,
        default=256,
        help="shorter side images and masks are resized to once (0: as stored)",
    )
    parser.add_argument(
        "--save",
        default=None,
        help="write the results to this JSON file (again after every split)",
    )
    parser.add_argument(
        "--figure",
        default=None,
        help="also save a reliability figure (one panel per data set) to this file",
    )
    parser.add_argument(
        "--report",
        default=None,
        help="comma-separated JSON files of --save: print their tables, fit nothing",
    )
    args = parser.parse_args(argv)
    args.datasets = split_choices(
        parser, "--datasets", args.datasets, DEFAULT_DATASETS
    )
    args.report = args.report and [p for p in args.report.split(",") if p.strip()]
    try:
        args.alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
    except ValueError:
        parser.error("--alphas takes comma-separated numbers")
    if not args.alphas or not all(0 < a <= 0.5 for a in args.alphas):
        parser.error("--alphas must lie in (0, 0.5]")
    for name in ("splits", "train_size", "n_test", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def downsized(images, masks, side):
    """Images as uint8 arrays and masks as booleans, shorter side ``side``."""
    from PIL import Image

    from skpatchcore.datasets import load_mask

    arrays, bools = [], []
    for k, source in enumerate(images):
        with Image.open(source) as image:
            image = image.convert("RGB")
            scale = side / min(image.size) if side else 1.0
            size = tuple(max(1, round(n * scale)) for n in image.size)
            arrays.append(np.asarray(image.resize(size, Image.BILINEAR)))
        mask = None if masks is None else masks[k]
        if mask is not None:
            mask = load_mask(mask).astype(np.uint8) * 255
            mask = Image.fromarray(mask).resize(size, Image.NEAREST)
            mask = np.asarray(mask) > 0
        bools.append(mask)
    return arrays, bools


class FeatureCache:
    """Serve each image's patch features from memory after its first pass.

    Used as a context manager, it wraps ``PatchFeatures.batches`` for every
    detector of the run, keyed by the image's bytes and the input settings.
    """

    def __init__(self):
        self.stored, self.hits, self.misses = {}, 0, 0

    def _key(self, features, source):
        import hashlib

        settings = (features.image_size, features.resize, str(features.device))
        if not isinstance(source, np.ndarray):
            # A file, read lazily: its path names it.
            return str(getattr(source, "image", source)), repr(settings)
        array = np.ascontiguousarray(source)
        digest = hashlib.blake2b(array.tobytes(), digest_size=16).hexdigest()
        return digest, array.shape, str(array.dtype), repr(settings)

    def __enter__(self):
        from _internals import FeatureBatch, PatchFeatures

        cache, original = self, PatchFeatures.batches
        self._restore = (PatchFeatures, original)

        def batches(features, sources, batch_size):
            for start in range(0, len(sources), batch_size):
                part = sources[start : start + batch_size]
                keys = [cache._key(features, source) for source in part]
                missing = {}
                for key, source in zip(keys, part):
                    if key not in cache.stored:
                        missing.setdefault(key, source)
                cache.misses += len(missing)
                cache.hits += len(keys) - len(missing)
                if missing:
                    fresh = original(features, list(missing.values()), len(missing))
                    for batch in fresh:
                        for key, grid, geometry in zip(
                            missing, batch.grids(), batch.geometries
                        ):
                            rows = grid.reshape(-1, grid.shape[-1]).copy()
                            cache.stored[key] = (rows, grid.shape[:2], geometry)
                yield FeatureBatch(
                    np.concatenate([cache.stored[key][0] for key in keys]),
                    tuple(cache.stored[key][1] for key in keys),
                    tuple(cache.stored[key][2] for key in keys),
                )

        PatchFeatures.batches = batches
        return self

    def __exit__(self, *exc):
        owner, original = self._restore
        owner.batches = original
        self.stored.clear()


def test_values(detector, test, masks, batch_size):
    """``score_samples``, largest map value and largest value inside the
    ground-truth mask (None without masks) of every test image."""
    from skpatchcore.datasets import load_mask

    scores, maxima, in_mask = [], [], []
    for start in range(0, len(test), batch_size):
        batch = slice(start, start + batch_size)
        maps, batch_scores = detector.anomaly_maps(
            test[batch], return_score_samples=True
        )
        scores.append(batch_scores)
        for k, anomaly_map in enumerate(maps):
            maxima.append(float(anomaly_map.max()))
            mask = None if masks is None else masks[start + k]
            if mask is not None:
                mask = load_mask(mask, anomaly_map.shape)
                inside = anomaly_map[mask]
                in_mask.append(float(inside.max()) if inside.size else -np.inf)
            else:
                in_mask.append(np.nan)
    return np.concatenate(scores), np.array(maxima), np.array(in_mask)


def run_split(train, test, masks, labels, holdout, seed, args):
    """One fit and one pass over the test images: the rates at every alpha."""
    from _internals import conformal_pvalues, thresholds
    from sklearn.metrics import roc_auc_score

    from skpatchcore import PatchCoreDetector

    detector = PatchCoreDetector(
        backbone=BACKBONE,
        coreset_ratio=args.coreset_ratio,
        calibration_holdout=holdout,
        batch_size=args.batch_size,
        device="cpu",
        random_state=seed,
    )
    start = time.perf_counter()
    detector.fit(train)
    fit_seconds = time.perf_counter() - start
    scores, maxima, in_mask = test_values(detector, test, masks, args.batch_size)
    good, defective = labels == 1, labels == -1
    p = conformal_pvalues(detector.calibration_scores_, scores)
    result = {
        "n_calibration": int(detector.n_calibration_images_),
        "bank": len(detector.memory_bank_),
        "fit_s": fit_seconds,
        "auroc": float(roc_auc_score(labels, scores)),
        "good_pvalues": p[good].tolist(),
        "alphas": {},
    }
    for alpha in args.alphas:
        with warnings.catch_warnings():
            # Below 1 / (n + 1) nothing is flagged: the rate shows it.
            warnings.simplefilter("ignore", UserWarning)
            offset, pixel_threshold = thresholds(
                detector.calibration_scores_, detector.calibration_map_maxima_, alpha
            )
        flagged = p <= alpha
        predicted = scores < offset
        pixel_flagged = maxima > pixel_threshold
        result["alphas"][f"{alpha:g}"] = {
            "image_false_alarms": float(flagged[good].mean()),
            "image_caught": float(flagged[defective].mean()),
            "disagreements": int(np.sum(flagged != predicted)),
            "pixel_false_alarms": float(pixel_flagged[good].mean()),
            "pixel_caught": (
                float(np.mean(in_mask[defective] > pixel_threshold))
                if masks is not None
                else None
            ),
        }
    return result


def _exchangeable_rate(alpha, n):
    """False-alarm rate of good images exchangeable with ``n`` calibration
    images: the share of the ``n + 1`` equally likely ranks flagged."""
    return sum((1 + k) / (n + 1) <= alpha for k in range(n + 1)) / (n + 1)


def _mean_se(values):
    values = np.asarray(values, dtype=float)
    se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else np.nan
    return f"{values.mean():.3f} ± {se:.3f}"


def _save(path, command, settings, results, notes):
    if path:
        with open(path, "w") as file:
            json.dump(
                {
                    "command": command,
                    "settings": settings,
                    "results": results,
                    "notes": notes,
                },
                file,
            )


def run(args, command, settings):
    """Fit and test every split of every data set; the results and notes."""
    datasets, notes = dataset_notes(args.datasets, args)
    results = {}

    def save():
        # After every split too, so that a run cut short still reports.
        _save(args.save, command, settings, results, notes)

    for name in datasets:
        train, test, labels, masks = load_dataset(name, args, lazy=True)
        train, _ = downsized(train, None, args.side)
        test, test_masks = downsized(test, masks, args.side)
        good = labels == 1
        pool = list(train) + [image for image, g in zip(test, good) if g]
        defects = [image for image, g in zip(test, good) if not g]
        defect_masks = None
        if masks is not None:
            defect_masks = [mask for mask, g in zip(test_masks, good) if not g]
        results[name] = {mode: [] for mode in MODES}
        with FeatureCache() as cache:
            for split in range(args.splits):
                run_split_pair(
                    name, split, pool, len(train), defects, defect_masks, results, args
                )
                save()
        notes.append(
            f"{DATASETS[name]}: {len(train)} training images and "
            f"{len(pool) - len(train)} good test images per split, "
            f"{len(defects)} defective test images; backbone passes "
            f"{cache.misses}, features served again {cache.hits}."
        )
        save()
    return results, notes


def run_split_pair(name, split, pool, n_train, defects, defect_masks, results, args):
    """Split ``split`` of one data set, fitted with both calibrations."""
    order = np.random.RandomState(args.seed + split).permutation(len(pool))
    n_good = len(pool) - n_train
    test = [pool[i] for i in order[n_train:]] + defects
    labels = np.r_[np.ones(n_good, int), -np.ones(len(defects), int)]
    masks = None if defect_masks is None else [None] * n_good + defect_masks
    for mode, holdout in zip(MODES, (None, args.holdout)):
        print(
            f"[calibration] {DATASETS[name]} split {split + 1}/{args.splits} "
            f"{mode} ...",
            flush=True,
        )
        train = [pool[i] for i in order[:n_train]]
        results[name][mode].append(
            run_split(train, test, masks, labels, holdout, args.seed + split, args)
        )


def print_tables(results, alphas):
    """The two markdown tables, over the splits that each data set has."""
    print()
    print(
        "False alarms on good test images (mean ± standard error over splits) "
        "and defective test images caught, at each alpha"
    )
    print()
    header = [
        "data set",
        "calibration",
        "splits",
        "alpha",
        "exchangeable rate",
        "image false alarms",
        "image defects caught",
        "pixel false alarms",
        "pixel defects caught",
    ]
    rows, disagreements = [], 0
    for name, by_mode in results.items():
        for mode, splits in by_mode.items():
            for alpha in alphas:
                cells = [split["alphas"][f"{alpha:g}"] for split in splits]
                if not cells:
                    continue
                disagreements += sum(c["disagreements"] for c in cells)
                caught = [c["pixel_caught"] for c in cells]
                rows.append(
                    [
                        DATASETS[name],
                        mode,
                        str(len(splits)),
                        f"{alpha:g}",
                        f"{_exchangeable_rate(alpha, splits[0]['n_calibration']):.3f}",
                        _mean_se([c["image_false_alarms"] for c in cells]),
                        _mean_se([c["image_caught"] for c in cells]),
                        _mean_se([c["pixel_false_alarms"] for c in cells]),
                        "—" if caught[0] is None else _mean_se(caught),
                    ]
                )
    print(markdown_table(header, rows, align="llrlrrrrr"))
    print()
    print("What holding calibration images out of the bank costs")
    print()
    header = [
        "data set",
        "calibration",
        "calibration images",
        "bank",
        "image AUROC",
        "fit s",
    ]
    rows = []
    for name, by_mode in results.items():
        for mode, splits in by_mode.items():
            if not splits:
                continue
            rows.append(
                [
                    DATASETS[name],
                    mode,
                    str(splits[0]["n_calibration"]),
                    str(splits[0]["bank"]),
                    _mean_se([s["auroc"] for s in splits]),
                    f"{np.mean([s['fit_s'] for s in splits]):.0f}",
                ]
            )
    print(markdown_table(header, rows, align="llrrrr"))
    print()
    return disagreements


def save_reliability_figure(results, path):
    """Realized against nominal false-alarm rate, one panel per data set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from skpatchcore.plotting import plot_reliability

    fig, axes = plt.subplots(
        1, len(results), figsize=(4 * len(results), 4), squeeze=False
    )
    for ax, (dataset, modes) in zip(axes[0], results.items()):
        for mode, splits in modes.items():
            plot_reliability(
                [split["good_pvalues"] for split in splits],
                alphas=np.linspace(0, 0.2, 81),
                ax=ax,
                label=f"{mode} (n = {splits[0]['n_calibration']})",
            )
        ax.set_title(dataset)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    command = command_line(__file__, argv)
    settings = (
        f"backbone {BACKBONE} (ImageNet weights), coreset_ratio "
        f"{args.coreset_ratio}, held-out fits with calibration_holdout="
        f"{args.holdout}, other parameters default, images resized once to "
        f"{args.side} pixels on the shorter side, split k drawn with seed "
        f"{args.seed} + k, CPU; ELPV {args.train_size} training cells, "
        f"{args.n_test} good and {args.n_test} defective test cells before "
        "resplitting"
    )
    if args.report:
        results, notes, commands = {}, [], []
        for path in args.report:
            with open(path) as file:
                saved = json.load(file)
            results.update(saved["results"])
            notes += saved["notes"]
            commands.append(saved["command"])
            settings = saved["settings"]
        command = "; ".join([*commands, command])
    else:
        results, notes = run(args, command, settings)
    print_run_facts(command, settings)
    disagreements = print_tables(results, args.alphas)
    notes.append(
        "predict with contamination=alpha and pvalues <= alpha disagreed on "
        f"{disagreements} test images over all splits and alphas."
    )
    for line in notes:
        print(f"- {line}")
    print()
    if args.figure:
        save_reliability_figure(results, args.figure)
        print(f"Reliability figure: {args.figure}")
    print(f"Total run time: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
