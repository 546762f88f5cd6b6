"""Loaders for image anomaly-detection datasets and their ground-truth masks.

Every loader returns a :class:`~sklearn.utils.Bunch` with the same fields, so
that examples and benchmarks can switch datasets without other changes.
"""

import os
from numbers import Integral, Real
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.utils import Bunch, check_random_state
from sklearn.utils._param_validation import Interval, StrOptions, validate_params

from ._image_folders import IMAGE_SUFFIXES, list_image_files

__all__ = ["load_elpv", "load_mask", "load_mvtec_folder"]


def _read_image(path):
    """Read an image file as a uint8 array of shape (H, W) or (H, W, 3)."""
    with Image.open(path) as image:
        # Palette, alpha, CMYK and 1-bit images become RGB so that every
        # loaded image is either plain grayscale or plain colour.
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        return np.asarray(image, dtype=np.uint8)


def _image_size(path):
    """Return (height, width) of an image file, reading only its header."""
    with Image.open(path) as image:
        width, height = image.size
    return height, width


@validate_params(
    {"mask": [str, os.PathLike, "array-like", None], "shape": [tuple, None]},
    prefer_skip_nested_validation=True,
)
def load_mask(mask, shape=None):
    """Turn a ground-truth mask given as a path, an array or None into booleans.

    Loaders return the masks of defective images as file paths when they are
    lazy, and None for good images. Metrics and plots need boolean arrays;
    this function makes one from any of these forms.

    Parameters
    ----------
    mask : str, path-like, array-like of shape (height, width) or None
        The ground truth. A path is read as an image; an array is taken as
        is. Non-zero values mark defective pixels, which matches the MVTec AD
        convention of 0 (good) and 255 (defective). None means that the image
        has no defect.

    shape : tuple of (int, int), default=None
        Expected ``(height, width)`` of the mask, usually the shape of the
        image or of its anomaly map. Required when `mask` is None.

    Returns
    -------
    mask : ndarray of shape (height, width), dtype=bool
        True where the pixel is defective.

    Raises
    ------
    ValueError
        If `mask` is None and `shape` is not given, if the mask is not 2-D,
        or if its shape differs from `shape`.

    Examples
    --------
    >>> from skpatchcore.datasets import load_mask
    >>> load_mask(None, shape=(2, 3))
    array([[False, False, False],
           [False, False, False]])
    >>> load_mask([[0, 255], [0, 0]])
    array([[False,  True],
           [False, False]])
    """
    if mask is None:
        if shape is None:
            raise ValueError(
                "shape is required when mask is None: an image without a "
                "defect gets an all-False mask of that shape."
            )
        return np.zeros(shape, dtype=bool)
    if isinstance(mask, (str, os.PathLike)):
        with Image.open(mask) as image:
            values = np.asarray(image.convert("L"))
        source = f"The mask {os.fspath(mask)!r}"
    else:
        values = np.asarray(mask)
        source = "The mask"
    if values.ndim != 2:
        raise ValueError(
            f"{source} must be 2-D (height, width); got shape {values.shape}."
        )
    if shape is not None and values.shape != tuple(shape):
        raise ValueError(f"{source} has shape {values.shape}, expected {tuple(shape)}.")
    return values != 0


def _find_mask(root, defect_type, image):
    folder = root / "ground_truth" / defect_type
    for suffix in IMAGE_SUFFIXES:
        candidate = folder / f"{image.stem}_mask{suffix}"
        if candidate.is_file():
            return candidate
    raise ValueError(
        f"The defective image {image} has no ground-truth mask: expected "
        f"{folder / (image.stem + '_mask.png')}."
    )


@validate_params(
    {"path": [str, os.PathLike], "lazy": ["boolean"]},
    prefer_skip_nested_validation=True,
)
def load_mvtec_folder(path, *, lazy=True):
    """Load one category of a dataset laid out like MVTec AD.

    The folder of one category (for example ``mvtec_ad/bottle``) holds::

        train/good/*.png
        test/good/*.png
        test/<defect type>/*.png
        ground_truth/<defect type>/<image stem>_mask.png

    Training images are all good. Every defective test image needs a mask
    with the same size as the image. MVTec AD, MVTec LOCO's structural
    split, MPDD and VisA once converted all follow this layout.

    Parameters
    ----------
    path : str or path-like
        The folder of one category.

    lazy : bool, default=True
        If True, images and masks are returned as :class:`pathlib.Path`
        objects and nothing is read beyond the image headers, so large
        datasets and images of different sizes cost no memory. If False,
        images are loaded as uint8 arrays and masks as boolean arrays.

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch`
        Dictionary-like object, with the following attributes.

        train_images : list of length n_train
            The good training images, as paths or as uint8 arrays of shape
            (height, width) for grayscale or (height, width, 3) for colour.
        test_images : list of length n_test
            The test images, in the same form as `train_images`.
        test_labels : ndarray of shape (n_test,), dtype=int
            +1 for good test images, -1 for defective ones, as returned by
            :meth:`PatchCoreDetector.predict`.
        test_masks : list of length n_test
            None for good images. For defective images, the path of the mask
            if `lazy`, else a boolean array of the image's shape, True on
            defective pixels. :func:`load_mask` turns either form into an
            array.
        test_defect_types : ndarray of shape (n_test,), dtype=str
            The name of the test sub-folder of each image, ``"good"`` for
            good images.
        category : str
            The name of the category folder.

    Raises
    ------
    FileNotFoundError
        If `path`, ``train/good`` or ``test`` is not a folder. If `path` is a
        sub-folder of a category (such as ``bottle/train/good``), the message
        names the category folder to pass instead.
    ValueError
        If a folder holds no images, if a defective image has no mask, or if
        a mask's size differs from its image's.

    See Also
    --------
    load_elpv : Solar-cell images with image-level labels only.
    load_mask : Turn a lazy mask into a boolean array.

    Notes
    -----
    Files are sorted by name within each folder and test folders by name, so
    the order is the same on every platform. Hidden files and files whose
    extension is not one of .png, .jpg, .jpeg, .bmp, .tif or .tiff are
    ignored. Images other than 8-bit grayscale or RGB are converted to RGB
    when loaded.

    References
    ----------
    .. [1] P. Bergmann, K. Batzner, M. Fauser, D. Sattlegger and C. Steger,
       "The MVTec Anomaly Detection Dataset: A Comprehensive Real-World
       Dataset for Unsupervised Anomaly Detection", International Journal of
       Computer Vision, 129(4), 1038-1059, 2021.

    Examples
    --------
    >>> from skpatchcore.datasets import load_mvtec_folder
    >>> data = load_mvtec_folder("mvtec_ad/bottle")  # doctest: +SKIP
    >>> len(data.train_images), len(data.test_images)  # doctest: +SKIP
    (209, 83)
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"The dataset folder {root} does not exist.")
    train_dir = root / "train" / "good"
    test_dir = root / "test"
    for folder in (train_dir, test_dir):
        if not folder.is_dir():
            _check_not_inside_a_category(root)
            raise FileNotFoundError(
                f"{folder} is not a folder. An MVTec AD category folder holds "
                "train/good, test/<defect type> and ground_truth/<defect type>."
            )

    train_images = list_image_files(train_dir)
    if not train_images:
        raise ValueError(f"No images found in {train_dir}.")

    test_images, test_masks, test_defect_types = [], [], []
    defect_dirs = sorted(
        folder
        for folder in test_dir.iterdir()
        if folder.is_dir() and not folder.name.startswith(".")
    )
    for defect_dir in defect_dirs:
        for image in list_image_files(defect_dir):
            test_images.append(image)
            test_defect_types.append(defect_dir.name)
            if defect_dir.name == "good":
                test_masks.append(None)
            else:
                test_masks.append(_find_mask(root, defect_dir.name, image))
    if not test_images:
        raise ValueError(f"No images found in the sub-folders of {test_dir}.")

    for image, mask in zip(test_images, test_masks):
        if mask is not None and _image_size(mask) != _image_size(image):
            raise ValueError(
                f"The mask {mask} has size {_image_size(mask)} but its image "
                f"{image} has size {_image_size(image)} (height, width)."
            )

    if not lazy:
        train_images = [_read_image(image) for image in train_images]
        test_masks = [None if mask is None else load_mask(mask) for mask in test_masks]
        test_images = [_read_image(image) for image in test_images]

    test_defect_types = np.asarray(test_defect_types, dtype=str)
    return Bunch(
        train_images=train_images,
        test_images=test_images,
        test_labels=np.where(test_defect_types == "good", 1, -1),
        test_masks=test_masks,
        test_defect_types=test_defect_types,
        category=root.resolve().name,
    )


def _check_not_inside_a_category(root):
    """Say which category folder to pass if ``root`` is one of its sub-folders.

    ``load_mvtec_folder("bottle/train/good")`` would otherwise report the
    doubled path ``bottle/train/good/train/good``.
    """
    for category in list(root.resolve().parents)[:3]:
        if (category / "train" / "good").is_dir() and (category / "test").is_dir():
            raise FileNotFoundError(
                f"{root} is inside the MVTec AD category folder {category}: "
                f"pass the category folder, load_mvtec_folder({str(category)!r})."
            )


def _read_elpv_labels():
    try:
        import elpv_dataset
    except ImportError as exc:
        raise ImportError(
            "load_elpv needs the elpv-dataset package: "
            'pip install "skpatchcore[datasets]"'
        ) from exc
    labels_file = Path(elpv_dataset.__file__).parent / "data" / "labels.csv"
    paths, probabilities, cell_types = [], [], []
    with open(labels_file) as file:
        for line in file:
            if line.strip():
                name, probability, cell_type = line.split()
                paths.append(labels_file.parent / name)
                probabilities.append(float(probability))
                cell_types.append(cell_type)
    return paths, np.asarray(probabilities), np.asarray(cell_types)


@validate_params(
    {
        "cell_type": [StrOptions({"mono", "poly", "all"})],
        "train_size": [
            Interval(Real, 0, 1, closed="neither"),
            Interval(Integral, 1, None, closed="left"),
        ],
        "n_test_normal": [Interval(Integral, 1, None, closed="left"), None],
        "n_test_defective": [Interval(Integral, 1, None, closed="left"), None],
        "uncertain": [StrOptions({"exclude", "defective"})],
        "lazy": ["boolean"],
        "random_state": ["random_state"],
    },
    prefer_skip_nested_validation=True,
)
def load_elpv(
    cell_type="mono",
    *,
    train_size=0.5,
    n_test_normal=None,
    n_test_defective=None,
    uncertain="exclude",
    lazy=True,
    random_state=0,
):
    """Load the ELPV solar-cell images as an anomaly-detection split.

    The ELPV dataset holds 2,624 grayscale 300x300 electroluminescence images
    of solar cells cut from mono- and polycrystalline modules. Experts gave
    each cell a probability of being defective: 0, 1/3, 2/3 or 1. Cells with
    probability 0 are normal and cells with probability 1 are defective; the
    uncertain ones (1/3 and 2/3) are handled as `uncertain` says. The images
    come with the optional dependency ``elpv-dataset``.

    The training set is a random subset of the normal cells only. The test
    set holds the remaining normal cells and the defective cells, at most
    `n_test_normal` and `n_test_defective` of them, drawn at random.

    Parameters
    ----------
    cell_type : {"mono", "poly", "all"}, default="mono"
        Which cells to use: monocrystalline, polycrystalline or both. The two
        kinds look very different, so a detector is usually fitted on one.

    train_size : float or int, default=0.5
        If float, the fraction of the normal cells used for training,
        rounded down. If int, their number. At least one normal cell must be
        left for the test set.

    n_test_normal : int, default=None
        The largest number of normal cells in the test set. None keeps every
        normal cell not used for training.

    n_test_defective : int, default=None
        The largest number of defective cells in the test set. None keeps
        all of them.

    uncertain : {"exclude", "defective"}, default="exclude"
        What to do with cells of probability 1/3 and 2/3. "exclude" leaves
        them out, the usual choice since their label is in doubt.
        "defective" counts them as defective test cells.

    lazy : bool, default=True
        If True, images are returned as :class:`pathlib.Path` objects into the
        installed package. If False, they are loaded as uint8 arrays of shape
        (300, 300).

    random_state : int, RandomState instance or None, default=0
        Controls which normal cells are used for training and which cells are
        kept when the test set is capped. Pass an int for reproducible output
        across multiple function calls.
        See :term:`Glossary <random_state>`.

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch`
        Dictionary-like object, with the following attributes.

        train_images : list of length n_train
            The normal training cells, as paths or arrays, sorted by file name.
        test_images : list of length n_test
            The test cells, in the same form, sorted by file name.
        test_labels : ndarray of shape (n_test,), dtype=int
            +1 for normal cells, -1 for defective ones, as returned by
            :meth:`PatchCoreDetector.predict`.
        test_masks : list of length n_test
            All None: the dataset has no pixel-level ground truth.
        test_defect_types : ndarray of shape (n_test,), dtype=str
            ``"good"`` or ``"defective"``.
        test_defect_probabilities : ndarray of shape (n_test,)
            The experts' defect probability of each test cell.
        category : str
            ``"elpv_mono"``, ``"elpv_poly"`` or ``"elpv_all"``.

    Raises
    ------
    ImportError
        If the package ``elpv-dataset`` is not installed.
    ValueError
        If `train_size` leaves no normal cell for the test set.

    See Also
    --------
    load_mvtec_folder : Datasets with pixel-level ground truth.

    References
    ----------
    .. [1] C. Buerhop-Lutz, S. Deitsch, A. Maier, F. Gallwitz, S. Berger,
       B. Doll, J. Hauch, C. Camus and C. J. Brabec, "A Benchmark for Visual
       Identification of Defective Solar Cells in Electroluminescence
       Imagery", European PV Solar Energy Conference and Exhibition
       (EU PVSEC), 2018.
    .. [2] S. Deitsch, V. Christlein, S. Berger, C. Buerhop-Lutz, A. Maier,
       F. Gallwitz and C. Riess, "Automatic classification of defective
       photovoltaic module cells in electroluminescence images", Solar
       Energy, 185, 455-468, 2019.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore.datasets import load_elpv
    >>> data = load_elpv("mono", train_size=100, n_test_normal=20,
    ...                  n_test_defective=20, random_state=0)
    >>> len(data.train_images), len(data.test_images)
    (100, 40)
    >>> np.unique(data.test_labels, return_counts=True)
    (array([-1,  1]), array([20, 20]))
    """
    paths, probabilities, cell_types = _read_elpv_labels()
    selected = np.ones(len(paths), dtype=bool)
    if cell_type != "all":
        selected = cell_types == cell_type
    normal = np.flatnonzero(selected & (probabilities == 0))
    if uncertain == "exclude":
        defective = np.flatnonzero(selected & (probabilities == 1))
    else:
        defective = np.flatnonzero(selected & (probabilities > 0))

    if isinstance(train_size, Integral):
        n_train = train_size
    else:
        n_train = int(train_size * normal.size)
    if not 1 <= n_train < normal.size:
        raise ValueError(
            f"train_size={train_size} gives {n_train} training cells; between "
            f"1 and {normal.size - 1} of the {normal.size} normal {cell_type} "
            "cells must go to training, so that the test set keeps at least one."
        )

    rng = check_random_state(random_state)
    normal = rng.permutation(normal)
    train = normal[:n_train]
    test_normal = normal[n_train:][:n_test_normal]
    if n_test_defective is not None and n_test_defective < defective.size:
        defective = rng.choice(defective, size=n_test_defective, replace=False)
    # labels.csv lists the cells by file name, so sorting row indices sorts
    # by file name.
    train = np.sort(train)
    test = np.sort(np.concatenate([test_normal, defective]))

    train_images = [paths[i] for i in train]
    test_images = [paths[i] for i in test]
    if not lazy:
        train_images = [_read_image(image) for image in train_images]
        test_images = [_read_image(image) for image in test_images]
    test_labels = np.where(probabilities[test] == 0, 1, -1)
    return Bunch(
        train_images=train_images,
        test_images=test_images,
        test_labels=test_labels,
        test_masks=[None] * len(test),
        test_defect_types=np.where(test_labels == 1, "good", "defective"),
        test_defect_probabilities=probabilities[test],
        category=f"elpv_{cell_type}",
    )
