import sys

import numpy as np
import pytest
from PIL import Image

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.contour import ContourSet  # noqa: E402

from skpatchcore.plotting import plot_anomaly_map, plot_extremes  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _contours(ax):
    return [artist for artist in ax.collections if isinstance(artist, ContourSet)]


def _square_mask(shape, top, left, size):
    mask = np.zeros(shape, dtype=bool)
    mask[top : top + size, left : left + size] = True
    return mask


def test_plot_anomaly_map_outlines():
    image = np.zeros((20, 30, 3), dtype=np.uint8)
    anomaly_map = np.random.RandomState(0).rand(20, 30)
    mask = _square_mask((20, 30), 5, 5, 6)
    pred_mask = _square_mask((20, 30), 6, 7, 6)

    ax = plot_anomaly_map(image, anomaly_map, mask=mask, pred_mask=pred_mask)
    assert len(ax.images) == 2
    contours = _contours(ax)
    assert len(contours) == 2
    colors = [tuple(c.get_edgecolor()[0]) for c in contours]
    assert colors[0] != colors[1]
    assert not ax.axison

    _, ax = plt.subplots()
    assert plot_anomaly_map(image, anomaly_map, ax=ax) is ax
    assert _contours(ax) == []
    assert len(ax.figure.axes) == 1


def test_plot_anomaly_map_grayscale_path_and_scale(tmp_path):
    path = tmp_path / "image.png"
    Image.fromarray(np.full((12, 8), 128, dtype=np.uint8)).save(path)
    mask_path = tmp_path / "mask.png"
    Image.fromarray(_square_mask((12, 8), 2, 2, 3).astype(np.uint8) * 255).save(
        mask_path
    )

    ax = plot_anomaly_map(path, np.zeros((12, 8)), mask=mask_path, vmin=-1, vmax=3)
    assert ax.images[0].get_cmap().name == "gray"
    assert ax.images[-1].get_clim() == (-1, 3)
    assert len(_contours(ax)) == 1


def test_plot_anomaly_map_errors():
    image = np.zeros((10, 10))
    with pytest.raises(ValueError, match=r"anomaly_map has shape \(10, 9\)"):
        plot_anomaly_map(image, np.zeros((10, 9)))
    with pytest.raises(ValueError, match="image must have shape"):
        plot_anomaly_map(np.zeros(10), np.zeros((10, 10)))
    with pytest.raises(ValueError, match="image must have shape"):
        plot_anomaly_map(np.zeros((10, 10, 2)), np.zeros((10, 10)))
    with pytest.raises(ValueError, match=r"pred_mask: .*expected \(10, 10\)"):
        plot_anomaly_map(image, np.zeros((10, 10)), pred_mask=np.zeros((5, 5)))
    with pytest.raises(ValueError, match="alpha"):
        plot_anomaly_map(image, np.zeros((10, 10)), alpha=2)


@pytest.fixture
def scored_images():
    rng = np.random.RandomState(0)
    shapes = [(16, 16), (16, 20), (12, 16), (16, 16), (20, 16), (16, 16), (16, 12)]
    images = [rng.randint(0, 255, size=shape, dtype=np.uint8) for shape in shapes]
    maps = [rng.rand(*shape) for shape in shapes]
    labels = np.array([1, 1, 1, 1, -1, -1, -1])
    scores = np.array([0.4, -0.3, 0.9, 0.1, 0.2, -0.8, 0.5])
    masks = (
        [None] * 4 + [_square_mask(shape, 2, 2, 4) for shape in shapes[4:6]] + [None]
    )
    return images, labels, scores, maps, masks


def test_plot_extremes_picks_hardest_images(scored_images):
    images, labels, scores, maps, masks = scored_images
    fig = plot_extremes(images, labels, scores, maps, masks=masks, n=2)

    assert len(fig.axes) == 4
    top, bottom = fig.axes[:2], fig.axes[2:]
    # Good images with the lowest scores: #1 (-0.3), then #3 (0.1).
    assert [ax.get_title().split("\n")[0] for ax in top] == ["good #1", "good #3"]
    # Defective images with the highest scores: #6 (0.5), then #4 (0.2).
    assert [ax.get_title().split("\n")[0] for ax in bottom] == [
        "defective #6",
        "defective #4",
    ]
    # Only image #4 among those shown has a mask.
    assert [len(_contours(ax)) for ax in fig.axes] == [0, 0, 0, 1]
    # One colour scale for all panels.
    assert len({ax.images[-1].get_clim() for ax in fig.axes}) == 1


def test_plot_extremes_short_row(scored_images):
    images, labels, scores, maps, _ = scored_images
    fig = plot_extremes(images, labels, scores, maps, n=4, figsize=(8, 4))

    assert len(fig.axes) == 8
    drawn = [len(ax.images) > 0 for ax in fig.axes]
    # 4 good images fill the top row; 3 defective ones leave one axes empty.
    assert drawn == [True] * 7 + [False]
    assert tuple(fig.get_size_inches()) == (8, 4)


def test_plot_extremes_errors(scored_images):
    images, labels, scores, maps, masks = scored_images
    with pytest.raises(ValueError, match="anomaly_maps has 6 elements"):
        plot_extremes(images, labels, scores, maps[:6])
    with pytest.raises(ValueError, match="masks has 2 elements"):
        plot_extremes(images, labels, scores, maps, masks=masks[:2])
    with pytest.raises(ValueError, match="images has 3 elements"):
        plot_extremes(images[:3], labels, scores, maps)
    with pytest.raises(ValueError, match="both labels"):
        plot_extremes(images, np.abs(labels), scores, maps)
    with pytest.raises(ValueError, match="'n' parameter"):
        plot_extremes(images, labels, scores, maps, n=0)


def test_missing_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r'pip install "skpatchcore\[plot\]"'):
        plot_anomaly_map(np.zeros((4, 4)), np.zeros((4, 4)))
