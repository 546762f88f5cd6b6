"""The demo behind the README's first command, on tiny images."""

from types import SimpleNamespace

import numpy as np
import pytest
from conftest import odd_one_out_images, tiny_detector

from skpatchcore import demo


@pytest.fixture
def no_elpv(monkeypatch):
    """Make the ELPV part fail loudly if the demo reaches it."""

    def load_elpv(*args, **kwargs):
        raise AssertionError("the ELPV part ran before --mvtec was checked")

    monkeypatch.setattr(demo, "load_elpv", load_elpv)


def test_a_missing_mvtec_folder_fails_before_the_elpv_part(tmp_path, no_elpv, capsys):
    missing = tmp_path / "nope"
    with pytest.raises(SystemExit) as info:
        demo.main(["--mvtec", str(missing), "--output", str(tmp_path / "out")])
    assert info.value.code == 2
    error = capsys.readouterr().err
    assert "--mvtec" in error and str(missing) in error and "does not exist" in error


def test_a_sub_folder_of_a_category_names_the_category(tmp_path, no_elpv, capsys):
    category = tmp_path / "bottle"
    (category / "train" / "good").mkdir(parents=True)
    (category / "test").mkdir()
    with pytest.raises(SystemExit):
        demo.main(["--mvtec", str(category / "train" / "good")])
    assert "pass the category folder" in capsys.readouterr().err


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
