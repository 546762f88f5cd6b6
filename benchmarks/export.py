"""Exported detectors against the detector itself: agreement, file size, time.

Run ``python benchmarks/export.py`` (needs ``pip install -e
".[offline,onnx]"`` and the MPDD data in ``../shared/data``). It fits an
EfficientNet-Lite0 detector at 224 x 224 pixels (``resize=None``) on MPDD
metal_plate good images, exports it to ONNX and TorchScript, and scores test
images resized to the model input with the detector, onnxruntime and
TorchScript. It prints the largest differences from the detector's
``score_samples`` and model-input maps, the file sizes and the time per
image of one run of each (after one warm-up image): timings move with the
machine's load.

Usage, from the repository root::

    python benchmarks/export.py
    python benchmarks/export.py --n-train 4 --n-test 2 --image-size 64
"""

import argparse
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from _common import MPDD_FOLDER, markdown_table, timed
from PIL import Image

from skpatchcore import PatchCoreDetector
from skpatchcore.export import export_onnx, export_torchscript


def model_inputs(paths, side):
    """Images resized to the model input, float32 (n, side, side, 3) in [0, 1]."""
    images = [
        Image.open(path).convert("RGB").resize((side, side), Image.BILINEAR)
        for path in paths
    ]
    return np.stack([np.asarray(image, dtype=np.float32) / 255 for image in images])


def main(mpdd, n_train, n_test, side):
    train = sorted((mpdd / "train" / "good").glob("*.png"))[:n_train]
    test = sorted((mpdd / "test").glob("*/*.png"))
    test = test[:: max(1, len(test) // n_test)][:n_test]
    detector = PatchCoreDetector(
        backbone="efficientnet_lite0", image_size=side, resize=None, random_state=0
    ).fit(train)
    images = model_inputs(test, side)
    (maps, scores), detector_time = timed(
        lambda: detector.anomaly_maps(images, return_score_samples=True)
    )
    maps = np.stack(maps)
    batch = np.ascontiguousarray(images.transpose(0, 3, 1, 2))

    with tempfile.TemporaryDirectory() as folder:
        onnx_path, export_time = timed(
            lambda: export_onnx(detector, Path(folder) / "detector.onnx")
        )
        script_path, script_export_time = timed(
            lambda: export_torchscript(detector, Path(folder) / "detector.pt")
        )
        session = onnxruntime.InferenceSession(
            str(onnx_path), providers=["CPUExecutionProvider"]
        )
        session.run(None, {"images": batch[:1]})
        onnx_outputs, onnx_time = timed(lambda: session.run(None, {"images": batch}))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            module = torch.jit.load(script_path)
        with torch.no_grad():
            module(torch.from_numpy(batch[:1]))
            script_outputs, script_time = timed(
                lambda: [t.numpy() for t in module(torch.from_numpy(batch))]
            )
        sizes = [onnx_path.stat().st_size / 1e6, script_path.stat().st_size / 1e6]

    n_bank, n_features = detector.memory_bank_.shape
    print(
        f"{n_train} training images, {side} x {side} pixels, a bank of "
        f"{n_bank} x {n_features} ({detector.memory_bank_.nbytes / 1e6:.2f} MB); "
        f"{len(test)} test images, score_samples {scores.min():.1f} to "
        f"{scores.max():.1f}, map values up to {maps.max():.1f}"
    )
    print()
    score_row, map_row = [], []
    for outputs in (onnx_outputs, script_outputs):
        score_row.append(f"{np.abs(outputs[0] - scores).max():.1e}")
        map_row.append(f"{np.abs(outputs[1] - maps).max():.1e}")
    rows = {
        "max abs difference, score_samples": score_row,
        "max abs difference, maps": map_row,
    }
    rows["file size (MB)"] = [f"{size:.2f}" for size in sizes]
    rows["export time (s)"] = [f"{export_time:.1f}", f"{script_export_time:.1f}"]
    # The detector itself has no file and no export: its cells stay empty.
    cell_rows = [[name, "", *values] for name, values in rows.items()]
    times = [detector_time, onnx_time, script_time]
    cell_rows.append(
        ["time per image (ms)", *(f"{1e3 * t / len(test):.0f}" for t in times)]
    )
    headers = ("", "detector", "ONNX (onnxruntime)", "TorchScript")
    print(markdown_table(headers, cell_rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mpdd", default=MPDD_FOLDER, help="MVTec-style folder of MPDD metal_plate"
    )
    parser.add_argument("--n-train", type=int, default=20)
    parser.add_argument("--n-test", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    if not Path(args.mpdd).is_dir():
        parser.error(f"no MPDD folder {args.mpdd}")
    main(Path(args.mpdd), args.n_train, args.n_test, args.image_size)
