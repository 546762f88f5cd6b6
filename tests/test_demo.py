"""The demo behind the README's first command, on tiny images."""

from types import SimpleNamespace

import numpy as np
from conftest import odd_one_out_images, tiny_detector

from skpatchcore import demo


def test_run_reports_saves_and_fits_the_whole_image(tmp_path, monkeypatch, capsys):
    # Fast: the demo's own steps, with a 1x1-convolution backbone in place of
    # EfficientNet-Lite0 and eight 8 x 8 images in place of the solar cells.
    asked = {}

    def detector(**params):
        asked.update(params)
        kept = ("coreset_ratio", "random_state", "resize")
        return tiny_detector(**{name: params[name] for name in kept})

    monkeypatch.setattr(demo, "PatchCoreDetector", detector)
    train, odd = odd_one_out_images()
    moved = np.roll(odd[1], (3, -4), axis=(0, 1))
    mask = np.zeros((8, 8), bool)
    mask[2:4, 5:7] = True
    data = SimpleNamespace(
        train_images=list(train),
        test_images=[odd[0], train[0] * 0.98 + 0.01, odd[1], moved],
        test_labels=np.array([1, 1, -1, -1]),
        test_masks=[None, None, mask, np.roll(mask, (3, -4), axis=(0, 1))],
    )
    demo.run("tiny", data, tmp_path, coreset_ratio=0.5, random_state=0)

    assert asked["resize"] is None  # as the user guide recommends
    out = capsys.readouterr().out
    assert "image AUROC: 1.0000" in out
    assert "2 of 2 defective caught" in out
    assert (tmp_path / "tiny_detector.joblib").stat().st_size > 0
    assert (tmp_path / "tiny_anomaly_maps.png").stat().st_size > 0
