import numpy as np
import pytest
import torch
from PIL import Image

from skpatchcore._anomaly_maps import model_input_maps, to_original_geometry
from skpatchcore._images import check_images, input_geometry, load_image, to_model_input


@pytest.mark.parametrize(
    "shape, resize, expected",
    [
        ((300, 300), 256, (256, 256, 16, 16)),
        ((200, 400), 256, (256, 512, 16, 144)),
        ((401, 300), 256, (342, 256, 59, 16)),
        ((120, 90), None, (224, 224, 0, 0)),
    ],
)
def test_geometry_by_hand(shape, resize, expected):
    g = input_geometry(*shape, image_size=224, resize=resize)
    assert (g.resized_height, g.resized_width, g.top, g.left) == expected


@pytest.mark.parametrize(
    "shape, resize",
    [((300, 300), 256), ((240, 400), 256), ((413, 301), 256), ((150, 90), None)],
)
def test_maps_come_back_to_the_right_pixels(shape, resize):
    # Send an image with a bright square through the input resize/crop, take
    # the model input itself as a "map", and bring it back: the square must
    # land where it was in the original image, with no offset.
    height, width = shape
    image = np.zeros((height, width, 3), np.float32)
    top, left = height // 3, width // 2
    image[top : top + 40, left : left + 30] = 1.0
    tensor, geometry = to_model_input(image, 224, resize)
    back = to_original_geometry(tensor[0].numpy(), geometry)
    assert back.shape == (height, width)
    rows, cols = np.nonzero(back > 0.5)
    assert abs(rows.min() - top) <= 1 and abs(rows.max() - (top + 39)) <= 1
    assert abs(cols.min() - left) <= 1 and abs(cols.max() - (left + 29)) <= 1


def test_torchvision_preprocessing_is_matched():
    from torchvision.transforms import v2

    image = np.random.default_rng(0).random((230, 310, 3)).astype(np.float32)
    ours, _ = to_model_input(image, 224, 256)
    reference = v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224)])(
        torch.from_numpy(image.transpose(2, 0, 1))
    )
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_outside_the_crop_takes_the_nearest_scored_value():
    g = input_geometry(256, 400, image_size=224, resize=256)
    input_map = np.zeros((224, 224), np.float32)
    input_map[:, 0] = 5.0
    back = to_original_geometry(input_map, g)
    # Everything left of the crop window copies the window's first column.
    assert np.allclose(back[:, : g.left], 5.0)


def test_gaussian_smoothing_by_hand():
    from scipy.ndimage import gaussian_filter

    grid = np.zeros((1, 4, 4), np.float32)
    grid[0, 1, 2] = 1.0
    smoothed = model_input_maps(grid, 32, sigma=4)
    unsmoothed = model_input_maps(grid, 32, sigma=0)
    np.testing.assert_allclose(
        smoothed[0], gaussian_filter(unsmoothed[0], 4, mode="reflect"), atol=1e-6
    )
    # Bilinear upsampling of a 4x4 grid to 32x32 (align_corners=False): the
    # centre of cell (1, 2) sits at pixel (11.5, 19.5).
    row, col = np.unravel_index(unsmoothed[0].argmax(), (32, 32))
    assert row in (11, 12) and col in (19, 20)


def test_loading_conversions(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    loaded = load_image(gray)
    assert loaded.shape == (3, 4, 3) and loaded.dtype == np.float32
    np.testing.assert_allclose(loaded[..., 1], gray / 255.0)
    rgba = np.dstack([gray, gray, gray, np.zeros_like(gray)])
    np.testing.assert_array_equal(load_image(rgba), loaded)
    path = tmp_path / "g16.png"
    Image.fromarray(gray.astype(np.uint16) * 257).save(path)
    np.testing.assert_allclose(load_image(check_images([path])[0]), loaded, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 8, 8), (2, 8, 8, 3)])
def test_user_array_is_not_modified(shape):
    images = np.random.default_rng(0).random(shape).astype(np.float32)
    snapshot = images.copy()
    for source in check_images(images):
        load_image(source)[...] = 0.5
    np.testing.assert_array_equal(images, snapshot)


def test_a_folder_stands_for_its_image_files(tmp_path):
    for name in ("b.png", "a.jpg", "c.tif", ".hidden.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    expected = [tmp_path / "a.jpg", tmp_path / "b.png", tmp_path / "c.tif"]
    assert check_images(tmp_path) == expected
    assert check_images(str(tmp_path)) == expected


def test_folder_mistakes_are_named(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="holds no image files"):
        check_images(tmp_path)
    with pytest.raises(ValueError, match="Image 1 of X, .* is a folder"):
        check_images([tmp_path / "notes.txt", tmp_path])
    with pytest.raises(TypeError, match="wrap it in a list"):
        check_images(tmp_path / "notes.txt")
