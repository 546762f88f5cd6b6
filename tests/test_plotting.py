import sys

import numpy as np
import pytest
from PIL import Image

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from conftest import FAST_PARAMS  # noqa: E402
from matplotlib.contour import ContourSet  # noqa: E402

from skpatchcore import PatchCoreDetector  # noqa: E402
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

    # Four image axes, then the colorbar's.
    assert len(fig.axes) == 5
    top, bottom = fig.axes[:2], fig.axes[2:4]
    # Good images with the highest anomaly scores, -scores: #1 (0.3), then
    # #3 (-0.1).
    assert [ax.get_title().split("\n")[0] for ax in top] == ["good #1", "good #3"]
    # Defective images with the lowest anomaly scores: #6 (-0.5), then #4
    # (-0.2).
    assert [ax.get_title().split("\n")[0] for ax in bottom] == [
        "defective #6",
        "defective #4",
    ]
    # Only image #4 among those shown has a mask.
    assert [len(_contours(ax)) for ax in fig.axes[:4]] == [0, 0, 0, 1]


def test_plot_extremes_short_row(scored_images):
    images, labels, scores, maps, _ = scored_images
    fig = plot_extremes(images, labels, scores, maps, n=4, figsize=(8, 4))

    assert len(fig.axes) == 9
    drawn = [len(ax.images) > 0 for ax in fig.axes[:8]]
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


def _titles(fig):
    return [ax.get_title() for ax in fig.axes if ax.images]


def test_panels_say_whether_each_image_is_flagged(scored_images):
    images, labels, scores, maps, _ = scored_images
    # Anomaly scores are -scores: good #1 0.3, #3 -0.1; defective #6 -0.5,
    # #4 -0.2 (the likeliest misses) and #5 0.8. Image threshold 0:
    # good #1 is a false alarm, the others pass; #5 is the only catch.
    fig = plot_extremes(
        images, labels, scores, maps, n=2, image_threshold=0.0, threshold=0.95
    )
    assert _titles(fig)[:4] == [
        "good #1: flagged\nanomaly score 0.300 (threshold 0.00)",
        "good #3: not flagged\nanomaly score -0.100 (threshold 0.00)",
        "defective #6: not flagged\nanomaly score -0.500 (threshold 0.00)",
        "defective #4: not flagged\nanomaly score -0.200 (threshold 0.00)",
    ]
    assert fig.get_suptitle() == (
        "Likeliest false alarms (top), likeliest misses (middle), "
        "clearest catches (bottom)"
    )
    # Neither miss is flagged: the clearest catch is added, and only it, as
    # the misses are not repeated.
    assert _titles(fig)[4:] == [
        "defective #5: flagged\nanomaly score 0.800 (threshold 0.00)"
    ]
    assert len(fig.axes) == 3 * 2 + 1

    # Without an image threshold: the score alone, and two rows.
    fig = plot_extremes(images, labels, scores, maps, n=2, show_catches=False)
    assert _titles(fig)[0] == "good #1\nanomaly score 0.300"
    assert fig.get_suptitle() == (
        "Likeliest false alarms (top), likeliest misses (bottom)"
    )


def test_image_threshold_comes_from_the_detector(scored_images):
    images, labels, scores, maps, _ = scored_images
    # offset_ -0.15: score_samples below it, anomaly scores above 0.15, are
    # flagged; defective #4 (-0.2) is not, and is a miss.
    detector = _fitted_stub(image_size=8, resize=None, threshold=2.0, offset=-0.15)
    fig = plot_extremes(images, labels, scores, maps, n=2, detector=detector)
    titles = _titles(fig)
    assert titles[0] == "good #1: flagged\nanomaly score 0.300 (threshold 0.150)"
    assert (
        titles[3] == "defective #4: not flagged\nanomaly score -0.200 (threshold 0.150)"
    )
    # An explicit image_threshold wins over the detector's.
    fig = plot_extremes(
        images, labels, scores, maps, n=2, detector=detector, image_threshold=0.5
    )
    assert (
        _titles(fig)[0] == "good #1: not flagged\nanomaly score 0.300 (threshold 0.500)"
    )


def test_catches_are_added_only_when_the_misses_show_none(scored_images):
    images, labels, scores, maps, _ = scored_images
    # Image threshold -0.3: the likeliest miss #4 (-0.2) is flagged, so the
    # figure already shows a catch.
    fig = plot_extremes(images, labels, scores, maps, n=2, image_threshold=-0.3)
    assert len(fig.axes) == 2 * 2 + 1
    # Without an image threshold the pixel threshold decides: the maps of
    # the misses (values in [0, 1)) exceed 0.5 but none exceeds 1.5.
    fig = plot_extremes(images, labels, scores, maps, n=2, threshold=0.5)
    assert len(fig.axes) == 2 * 2 + 1
    fig = plot_extremes(images, labels, scores, maps, n=2, threshold=1.5)
    assert len(fig.axes) == 3 * 2 + 1
    # Asked for: the catches are shown whatever the thresholds.
    fig = plot_extremes(
        images, labels, scores, maps, n=2, image_threshold=-0.3, show_catches=True
    )
    assert len(fig.axes) == 3 * 2 + 1


def test_notes_add_a_line_per_panel(scored_images):
    images, labels, scores, maps, _ = scored_images
    notes = [f"note {i}" for i in range(len(images))]
    notes[3] = None
    fig = plot_extremes(
        images, labels, scores, maps, n=2, notes=notes, show_catches=False
    )
    assert [title.split("\n")[2:] for title in _titles(fig)] == [
        ["note 1"],
        [],
        ["note 6"],
        ["note 4"],
    ]
    with pytest.raises(ValueError, match="notes has 2 elements"):
        plot_extremes(images, labels, scores, maps, notes=notes[:2])


def test_panels_show_the_detectors_p_values(scored_images):
    images, labels, scores, maps, _ = scored_images
    detector = _fitted_stub(image_size=8, resize=None, threshold=2.0, offset=-0.15)
    detector.calibration_scores_ = np.array([-0.5, -0.2, 0.0, 0.3])
    fig = plot_extremes(
        images, labels, scores, maps, n=2, detector=detector, show_catches=False
    )
    # score_samples of good #1 (-0.3), good #3 (0.1), defective #6 (0.5) and
    # #4 (0.2): (1 + calibration scores at most each) / (4 + 1).
    assert [title.split("\n")[2] for title in _titles(fig)] == [
        "p-value 0.4",
        "p-value 0.8",
        "p-value 1",
        "p-value 0.8",
    ]
    # decision_function scores (an image_threshold given) are on another
    # scale, and explicit notes win: no p-values then.
    fig = plot_extremes(
        images, labels, scores, maps, n=2, detector=detector, image_threshold=0.0
    )
    assert all(title.count("\n") == 1 for title in _titles(fig))


def test_missing_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r'pip install "skpatchcore\[plot\]"'):
        plot_anomaly_map(np.zeros((4, 4)), np.zeros((4, 4)))


def _fitted_stub(image_size, resize, threshold=0.5, offset=-0.5):
    """A detector whose fitted state is set by hand.

    Plotting reads only ``pixel_threshold_``, ``offset_`` and the resize /
    crop parameters; a real fit would cost seconds and test nothing more here.
    """
    detector = PatchCoreDetector(image_size=image_size, resize=resize)
    detector.pixel_threshold_ = threshold
    detector.offset_ = offset
    detector._fitted_params = detector.get_params(deep=False)
    return detector


def _map_artists(fig):
    """The anomaly-map image of every axes that shows one."""
    return [ax.images[-1] for ax in fig.axes if len(ax.images) == 2]


def _colorbars(fig):
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def _legend_labels(fig):
    legends = [ax.get_legend() for ax in fig.axes] + list(fig.legends)
    return [t.get_text() for lg in legends if lg is not None for t in lg.get_texts()]


def _band_patches(ax):
    return [p for p in ax.patches if "not seen" in p.get_label()]


@pytest.mark.parametrize("threshold", [None, 0.5, 1.5])
def test_plot_extremes_shares_one_colour_scale(scored_images, threshold):
    images, labels, scores, maps, _ = scored_images
    fig = plot_extremes(
        images, labels, scores, maps, n=2, threshold=threshold, show_catches=False
    )

    # Shown: good #1, #3 and defective #6, #4 (see the test above). Their
    # maps have different ranges, so one scale per map would differ.
    shown = [maps[i] for i in (1, 3, 6, 4)]
    assert len({(m.min(), m.max()) for m in shown}) == 4
    low = min(m.min() for m in shown)
    high = max(m.max() for m in shown)
    if threshold is not None:
        low, high = min(low, threshold), max(high, threshold)
    artists = _map_artists(fig)
    assert len(artists) == 4
    for artist in artists:
        assert artist.get_clim() == pytest.approx((low, high))
        assert artist.cmap == artists[0].cmap


def test_threshold_splits_the_colours_into_calm_and_hot():
    anomaly_map = np.tile(np.linspace(0.0, 2.0, 41), (10, 1))
    ax = plot_anomaly_map(np.zeros((10, 41)), anomaly_map, threshold=0.5)
    artist = ax.images[-1]
    assert artist.get_clim() == (0.0, 2.0)
    below = artist.to_rgba(np.array([0.0, 0.25, 0.48]))
    above = artist.to_rgba(np.array([0.52, 1.0, 2.0]))
    # Below the threshold: faint (mostly transparent); above: opaque colours.
    assert np.all(below[:, 3] <= 0.4)
    assert np.all(above[:, 3] == 1.0)

    # Without a threshold the whole range is one colormap, opaque throughout.
    ax = plot_anomaly_map(np.zeros((10, 41)), anomaly_map)
    assert np.all(ax.images[-1].to_rgba(np.array([0.0, 0.25, 0.48]))[:, 3] == 1.0)


def test_colorbar_marks_the_threshold(scored_images):
    images, labels, scores, maps, _ = scored_images
    fig = plot_extremes(images, labels, scores, maps, n=2, threshold=0.7)
    (colorbar_ax,) = _colorbars(fig)
    assert "anomaly score" in colorbar_ax.get_ylabel()
    assert "pixel threshold 0.7" in colorbar_ax.get_ylabel()
    assert [tuple(line.get_ydata()) for line in colorbar_ax.lines] == [(0.7, 0.7)]
    assert _map_artists(fig)[0].colorbar is not None

    # Without a threshold: a colorbar, no line.
    fig = plot_extremes(images, labels, scores, maps, n=2)
    (colorbar_ax,) = _colorbars(fig)
    assert len(colorbar_ax.lines) == 0

    # One image: a colorbar on a new figure, none on given axes unless asked.
    ax = plot_anomaly_map(images[0], maps[0], threshold=0.3)
    assert len(_colorbars(ax.figure)) == 1
    _, ax = plt.subplots()
    plot_anomaly_map(images[0], maps[0], ax=ax)
    assert _colorbars(ax.figure) == []
    plot_anomaly_map(images[0], maps[0], ax=ax, colorbar=True)
    assert len(_colorbars(ax.figure)) == 1


def test_legend_names_the_outlines(scored_images):
    images, labels, scores, maps, masks = scored_images
    fig = plot_extremes(images, labels, scores, maps, masks=masks, n=2)
    assert _legend_labels(fig) == ["ground truth"]
    (legend,) = [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    (handle,) = legend.legend_handles
    # The legend line has the colour of the outline drawn on the image.
    (contour,) = _contours(fig.axes[3])
    assert matplotlib.colors.same_color(handle.get_color(), contour.get_edgecolor())

    # No outline drawn, no legend.
    fig = plot_extremes(images, labels, scores, maps, n=2)
    assert _legend_labels(fig) == []

    mask = _square_mask((16, 16), 2, 2, 4)
    ax = plot_anomaly_map(images[0], maps[0], mask=mask, pred_mask=mask)
    assert _legend_labels(ax.figure) == ["ground truth", "predicted mask"]


def test_unseen_band_is_masked_and_hatched():
    # 300 x 300 resized to 80 x 80, centre crop 64: the model saw the resized
    # rows and columns 8 to 72, i.e. pixels 30 to 269 of the image.
    detector = _fitted_stub(image_size=64, resize=80, threshold=0.5)
    anomaly_map = np.full((300, 300), 0.2)
    anomaly_map[:, :30] = 100.0  # an extrapolated streak in the band
    ax = plot_anomaly_map(np.zeros((300, 300)), anomaly_map, detector=detector)

    artist = ax.images[-1]
    expected = np.ones((300, 300), dtype=bool)
    expected[30:270, 30:270] = False
    np.testing.assert_array_equal(np.ma.getmaskarray(artist.get_array()), expected)
    # The streak is left out of the colour scale, the threshold is taken in.
    assert artist.get_clim() == (0.2, 0.5)
    (band,) = _band_patches(ax)
    corners = band.get_path().vertices
    assert {tuple(v) for v in corners[5:]} == {
        (29.5, 29.5),
        (29.5, 269.5),
        (269.5, 269.5),
        (269.5, 29.5),
    }
    assert "outside the crop: not seen" in _legend_labels(ax.figure)

    # The model saw everything: no mask, no band.
    ax = plot_anomaly_map(
        np.zeros((300, 300)), anomaly_map, detector=_fitted_stub(64, None)
    )
    assert not np.ma.getmaskarray(ax.images[-1].get_array()).any()
    assert _band_patches(ax) == []
    assert ax.images[-1].get_clim() == (0.2, 100.0)


def test_unseen_band_of_a_wide_image_without_upscaling():
    # resize == image_size: a 40 x 80 image becomes 64 x 128, cropped at
    # columns 32 to 96 of it, i.e. columns 20 to 59 of the image.
    ax = plot_anomaly_map(
        np.zeros((40, 80)), np.zeros((40, 80)), detector=_fitted_stub(64, 64)
    )
    expected = np.ones((40, 80), dtype=bool)
    expected[:, 20:60] = False
    np.testing.assert_array_equal(
        np.ma.getmaskarray(ax.images[-1].get_array()), expected
    )
    assert len(_band_patches(ax)) == 1


def test_unseen_band_of_a_height_and_width_crop_and_of_keep_aspect():
    # 300 x 400 resized to 80 x 106, centre 64 x 96 crop at rows 8 to 72 and
    # columns 5 to 101, i.e. rows 30 to 269 and columns 19 to 380.
    ax = plot_anomaly_map(
        np.zeros((300, 400)),
        np.zeros((300, 400)),
        detector=_fitted_stub((64, 96), 80),
    )
    expected = np.ones((300, 400), dtype=bool)
    expected[30:270, 19:381] = False
    np.testing.assert_array_equal(
        np.ma.getmaskarray(ax.images[-1].get_array()), expected
    )
    # Keep-aspect inputs are whole images: nothing is unseen.
    ax = plot_anomaly_map(
        np.zeros((300, 90)),
        np.zeros((300, 90)),
        detector=_fitted_stub(64, "keep_aspect"),
    )
    assert not np.ma.getmaskarray(ax.images[-1].get_array()).any()
    assert _band_patches(ax) == []


def test_plot_extremes_greys_out_the_band(scored_images):
    images, labels, scores, maps, _ = scored_images
    detector = _fitted_stub(image_size=8, resize=12, threshold=0.9)
    fig = plot_extremes(images, labels, scores, maps, n=2, detector=detector)
    assert all(len(_band_patches(ax)) == 1 for ax in fig.axes[:4])
    assert "outside the crop: not seen" in _legend_labels(fig)
    # pixel_threshold_ is the default threshold.
    (colorbar_ax,) = _colorbars(fig)
    assert [tuple(line.get_ydata()) for line in colorbar_ax.lines] == [(0.9, 0.9)]


def test_unseen_band_is_where_the_detector_extrapolates(elpv_small):
    # A real map: outside the crop, the detector repeats the crop's edge.
    params = dict(FAST_PARAMS, resize=80)
    detector = PatchCoreDetector(**params).fit(elpv_small.train_images[:3])
    image = elpv_small.test_images[-1]
    (anomaly_map,) = detector.anomaly_maps([image])
    ax = plot_anomaly_map(image, anomaly_map, detector=detector)
    unseen = np.ma.getmaskarray(ax.images[-1].get_array())

    # Every row of the top band equals the first row, every column of the
    # left band the first column.
    first_half = np.arange(300) < 150
    top_rows = np.flatnonzero(unseen.all(axis=1) & first_half)
    left_columns = np.flatnonzero(unseen.all(axis=0) & first_half)
    assert top_rows.size > 0 and left_columns.size > 0
    for row in top_rows:
        np.testing.assert_allclose(anomaly_map[row], anomaly_map[0], rtol=1e-5)
    for column in left_columns:
        np.testing.assert_allclose(anomaly_map[:, column], anomaly_map[:, 0], rtol=1e-5)
    # The first seen row and column already differ from the band's.
    first_row = top_rows[-1] + 1
    first_column = left_columns[-1] + 1
    assert not unseen[first_row, 150] and not unseen[150, first_column]
    assert not np.allclose(anomaly_map[first_row + 2], anomaly_map[0], rtol=1e-5)
    assert not np.allclose(
        anomaly_map[:, first_column + 2], anomaly_map[:, 0], rtol=1e-5
    )


def test_detector_must_be_fitted_and_unchanged():
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        plot_anomaly_map(
            np.zeros((8, 8)), np.zeros((8, 8)), detector=PatchCoreDetector()
        )
    detector = _fitted_stub(64, 80).set_params(resize=96)
    with pytest.raises(ValueError, match="Cannot plot: .*resize=80 at fit"):
        plot_anomaly_map(np.zeros((8, 8)), np.zeros((8, 8)), detector=detector)
    with pytest.raises(ValueError, match="'detector' parameter"):
        plot_anomaly_map(np.zeros((8, 8)), np.zeros((8, 8)), detector="model")
