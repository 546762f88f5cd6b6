import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skpatchcore.datasets import load_elpv, load_mask, load_mvtec_folder

MPDD = Path(__file__).parents[1].parent / "shared" / "data" / "mpdd_metal_plate"


def _write_png(path, shape, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(shape, value, dtype=np.uint8)).save(path)


def _write_mask(path, shape, rows, cols):
    mask = np.zeros(shape, dtype=np.uint8)
    mask[rows, cols] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(path)


@pytest.fixture
def mvtec_tree(tmp_path):
    """A tiny category: grayscale and RGB images of two sizes, two defect types."""
    root = tmp_path / "widget"
    _write_png(root / "train" / "good" / "001.png", (8, 10))
    _write_png(root / "train" / "good" / "000.png", (12, 6, 3))
    (root / "train" / "good" / "notes.txt").write_text("not an image")
    _write_png(root / "train" / "good" / "._000.png", (8, 10))
    _write_png(root / "test" / "good" / "000.png", (8, 10))
    _write_png(root / "test" / "scratch" / "000.png", (8, 10))
    _write_png(root / "test" / "scratch" / "001.png", (12, 6, 3))
    _write_png(root / "test" / "crack" / "000.png", (8, 10))
    _write_mask(root / "ground_truth" / "scratch" / "000_mask.png", (8, 10), 2, 3)
    _write_mask(
        root / "ground_truth" / "scratch" / "001_mask.png", (12, 6), slice(0, 2), 0
    )
    _write_mask(root / "ground_truth" / "crack" / "000_mask.png", (8, 10), 7, 9)
    return root


def test_load_mvtec_folder_lazy(mvtec_tree):
    data = load_mvtec_folder(mvtec_tree)

    assert data.category == "widget"
    train_dir = mvtec_tree / "train" / "good"
    assert data.train_images == [train_dir / "000.png", train_dir / "001.png"]
    # Test folders in name order: crack, good, scratch.
    test_dir = mvtec_tree / "test"
    assert data.test_images == [
        test_dir / "crack" / "000.png",
        test_dir / "good" / "000.png",
        test_dir / "scratch" / "000.png",
        test_dir / "scratch" / "001.png",
    ]
    np.testing.assert_array_equal(data.test_labels, [-1, 1, -1, -1])
    assert data.test_labels.dtype.kind == "i"
    np.testing.assert_array_equal(
        data.test_defect_types, ["crack", "good", "scratch", "scratch"]
    )
    ground_truth = mvtec_tree / "ground_truth"
    assert data.test_masks == [
        ground_truth / "crack" / "000_mask.png",
        None,
        ground_truth / "scratch" / "000_mask.png",
        ground_truth / "scratch" / "001_mask.png",
    ]


def test_load_mvtec_folder_eager(mvtec_tree):
    data = load_mvtec_folder(str(mvtec_tree), lazy=False)

    assert [image.shape for image in data.train_images] == [(12, 6, 3), (8, 10)]
    assert all(image.dtype == np.uint8 for image in data.test_images)
    assert data.test_masks[1] is None
    expected = np.zeros((12, 6), dtype=bool)
    expected[0:2, 0] = True
    np.testing.assert_array_equal(data.test_masks[3], expected)
    assert data.test_masks[0].dtype == bool
    assert np.argwhere(data.test_masks[0]).tolist() == [[7, 9]]


def test_load_mvtec_folder_missing_mask(mvtec_tree):
    (mvtec_tree / "ground_truth" / "scratch" / "001_mask.png").unlink()
    with pytest.raises(ValueError, match=r"scratch.001\.png has no ground-truth mask"):
        load_mvtec_folder(mvtec_tree)


def test_load_mvtec_folder_mask_size_mismatch(mvtec_tree):
    _write_png(mvtec_tree / "ground_truth" / "crack" / "000_mask.png", (8, 9))
    with pytest.raises(ValueError, match="has size"):
        load_mvtec_folder(mvtec_tree)


@pytest.mark.parametrize("missing", ["train", "test"])
def test_load_mvtec_folder_missing_folder(mvtec_tree, missing):
    shutil.rmtree(mvtec_tree / missing)
    with pytest.raises(FileNotFoundError, match=missing):
        load_mvtec_folder(mvtec_tree)


@pytest.mark.parametrize("inside", ["train", "train/good", "test/crack"])
def test_load_mvtec_folder_names_the_category_of_a_sub_folder(mvtec_tree, inside):
    with pytest.raises(FileNotFoundError, match="pass the category folder") as info:
        load_mvtec_folder(mvtec_tree / inside)
    message = str(info.value)
    assert repr(str(mvtec_tree.resolve())) in message
    # Not the doubled path of the old message.
    assert "good/train/good" not in message


def test_load_mvtec_folder_errors(tmp_path, mvtec_tree):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mvtec_folder(tmp_path / "nowhere")
    for image in (mvtec_tree / "train" / "good").glob("*.png"):
        image.unlink()
    with pytest.raises(ValueError, match="No images found"):
        load_mvtec_folder(mvtec_tree)
    with pytest.raises(TypeError):
        load_mvtec_folder(3)


@pytest.mark.skipif(not MPDD.is_dir(), reason="shared MPDD data not available")
def test_load_mvtec_folder_mpdd():
    data = load_mvtec_folder(MPDD)

    assert data.category == "mpdd_metal_plate"
    assert len(data.train_images) == 54
    assert np.sum(data.test_labels == 1) == 26
    assert np.sum(data.test_labels == -1) == 71
    masks = [mask for mask in data.test_masks if mask is not None]
    assert len(masks) == 71
    assert len(set(masks)) == 71
    for image, mask, label in zip(data.test_images, data.test_masks, data.test_labels):
        assert (mask is None) == (label == 1)
        if mask is not None:
            assert mask.name == image.stem + "_mask.png"
    assert load_mask(masks[0]).shape == (512, 512)
    assert load_mask(masks[0]).any()


def test_load_mask(tmp_path):
    np.testing.assert_array_equal(load_mask(None, (2, 3)), np.zeros((2, 3), bool))
    np.testing.assert_array_equal(
        load_mask(np.array([[0, 255], [1, 0]])), [[False, True], [True, False]]
    )
    path = tmp_path / "m.png"
    _write_mask(path, (4, 5), 1, slice(1, 3))
    expected = np.zeros((4, 5), dtype=bool)
    expected[1, 1:3] = True
    np.testing.assert_array_equal(load_mask(path, (4, 5)), expected)
    np.testing.assert_array_equal(load_mask(str(path)), expected)

    with pytest.raises(ValueError, match="shape is required"):
        load_mask(None)
    with pytest.raises(ValueError, match=r"has shape \(4, 5\), expected \(5, 4\)"):
        load_mask(path, (5, 4))
    with pytest.raises(ValueError, match="must be 2-D"):
        load_mask(np.zeros((2, 2, 2)))


def _elpv_rows():
    """The labels file of elpv-dataset, read here independently of skpatchcore."""
    elpv_dataset = pytest.importorskip("elpv_dataset")
    labels = Path(elpv_dataset.__file__).parent / "data" / "labels.csv"
    with open(labels) as file:
        rows = [line.split() for line in file if line.strip()]
    return {
        labels.parent / name: (float(probability), cell_type)
        for name, probability, cell_type in rows
    }


@pytest.mark.parametrize("cell_type", ["mono", "poly", "all"])
def test_load_elpv_counts(cell_type):
    rows = _elpv_rows()
    kinds = {"mono", "poly"} if cell_type == "all" else {cell_type}
    n_normal = sum(p == 0 and t in kinds for p, t in rows.values())
    n_defective = sum(p == 1 and t in kinds for p, t in rows.values())
    n_uncertain = sum(0 < p < 1 and t in kinds for p, t in rows.values())

    data = load_elpv(cell_type)
    assert len(data.train_images) == n_normal // 2
    assert len(data.test_images) == n_normal - n_normal // 2 + n_defective
    assert np.sum(data.test_labels == -1) == n_defective
    assert data.category == f"elpv_{cell_type}"
    assert data.test_masks == [None] * len(data.test_images)

    for image in data.train_images:
        assert rows[image][0] == 0 and rows[image][1] in kinds
    for image, label, kind, probability in zip(
        data.test_images,
        data.test_labels,
        data.test_defect_types,
        data.test_defect_probabilities,
    ):
        assert rows[image][1] in kinds
        assert probability == rows[image][0]
        assert (label, kind) == ((1, "good") if probability == 0 else (-1, "defective"))
    assert not set(data.train_images) & set(data.test_images)
    assert data.train_images == sorted(data.train_images)
    assert data.test_images == sorted(data.test_images)

    with_uncertain = load_elpv(cell_type, uncertain="defective")
    assert np.sum(with_uncertain.test_labels == -1) == n_defective + n_uncertain
    assert with_uncertain.train_images == data.train_images


def test_load_elpv_caps_and_seed():
    rows = _elpv_rows()
    n_normal = sum(p == 0 and t == "mono" for p, t in rows.values())

    data = load_elpv(train_size=50, n_test_normal=10, n_test_defective=7)
    assert len(data.train_images) == 50
    assert np.sum(data.test_labels == 1) == 10
    assert np.sum(data.test_labels == -1) == 7
    assert not set(data.train_images) & set(data.test_images)
    assert all(rows[image][0] == 0 for image in data.train_images)

    same = load_elpv(train_size=50, n_test_normal=10, n_test_defective=7)
    assert same.train_images == data.train_images
    assert same.test_images == data.test_images
    other = load_elpv(
        train_size=50, n_test_normal=10, n_test_defective=7, random_state=1
    )
    assert other.train_images != data.train_images
    assert other.test_images != data.test_images

    everything = load_elpv(train_size=0.9)
    assert len(everything.train_images) == int(0.9 * n_normal)
    assert np.sum(everything.test_labels == 1) == n_normal - int(0.9 * n_normal)


def test_load_elpv_eager():
    data = load_elpv(train_size=2, n_test_normal=1, n_test_defective=1, lazy=False)
    images = data.train_images + data.test_images
    assert len(images) == 4
    assert all(
        image.shape == (300, 300) and image.dtype == np.uint8 for image in images
    )


def test_load_elpv_errors(monkeypatch):
    pytest.importorskip("elpv_dataset")
    with pytest.raises(ValueError, match="cell_type"):
        load_elpv("amorphous")
    with pytest.raises(ValueError, match="must go to training"):
        load_elpv(train_size=100_000)
    with pytest.raises(ValueError, match="must go to training"):
        load_elpv(train_size=1e-6)
    with pytest.raises(ValueError, match="uncertain"):
        load_elpv(uncertain="normal")

    # A None entry in sys.modules makes the import fail as if not installed.
    monkeypatch.setitem(sys.modules, "elpv_dataset", None)
    with pytest.raises(ImportError, match=r'pip install "skpatchcore\[datasets\]"'):
        load_elpv()
