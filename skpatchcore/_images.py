"""Image input: validation at the boundary, loading, and the resize/crop geometry.

Every public method of the estimator accepts the same kinds of ``X``; this
module turns any of them into a list of *image sources* (arrays or file paths)
that are loaded lazily, batch by batch, so that a folder of large images never
has to sit in memory at once.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from scipy import sparse

_CHANNELS = (1, 3, 4)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def list_image_files(folder):
    """The image files directly inside ``folder``, sorted by name."""
    # Hidden files are skipped because archives made on macOS carry
    # "._name.png" resource forks that are not images.
    return sorted(
        path
        for path in Path(folder).iterdir()
        if path.is_file()
        and not path.name.startswith(".")
        and path.suffix.lower() in IMAGE_SUFFIXES
    )


@dataclass(frozen=True)
class Geometry:
    """Where the model input sits inside an original image.

    The original ``height x width`` image is resized to
    ``resized_height x resized_width``; the model sees the square window of
    side ``crop`` whose top-left corner is at ``(top, left)`` of the resized
    image.
    """

    height: int
    width: int
    resized_height: int
    resized_width: int
    top: int
    left: int
    crop: int


def input_geometry(height, width, image_size, resize):
    """Geometry of the resize / centre-crop applied to one image.

    ``resize=None`` resizes straight to ``image_size x image_size`` (no crop);
    otherwise the shorter side is resized to ``resize`` (aspect ratio kept)
    and the centre ``image_size x image_size`` window is cropped.
    """
    if resize is None:
        return Geometry(height, width, image_size, image_size, 0, 0, image_size)
    if height <= width:
        resized_height, resized_width = resize, max(1, int(resize * width / height))
    else:
        resized_height, resized_width = max(1, int(resize * height / width)), resize
    top = int(round((resized_height - image_size) / 2.0))
    left = int(round((resized_width - image_size) / 2.0))
    return Geometry(height, width, resized_height, resized_width, top, left, image_size)


def check_images(X):
    """Validate ``X`` and return it as a list of image sources.

    Parameters
    ----------
    X : array-like, list or folder
        A uint8/uint16/float array of shape (n, H, W) or (n, H, W, C) with C
        in {1, 3, 4}, a list (or 1-D object array) whose items are such
        2-D/3-D arrays, PIL images or image file paths (str or path-like),
        or the path of a folder, which stands for its image files sorted by
        name.

    Returns
    -------
    sources : list
        One item per image: a validated ndarray, a PIL image or a ``Path``.
        In-memory images are checked here in full (dtype, shape, finite,
        range); files are checked for existence here and decoded later by
        :func:`load_image`.
    """
    if isinstance(X, (str, os.PathLike)):
        if not Path(X).is_dir():
            raise TypeError(
                "X must be a collection of images or a folder of image files; "
                f"to pass one image file, wrap it in a list: [{str(X)!r}]."
            )
        folder, X = X, list_image_files(X)
        if not X:
            raise ValueError(
                f"The folder {str(folder)!r} holds no image files "
                f"({', '.join(IMAGE_SUFFIXES)})."
            )
    if isinstance(X, Image.Image):
        raise TypeError(
            "X must be a collection of images; wrap one PIL image in a list."
        )
    if sparse.issparse(X):
        raise TypeError(
            f"X is a sparse {type(X).__name__}; sparse input is not supported: "
            "pass images as dense arrays."
        )
    if isinstance(X, np.ndarray) and X.ndim == 1 and X.dtype.kind in "OUS":
        # A 1-D array of paths or of images of different sizes, as fancy
        # indexing of a list makes them.
        X = list(X)
    if isinstance(X, np.ndarray):
        if X.ndim not in (3, 4):
            hint = (
                " Reshape your data with X[np.newaxis] if it is a single image."
                if X.ndim == 2
                else ""
            )
            raise ValueError(
                "An image array X must have shape (n_images, height, width) or "
                f"(n_images, height, width, channels); got shape {X.shape}.{hint}"
            )
        if X.shape[0] == 0:
            raise ValueError("X is empty: at least one image is required.")
        _check_array_image(X[0], index=0, batch=X)
        return list(X)
    if hasattr(X, "__array__") and not isinstance(X, (list, tuple)):
        return check_images(np.asarray(X))
    try:
        items = list(X)
    except TypeError:
        raise TypeError(
            "X must be an image array or a list of images (arrays, PIL images "
            f"or file paths); got {type(X).__name__}."
        ) from None
    if not items:
        raise ValueError("X is empty: at least one image is required.")
    sources = []
    missing = []
    for index, item in enumerate(items):
        if isinstance(item, (str, os.PathLike)):
            path = Path(item)
            if path.is_dir():
                raise ValueError(
                    f"Image {index} of X, {str(path)!r}, is a folder: pass the "
                    "folder itself as X to use its image files."
                )
            if not path.is_file():
                missing.append(str(path))
            sources.append(path)
        elif isinstance(item, Image.Image):
            sources.append(item)
        elif isinstance(item, np.ndarray) or hasattr(item, "__array__"):
            array = np.asarray(item)
            _check_array_image(array, index=index)
            sources.append(array)
        else:
            raise TypeError(
                f"Image {index} of X has type {type(item).__name__}; expected "
                "an array, a PIL image or an image file path."
            )
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"{len(missing)} image file(s) do not exist: {shown}")
    return sources


def _check_array_image(image, index, batch=None):
    """Check one in-memory image; ``batch`` is the whole (n, ...) array if any."""
    array = image if batch is None else batch
    where = "X" if batch is not None else f"Image {index} of X"
    if array.dtype == np.uint8 or array.dtype == np.uint16:
        pass
    elif np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{where} contains NaN or infinity.")
        low, high = float(array.min(initial=0.0)), float(array.max(initial=0.0))
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"{where} is a float image with values in [{low:g}, {high:g}]; "
                "float images must lie in [0, 1] (pass uint8 for 0-255 data)."
            )
    else:
        raise TypeError(
            f"{where} has dtype {array.dtype}; images must be uint8, uint16 or "
            "float in [0, 1]."
        )
    shape = image.shape
    if image.ndim not in (2, 3) or (image.ndim == 3 and shape[2] not in _CHANNELS):
        raise ValueError(
            f"Image {index} of X has shape {shape}; expected (height, width) or "
            "(height, width, channels) with 1, 3 or 4 channels."
        )
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"Image {index} of X has an empty side: shape {shape}.")


def load_image(source):
    """Return one image source as a float32 RGB array (H, W, 3) in [0, 1].

    Grayscale is repeated over three channels; the alpha channel of RGBA is
    dropped (the colour values are kept as stored).
    """
    if isinstance(source, Path):
        try:
            with Image.open(source) as image:
                image.load()
                source = image.copy()
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise ValueError(f"Cannot read image file {source}: {exc}") from exc
    if isinstance(source, Image.Image):
        if source.mode in ("I;16", "I;16B", "I;16L", "I"):
            array = np.asarray(source, dtype=np.float32) / 65535.0
            array = np.clip(array, 0.0, 1.0)
        else:
            array = np.asarray(source.convert("RGB"), dtype=np.float32) / 255.0
        if array.shape[0] == 0 or array.shape[1] == 0:
            raise ValueError("An image has an empty side.")
    else:
        array = source
        if array.dtype == np.uint8:
            array = array.astype(np.float32) / 255.0
        elif array.dtype == np.uint16:
            array = array.astype(np.float32) / 65535.0
        else:
            array = array.astype(np.float32)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.shape[2] == 4:
        array = array[:, :, :3]
    return array


def image_shape(source):
    """(height, width) of an image source without decoding pixels where possible."""
    if isinstance(source, Path):
        try:
            with Image.open(source) as image:
                return image.height, image.width
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise ValueError(f"Cannot read image file {source}: {exc}") from exc
    if isinstance(source, Image.Image):
        return source.height, source.width
    return source.shape[0], source.shape[1]


def to_model_input(image, image_size, resize):
    """Resize and centre-crop one loaded image; return (tensor (3, S, S), geometry)."""
    height, width = image.shape[:2]
    geometry = input_geometry(height, width, image_size, resize)
    if geometry.resized_height < image_size or geometry.resized_width < image_size:
        raise ValueError(
            f"resize={resize} is smaller than image_size={image_size}: the centre "
            "crop would not fit inside the resized image."
        )
    tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
    if (geometry.resized_height, geometry.resized_width) != (height, width):
        # Antialiasing matches what torchvision's Resize does on tensors and PIL.
        tensor = F.interpolate(
            tensor,
            size=(geometry.resized_height, geometry.resized_width),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )
    tensor = tensor[
        0,
        :,
        geometry.top : geometry.top + image_size,
        geometry.left : geometry.left + image_size,
    ]
    return tensor, geometry
