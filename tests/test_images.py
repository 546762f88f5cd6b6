import numpy as np
import pytest
import torch
from PIL import Image

from skpatchcore._images import (
    LazyImage,
    check_images,
    input_geometry,
    load_image,
    to_model_input,
)
from skpatchcore._scoring.maps import model_input_maps, to_original_geometry


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


@pytest.mark.parametrize(
    "grid_shape, input_shape, sigma",
    [
        ((28, 28), (224, 224), 4.0),
        ((7, 13), (30, 61), 4.0),
        ((5, 3), (9, 7), 4.0),
        ((4, 4), (8, 8), 10.0),
        ((28, 70), (224, 560), 0.0),
    ],
)
def test_maps_by_operators_match_upsampling_then_filtering(
    grid_shape, input_shape, sigma
):
    # The maps come from one matrix per axis; the reference upsamples and
    # filters each map, also where the kernel is wider than the map.
    from scipy.ndimage import gaussian_filter

    grids = np.random.default_rng(0).random((3, *grid_shape)).astype(np.float32)
    reference = torch.nn.functional.interpolate(
        torch.from_numpy(grids)[:, None],
        size=input_shape,
        mode="bilinear",
        align_corners=False,
    )[:, 0].numpy()
    if sigma > 0:
        reference = np.stack(
            [gaussian_filter(m, sigma, mode="reflect", truncate=4.0) for m in reference]
        )
    maps = model_input_maps(grids, input_shape, sigma)
    assert maps.shape == reference.shape and maps.dtype == np.float32
    np.testing.assert_allclose(maps, reference, rtol=1e-5, atol=1e-6)


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
    for X in (tmp_path, str(tmp_path)):
        sources = check_images(X)
        assert [source.image for source in sources] == expected
        assert [source.position for source in sources] == [0, 1, 2]


def test_folder_mistakes_are_named(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="holds no image files"):
        check_images(tmp_path)
    with pytest.raises(ValueError, match="Image 1 of X, .* is a folder"):
        check_images([tmp_path / "notes.txt", tmp_path])
    with pytest.raises(TypeError, match="wrap it in a list"):
        check_images(tmp_path / "notes.txt")


@pytest.mark.parametrize("n_channels, kind", [(3, "RGB"), (4, "RGBA")])
def test_one_colour_image_without_batch_axis_is_refused(n_channels, kind):
    image = np.zeros((40, 50, n_channels), np.uint8)
    with pytest.raises(ValueError, match=rf"one {kind} image.*X\[np.newaxis\]"):
        check_images(image)
    assert len(check_images(image[np.newaxis])) == 1
    assert len(check_images([image])) == 1


@pytest.mark.parametrize(
    "shape",
    [
        (5, 1, 3),  # rows of a feature matrix as 1 x 3 images
        (2, 8, 3),  # fewer images than channels: not a colour image
        (6, 8, 3, 1),  # narrow grayscale images with an explicit channel axis
    ],
)
def test_narrow_grayscale_stacks_stay_accepted(shape):
    images = np.arange(np.prod(shape), dtype=np.uint8).reshape(shape)
    sources = check_images(images)
    assert len(sources) == shape[0]
    np.testing.assert_allclose(
        load_image(sources[1])[..., 0], images[1].reshape(shape[1:3]) / 255.0
    )


def test_big_endian_uint16_is_read_like_native():
    values = np.random.default_rng(0).integers(0, 65536, (2, 5, 6))
    big = values.astype(">u2")
    assert not big.dtype.isnative
    for X in (big, list(big)):
        loaded = [load_image(source) for source in check_images(X)]
        for image, expected in zip(loaded, values / 65535.0):
            assert image.dtype == np.float32 and image.dtype.isnative
            np.testing.assert_allclose(image[..., 2], expected, rtol=1e-6)


def test_image_files_are_scaled_by_their_mode(tmp_path):
    values = np.linspace(0.0, 1.0, 12, dtype=np.float32).reshape(3, 4)
    files = {
        "float.tif": (Image.fromarray(values), "F", values),
        "i16.png": (Image.fromarray(np.uint16(values * 65535)), "I;16", values),
        "i32.tif": (Image.fromarray(np.int32(values * 65535)), "I", values),
    }
    for name, (image, mode, expected) in files.items():
        image.save(tmp_path / name)
        with Image.open(tmp_path / name) as saved:
            assert saved.mode == mode
        (source,) = check_images([tmp_path / name])
        np.testing.assert_allclose(load_image(source)[..., 0], expected, atol=1e-4)
        # The same image in memory is read the same way.
        (source,) = check_images([image])
        np.testing.assert_allclose(load_image(source)[..., 0], expected, atol=1e-4)


@pytest.mark.parametrize(
    "array, match",
    [
        (np.full((3, 4), 200.0, np.float32), r"float image .*\[200, 200\].*\[0, 1\]"),
        (np.full((3, 4), np.nan, np.float32), "NaN"),
        (np.full((3, 4), 70000, np.int32), r"\[70000, 70000\].*0-65535"),
        (np.full((3, 4), -1, np.int32), r"\[-1, -1\].*0-65535"),
    ],
)
def test_image_files_out_of_range_are_refused(tmp_path, array, match):
    path = tmp_path / "odd.tif"
    Image.fromarray(array).save(path)
    sources = check_images([np.zeros((3, 4), np.uint8), path])
    with pytest.raises(ValueError, match=rf"Image 1 of X, '.*odd.tif', .*{match}"):
        load_image(sources[1])


def test_files_that_cannot_be_decoded_are_named_by_position(tmp_path, monkeypatch):
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(good)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    sources = check_images([good, good, broken])
    with pytest.raises(ValueError, match=r"Image 2 of X, '.*broken.png', cannot be"):
        load_image(sources[2])
    # A decompression bomb: more than twice PIL's pixel limit.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)
    with pytest.raises(ValueError, match=r"Image 0 of X, '.*good.png', .*bomb"):
        load_image(check_images([good])[0])


def test_closed_or_unconvertible_pil_images_are_named_by_position():
    closed = Image.fromarray(np.zeros((4, 5), np.uint8))
    closed.close()
    sources = check_images([np.zeros((4, 5), np.uint8), closed])
    with pytest.raises(ValueError, match=r"Image 1 of X \(a PIL image.*closed image"):
        load_image(sources[1])
    unconvertible = Image.new("La", (5, 4))
    with pytest.raises(ValueError, match=r"Image 0 of X \(a PIL image in mode 'La'\)"):
        load_image(check_images([unconvertible])[0])


def test_elongated_image_is_refused_before_resizing():
    # Resizing the shorter side (1 pixel) to 256 would make a 256 x 5,120,000
    # image: 15.7 GB of float32 for a 224 x 224 crop.
    strip = np.zeros((1, 20000, 3), np.float32)
    with pytest.raises(ValueError, match=r"1 x 20000 pixels.*256 x 5120000.*None"):
        to_model_input(strip, 224, 256)
    # Without the crop, the whole strip is resized to the model input.
    tensor, _ = to_model_input(strip, 224, None)
    assert tensor.shape == (3, 224, 224)
    # A long image whose resized size stays moderate is still resized.
    tensor, geometry = to_model_input(np.zeros((100, 2000, 3), np.float32), 224, 256)
    assert tensor.shape == (3, 224, 224) and geometry.resized_width == 5120


@pytest.mark.parametrize(
    "X, error, match",
    [
        ({"a.png": 1}, TypeError, "X is a dict.*list\\(X.values\\(\\)\\)"),
        ({"a.png", "b.png"}, TypeError, "X is a set, which has no order"),
        ("no/such/folder", FileNotFoundError, "'no/such/folder', which does not exist"),
        (["a.png", "b.png"], ValueError, "2 image file.*image 0 \\('a.png'\\)"),
        (np.zeros((2, 3, 8, 8)), ValueError, "Channels come last"),
    ],
)
def test_misleading_inputs_get_plain_messages(X, error, match):
    with pytest.raises(error, match=match):
        check_images(X)


def test_a_missing_folder_is_named_without_the_list_hint(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        check_images(missing)
    assert repr(str(missing)) in str(info.value)
    assert "wrap it in a list" not in str(info.value)


def _write_images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(folder / name)


def test_a_glob_pattern_stands_for_the_images_it_matches(tmp_path):
    _write_images(tmp_path / "a", ["2.png", "1.png", "3.jpg"])
    _write_images(tmp_path / "b", ["0.png"])
    (tmp_path / "a" / "notes.txt").write_text("not an image")

    sources = check_images(str(tmp_path / "a" / "*.png"))
    assert [s.image for s in sources] == [
        tmp_path / "a" / n for n in ("1.png", "2.png")
    ]
    # Any depth with **, sorted by path; non-image matches are left out.
    sources = check_images(str(tmp_path / "**" / "*"))
    assert [s.image.relative_to(tmp_path).as_posix() for s in sources] == [
        "a/1.png",
        "a/2.png",
        "a/3.jpg",
        "b/0.png",
    ]
    pattern = str(tmp_path / "c" / "*.png")
    with pytest.raises(FileNotFoundError, match="matches no file") as info:
        check_images(pattern)
    assert repr(pattern) in str(info.value)
    assert "wrap it in a list" not in str(info.value)
    with pytest.raises(ValueError, match="1 match.*include no image file"):
        check_images(str(tmp_path / "a" / "*.txt"))
    # A pattern inside a list is a file name, which does not exist.
    with pytest.raises(ValueError, match="expanded when it is X itself"):
        check_images([str(tmp_path / "a" / "*.png")])


def test_a_folder_with_images_only_below_names_its_sub_folders(tmp_path):
    category = tmp_path / "bottle"
    _write_images(category / "train" / "good", ["0.png"])
    for defect in ("broken", "contamination", "good"):
        _write_images(category / "test" / defect, ["0.png"])
    (category / "license.txt").write_text("not an image")

    with pytest.raises(ValueError, match="sub-folders are not searched") as info:
        check_images(category)
    message = str(info.value)
    # Training folders first, then the shallower, then by name.
    assert "'train/good', 'test/good', 'test/broken'" in message
    assert "contamination" not in message
    assert repr(str(category / "train" / "good")) in message
    # Only the top level empty: the deeper folder is found.
    with pytest.raises(ValueError, match="'good'; pass one of them"):
        check_images(category / "train")
    # No images anywhere: no list of sub-folders.
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="not searched.$"):
        check_images(tmp_path / "empty")


def test_lazy_sources_keep_their_position(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(path)
    image = Image.fromarray(np.zeros((4, 4), np.uint8))
    sources = check_images([np.zeros((4, 4), np.uint8), path, image])
    assert sources[1] == LazyImage(path, 1)
    assert sources[2] == LazyImage(image, 2)


@pytest.mark.parametrize(
    "shape, image_size, resize, expected",
    [
        # 400 * 256 / 300 = 341.3 -> 341; (256 - 224) / 2 = 16; 61 / 2 -> 30.
        ((300, 400), (224, 280), 256, (256, 341, 16, 30, 224, 280)),
        ((120, 90), (64, 100), None, (64, 100, 0, 0, 64, 100)),
    ],
)
def test_tuple_geometry_by_hand(shape, image_size, resize, expected):
    g = input_geometry(*shape, image_size=image_size, resize=resize)
    found = (g.resized_height, g.resized_width, g.top, g.left)
    assert found + (g.crop_height, g.crop_width) == expected


@pytest.mark.parametrize(
    "shape, image_size, multiple, cap, expected",
    [
        # KolektorSDD: 224 / 500 = 0.448; 1263 * 0.448 = 565.8 -> 35 x 16.
        ((1263, 500), 224, 16, None, (560, 224)),
        ((100, 250), 64, 16, None, (64, 160)),
        # 300 * 64 / 90 = 213.3 -> 13 x 16.
        ((300, 90), 64, 16, None, (208, 64)),
        # Capped: 400 / 1263 scales 500 to 158.4 -> 10 x 16.
        ((1263, 500), 224, 16, 400, (400, 160)),
        # 200 / 16 = 12.5 rounds up to 13, above the cap: 12 x 16.
        ((1000, 100), 64, 16, 200, (192, 16)),
        # A side never rounds to nothing.
        ((10, 2000), 8, 16, None, (16, 1600)),
        ((37, 53), 30, 1, None, (30, 43)),
    ],
)
def test_keep_aspect_geometry_by_hand(shape, image_size, multiple, cap, expected):
    g = input_geometry(
        *shape,
        image_size=image_size,
        resize="keep_aspect",
        size_multiple=multiple,
        max_image_size=cap,
    )
    assert (g.resized_height, g.resized_width) == expected
    # Nothing is cropped.
    assert (g.top, g.left, g.crop_height, g.crop_width) == (0, 0, *expected)


@pytest.mark.parametrize(
    "shape, image_size, resize",
    [
        ((240, 400), (224, 300), 256),
        ((150, 90), (64, 100), None),
        ((1263, 500), 224, "keep_aspect"),
        ((90, 301), 64, "keep_aspect"),
    ],
)
def test_maps_come_back_to_the_right_pixels_at_any_shape(shape, image_size, resize):
    # As test_maps_come_back_to_the_right_pixels, for model inputs that are
    # not square: a (height, width) crop or resize, and keep-aspect inputs
    # whose sides are rounded to multiples of 16 (each axis scaled apart).
    height, width = shape
    image = np.zeros((height, width, 3), np.float32)
    top, left = (height - 40) * 2 // 3, width // 4
    image[top : top + 40, left : left + 30] = 1.0
    tensor, geometry = to_model_input(image, image_size, resize, size_multiple=16)
    assert tensor.shape[1:] == (geometry.crop_height, geometry.crop_width)
    back = to_original_geometry(tensor[0].numpy(), geometry)
    assert back.shape == (height, width)
    rows, cols = np.nonzero(back > 0.5)
    assert abs(rows.min() - top) <= 1 and abs(rows.max() - (top + 39)) <= 1
    assert abs(cols.min() - left) <= 1 and abs(cols.max() - (left + 29)) <= 1


def test_tuple_crop_keeps_the_centre_window():
    image = np.random.default_rng(0).random((40, 70, 3)).astype(np.float32)
    # The shorter side is 40 already: no resize, then the centre 30 x 50.
    tensor, _ = to_model_input(image, (30, 50), 40)
    np.testing.assert_array_equal(tensor.numpy().transpose(1, 2, 0), image[5:35, 10:60])


def test_model_input_of_the_wrong_shape_is_named():
    with pytest.raises(ValueError, match=r"300 x 300 pixels.*256 x 256.*224 x 280"):
        to_model_input(np.zeros((300, 300, 3), np.float32), (224, 280), 256)
    # A 1 x 20,000 strip with its shorter side at 224: 4,480,000 pixels long.
    strip = np.zeros((1, 20000, 3), np.float32)
    with pytest.raises(ValueError, match=r"224 x 4480000 pixels.*max_image_size"):
        to_model_input(strip, 224, "keep_aspect", size_multiple=16)
    tensor, _ = to_model_input(
        strip, 224, "keep_aspect", size_multiple=16, max_image_size=2048
    )
    assert tensor.shape == (3, 16, 2048)
