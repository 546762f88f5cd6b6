"""Record, or recompute, the outputs that a restructuring must not change.

Run from the repository root to write ``tests/recorded/outputs.npz``::

    python tests/recorded/record_outputs.py

``tests/test_recorded_outputs.py`` recomputes every case with the code under
test and compares. Only the public API is used, so the same cases run on any
version of the package. The cases need the shared MPDD and KolektorSDD
folders beside the repository.

Each case fits on a few real images with small inputs, so that the whole
set takes seconds: scores, maps (every ``MAP_STEP``-th pixel), the memory
bank (in full where it is small, else per-row sums and norms), the fitted
thresholds and held-out calibration scores.
"""

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"
OUTPUT = Path(__file__).with_name("outputs.npz")

# Maps are compared on a regular subgrid of their pixels.
MAP_STEP = 8


def _files(category, split, n):
    return sorted((DATA / category / split).glob("*.png"))[:n]


def _mpdd_test():
    good = _files("mpdd_metal_plate", "test/good", 2)
    defect = _files("mpdd_metal_plate", "test/defect", 2)
    return [str(p) for p in good + defect]


def _kolektor_test():
    good = _files("kolektorsdd", "test/good", 2)
    crack = _files("kolektorsdd", "test/crack", 2)
    return [str(p) for p in good + crack]


def _bank_summary(bank, full):
    bank = np.asarray(bank, dtype=np.float64)
    if full:
        return {"bank": bank.astype(np.float32)}
    return {
        "bank_row_sums": bank.sum(axis=1),
        "bank_row_norms": np.linalg.norm(bank, axis=1),
    }


def _detector_outputs(detector, test_images, full_bank):
    maps, scores = detector.anomaly_maps(test_images, return_score_samples=True)
    outputs = {
        "score_samples": scores,
        "offset": np.array(detector.offset_),
        "pixel_threshold": np.array(detector.pixel_threshold_),
        "calibration_scores": detector.calibration_scores_,
        "calibration_map_maxima": detector.calibration_map_maxima_,
        "predict": detector.predict(test_images),
    }
    for i, image_map in enumerate(maps):
        outputs[f"map{i}"] = image_map[::MAP_STEP, ::MAP_STEP]
    if hasattr(detector, "memory_bank_"):
        outputs.update(_bank_summary(detector.memory_bank_, full_bank))
    return outputs


def mpdd_lite0():
    """MPDD metal_plate, Lite0 with every other parameter at its default."""
    from skpatchcore import PatchCoreDetector

    train = [str(p) for p in _files("mpdd_metal_plate", "train/good", 6)]
    detector = PatchCoreDetector(
        "efficientnet_lite0", coreset_ratio=0.05, random_state=0
    ).fit(train)
    return _detector_outputs(detector, _mpdd_test(), full_bank=True)


def mpdd_wide_resnet():
    """MPDD metal_plate, the default WideResNet-50 with seeded random weights.

    No ImageNet weights can be downloaded here; seeded random weights still
    exercise the default layers and the channel pooling to 1,024 values.
    """
    from skpatchcore import PatchCoreDetector

    torch.manual_seed(0)
    train = [str(p) for p in _files("mpdd_metal_plate", "train/good", 4)]
    detector = PatchCoreDetector(
        weights=None, image_size=128, resize=146, coreset_ratio=0.05, random_state=0
    ).fit(train)
    return _detector_outputs(detector, _mpdd_test()[1:3], full_bank=False)


def kolektor_keep_aspect():
    """KolektorSDD's long parts at their own shape, searched by the IVF index."""
    from skpatchcore import PatchCoreDetector

    train = [str(p) for p in _files("kolektorsdd", "train/good", 6)]
    detector = PatchCoreDetector(
        "efficientnet_lite0",
        image_size=96,
        resize="keep_aspect",
        coreset_ratio=0.1,
        nn_algorithm="ivf",
        batch_size=4,
        random_state=0,
    ).fit(train)
    return _detector_outputs(detector, _kolektor_test(), full_bank=False)


def ensemble():
    """Two Lite0 detectors, one of them pooling its channels to 64 values."""
    from skpatchcore import PatchCoreDetector, PatchCoreEnsemble

    common = dict(image_size=96, resize=None, coreset_ratio=0.1)
    train = [str(p) for p in _files("mpdd_metal_plate", "train/good", 6)]
    members = [
        ("pooled", PatchCoreDetector("efficientnet_lite0", feature_dim=64, **common)),
        (
            "deep",
            PatchCoreDetector(
                "efficientnet_lite0", layers=("stage4", "stage5"), **common
            ),
        ),
    ]
    model = PatchCoreEnsemble(members, contamination=0.1, random_state=0).fit(train)
    outputs = _detector_outputs(model, _mpdd_test(), full_bank=False)
    for name, member in model.named_detectors_.items():
        for key, value in _bank_summary(member.memory_bank_, full=False).items():
            outputs[f"{name}_{key}"] = value
    outputs["score_means"] = model.score_means_
    outputs["map_means"] = model.map_means_
    return outputs


def export_inputs(side=96):
    """MPDD test images squashed to ``side`` pixels by PIL, [0, 1] RGB, NCHW."""
    images = [
        np.asarray(Image.open(p).convert("RGB").resize((side, side), Image.BILINEAR))
        for p in _mpdd_test()
    ]
    return torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2) / 255.0).float()


def export():
    """A TorchScript export's scores and maps on fixed model inputs."""
    from skpatchcore import PatchCoreDetector
    from skpatchcore.export import export_torchscript

    train = [str(p) for p in _files("mpdd_metal_plate", "train/good", 6)]
    detector = PatchCoreDetector(
        "efficientnet_lite0",
        image_size=96,
        resize=None,
        coreset_ratio=0.1,
        feature_dim=64,
        random_state=0,
    ).fit(train)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "detector.pt"
        export_torchscript(detector, path)
        module = torch.jit.load(str(path))
        with torch.no_grad():
            scores, maps = module(export_inputs())
    return {
        "score_samples": scores.numpy(),
        "maps": maps.numpy()[:, ::MAP_STEP, ::MAP_STEP],
    }


CASES = {
    "mpdd_lite0": mpdd_lite0,
    "mpdd_wide_resnet": mpdd_wide_resnet,
    "kolektor_keep_aspect": kolektor_keep_aspect,
    "ensemble": ensemble,
    "export": export,
}


def main():
    arrays = {}
    for case, compute in CASES.items():
        print(f"recording {case}", file=sys.stderr)
        for key, value in compute().items():
            arrays[f"{case}/{key}"] = np.asarray(value)
    np.savez_compressed(OUTPUT, **arrays)
    print(f"wrote {OUTPUT} ({OUTPUT.stat().st_size // 1024} KiB)", file=sys.stderr)


if __name__ == "__main__":
    main()
