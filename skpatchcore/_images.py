"""Image input: validation at the boundary, loading, and the resize/crop geometry.

Every public method of the estimator accepts the same kinds of ``X``; this
module turns any of them into a list of *image sources* (arrays or file paths)
that are loaded lazily, batch by batch, so that a folder of large images never
has to sit in memory at once.
"""

import math
import numbers
import os
from collections.abc import Mapping, Set
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import sparse

from ._image_folders import image_files_of

_CHANNELS = (1, 3, 4)

# Above this many pixels, an upscaled image is refused rather than resized:
# 2**24 pixels are 200 MB as float32 RGB.
_MAX_RESIZED_PIXELS = 2**24

# What PIL raises on files it cannot decode: unknown formats and missing files
# (OSError), broken chunks (SyntaxError), truncated data (EOFError, OSError),
# bad header values (ValueError) and decompression bombs.
_DECODING_ERRORS = (
    OSError,
    SyntaxError,
    EOFError,
    ValueError,
    Image.DecompressionBombError,
)


@dataclass(frozen=True)
class LazyImage:
    """An image of ``X`` that is decoded only when loaded.

    ``image`` is a ``Path`` or a PIL image; ``position`` is its index in
    ``X``, which errors found while decoding it name.
    """

    image: object
    position: int

    def describe(self):
        """The subject of an error message: the position, and the path if any."""
        if isinstance(self.image, Path):
            return f"Image {self.position} of X, {str(self.image)!r},"
        return f"Image {self.position} of X (a PIL image in mode {self.image.mode!r})"


@dataclass(frozen=True)
class Geometry:
    """Where the model input sits inside an original image.

    The original ``height x width`` image is resized to
    ``resized_height x resized_width``; the model sees the
    ``crop_height x crop_width`` window whose top-left corner is at
    ``(top, left)`` of the resized image (all of it, unless cropped).
    """

    height: int
    width: int
    resized_height: int
    resized_width: int
    top: int
    left: int
    crop_height: int
    crop_width: int


def image_size_pair(image_size):
    """``(height, width)`` of the model input that ``image_size`` sets."""
    if isinstance(image_size, numbers.Integral):
        return int(image_size), int(image_size)
    height, width = image_size
    return int(height), int(width)


def _round_to_multiple(length, multiple, limit):
    """``length`` to the nearest positive multiple of ``multiple``, at most ``limit``.

    The limit is kept as far as one ``multiple`` allows.
    """
    count = max(1, math.floor(length / multiple + 0.5))
    if limit is not None:
        count = max(1, min(count, limit // multiple))
    return count * multiple


def input_geometry(
    height, width, image_size, resize, *, size_multiple=1, max_image_size=None
):
    """Geometry of the resize (and centre crop) applied to one image.

    ``image_size`` is the side of a square model input, or its ``(height,
    width)``. ``resize=None`` resizes the image to exactly that size (no
    crop); an int resizes the shorter side to ``resize`` (aspect ratio kept)
    and crops the centre window of that size. ``resize="keep_aspect"``
    resizes the shorter side to ``image_size`` (an int) and the longer side
    in proportion, scaled down further if the longer side would exceed
    ``max_image_size``; both sides are then rounded to a multiple of
    ``size_multiple`` (the longer one never above ``max_image_size``), and
    nothing is cropped.
    """
    if isinstance(resize, str):
        scale = image_size / min(height, width)
        if max_image_size is not None:
            scale = min(scale, max_image_size / max(height, width))
        resized_height, resized_width = (
            _round_to_multiple(side * scale, size_multiple, max_image_size)
            for side in (height, width)
        )
        return Geometry(
            height,
            width,
            resized_height,
            resized_width,
            0,
            0,
            resized_height,
            resized_width,
        )
    crop_height, crop_width = image_size_pair(image_size)
    if resize is None:
        return Geometry(
            height, width, crop_height, crop_width, 0, 0, crop_height, crop_width
        )
    if height <= width:
        resized_height, resized_width = resize, max(1, int(resize * width / height))
    else:
        resized_height, resized_width = max(1, int(resize * height / width)), resize
    top = int(round((resized_height - crop_height) / 2.0))
    left = int(round((resized_width - crop_width) / 2.0))
    return Geometry(
        height,
        width,
        resized_height,
        resized_width,
        top,
        left,
        crop_height,
        crop_width,
    )


def reusable_sources(sources):
    """Validated image sources as ``X`` gave them, to be read again elsewhere.

    ``X`` is validated once; its images then go, as they came (arrays, file
    paths, PIL images), to other estimators or processes, which can read
    them again, where an iterator would be used up and a folder listed
    anew. A file path comes back as a ``Path``.
    """
    return [
        source.image if isinstance(source, LazyImage) else source
        for source in sources
    ]


def check_images(X):
    """Validate ``X`` and return it as a list of image sources.

    Parameters
    ----------
    X : array-like, list or folder
        A uint8/uint16/float array of shape (n, H, W) or (n, H, W, C) with C
        in {1, 3, 4}, a list, tuple or iterator (or 1-D object array) whose
        items are such 2-D/3-D arrays, PIL images or image file paths (str or
        path-like), or the path of a folder, which stands for its image files
        sorted by name, or a glob pattern such as ``"images/*.png"``, which
        stands for the image files it matches, sorted. Byte order does not
        matter. A 3-D array whose last axis has 3 or 4 entries, fewer than
        each of its first two, is refused as ambiguous: it reads as one
        colour image (H, W, C) rather than a stack of grayscale images 3 or 4
        pixels wide.

    Returns
    -------
    sources : list
        One item per image: a validated ndarray, or a :class:`LazyImage`
        holding a PIL image or a ``Path`` with its position in ``X``.
        In-memory arrays are checked here in full (dtype, shape, finite,
        range); files are checked for existence here, and files and PIL
        images are decoded and checked later by :func:`load_image`.
    """
    if isinstance(X, (str, os.PathLike)):
        X = image_files_of(X)
    if isinstance(X, Image.Image):
        raise TypeError(
            "X must be a collection of images; wrap one PIL image in a list."
        )
    if sparse.issparse(X):
        raise TypeError(
            f"X is a sparse {type(X).__name__}; sparse input is not supported: "
            "pass images as dense arrays."
        )
    if isinstance(X, Mapping):
        raise TypeError(
            f"X is a {type(X).__name__}, whose keys would be read as images: "
            "pass the images themselves as a list, such as list(X.values())."
        )
    if isinstance(X, Set):
        raise TypeError(
            f"X is a {type(X).__name__}, which has no order, so results could "
            "not be matched to images: pass a list, such as sorted(X)."
        )
    if isinstance(X, np.ndarray) and X.ndim == 1 and X.dtype.kind in "OUS":
        # A 1-D array of paths or of images of different sizes, as fancy
        # indexing of a list makes them.
        X = list(X)
    if isinstance(X, np.ndarray):
        _check_batch_shape(X)
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
                missing.append(f"image {index} ({str(path)!r})")
            sources.append(LazyImage(path, index))
        elif isinstance(item, Image.Image):
            sources.append(LazyImage(item, index))
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
        hint = ""
        if any(character in shown for character in "*?["):
            hint = (
                ". A glob pattern is expanded when it is X itself, not an item "
                "of a list: pass X='images/*.png', not ['images/*.png']"
            )
        raise ValueError(
            f"{len(missing)} image file(s) of X do not exist: {shown}{hint}"
        )
    return sources


def _check_batch_shape(X):
    """Check the shape of an array that stacks images along its first axis."""
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
    n_channels = X.shape[-1]
    if X.ndim == 3 and n_channels in (3, 4) and min(X.shape[:2]) > n_channels:
        kind = "RGB" if n_channels == 3 else "RGBA"
        raise ValueError(
            f"X has shape {X.shape}, which looks like one {kind} image (height, "
            f"width, channels) rather than {X.shape[0]} grayscale images "
            f"{n_channels} pixels wide: pass one colour image as X[np.newaxis] "
            "or [X], and grayscale images that narrow with a channel axis, "
            "X[..., np.newaxis]."
        )


def _check_array_image(image, index, batch=None):
    """Check one in-memory image; ``batch`` is the whole (n, ...) array if any."""
    array = image if batch is None else batch
    where = "X" if batch is not None else f"Image {index} of X"
    if _is_unsigned(array.dtype, 1) or _is_unsigned(array.dtype, 2):
        pass
    elif array.dtype.kind == "f":
        _check_unit_range(array, where, "a float image")
    else:
        raise TypeError(
            f"{where} has dtype {array.dtype}; images must be uint8, uint16 or "
            "float in [0, 1]."
        )
    shape = image.shape
    if image.ndim not in (2, 3) or (image.ndim == 3 and shape[2] not in _CHANNELS):
        hint = ""
        if image.ndim == 3 and shape[0] in _CHANNELS:
            hint = (
                " Channels come last: transpose channels-first images, such as "
                "X.transpose(0, 2, 3, 1) for an (n, C, H, W) array."
            )
        raise ValueError(
            f"Image {index} of X has shape {shape}; expected (height, width) or "
            f"(height, width, channels) with 1, 3 or 4 channels.{hint}"
        )
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"Image {index} of X has an empty side: shape {shape}.")


def _is_unsigned(dtype, itemsize):
    """Whether ``dtype`` is an unsigned integer of ``itemsize`` bytes, either order."""
    return dtype.kind == "u" and dtype.itemsize == itemsize


def _check_unit_range(array, where, kind):
    """Refuse NaN, infinity and values outside [0, 1] in a float image."""
    if array.size == 0:
        return
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{where} contains NaN or infinity.")
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"{where} is {kind} with values in [{low:g}, {high:g}]; float images "
            "must lie in [0, 1] (pass uint8 for 0-255 data, uint16 for "
            "0-65535)."
        )


def load_image(source):
    """Return one image source as a float32 RGB array (H, W, 3) in [0, 1].

    ``source`` is a validated array or a :class:`LazyImage`. uint8 values are
    divided by 255 and uint16 values by 65535; float values are kept. Files
    and PIL images follow their mode: 16-bit and 32-bit integer images
    (modes ``"I;16"``, ``"I"``) are read as 16-bit data, divided by 65535,
    and must lie in 0-65535; 32-bit float images (mode ``"F"``) must lie in
    [0, 1], as float arrays must; every other mode is converted to 8-bit
    RGB. Grayscale is repeated over three channels; the alpha channel is
    dropped (the colour values are kept as stored).
    """
    if isinstance(source, LazyImage):
        array = _decode(source)
    else:
        array = source
        if _is_unsigned(array.dtype, 1):
            array = array.astype(np.float32) / 255.0
        elif _is_unsigned(array.dtype, 2):
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


def source_shape(source):
    """``(height, width)`` of one validated image source.

    A file's size is read from its header, without decoding its pixels.
    """
    if not isinstance(source, LazyImage):
        return source.shape[:2]
    image = source.image
    if isinstance(image, Path):
        try:
            with Image.open(image) as opened:
                width, height = opened.size
        except _DECODING_ERRORS as exc:
            raise ValueError(f"{source.describe()} cannot be read: {exc}") from exc
    else:
        width, height = image.size
    return height, width


def _decode(source):
    """Pixels of a file or PIL image as float32 (H, W) or (H, W, 3) in [0, 1]."""
    where = source.describe()
    image = source.image
    try:
        if isinstance(image, Path):
            with Image.open(image) as opened:
                opened.load()
                image = opened.copy()
        if image.mode == "F" or image.mode == "I" or image.mode.startswith("I;16"):
            array = np.asarray(image)
        else:
            array = np.asarray(image.convert("RGB"))
    except _DECODING_ERRORS as exc:
        raise ValueError(f"{where} cannot be read: {exc}") from exc
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{where} has an empty side: shape {array.shape[:2]}.")
    if image.mode == "F":
        _check_unit_range(array, where, "a 32-bit float image (PIL mode 'F')")
        return array.astype(np.float32)
    if array.dtype.kind in "iu" and array.dtype.itemsize > 1:
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 65535:
            raise ValueError(
                f"{where} is an integer image (PIL mode {image.mode!r}) with "
                f"values in [{low}, {high}]; integer images are read as 16-bit "
                "data and must lie in 0-65535 (save it as 16-bit, or as float "
                "in [0, 1])."
            )
        return array.astype(np.float32) / 65535.0
    return array.astype(np.float32) / 255.0


def to_model_input(image, image_size, resize, *, size_multiple=1, max_image_size=None):
    """Resize and crop one loaded image; return (tensor (3, h, w), geometry).

    The parameters are those of :func:`input_geometry`.
    """
    height, width = image.shape[:2]
    geometry = input_geometry(
        height,
        width,
        image_size,
        resize,
        size_multiple=size_multiple,
        max_image_size=max_image_size,
    )
    crop_height, crop_width = geometry.crop_height, geometry.crop_width
    if geometry.resized_height < crop_height or geometry.resized_width < crop_width:
        if isinstance(image_size, numbers.Integral):
            raise ValueError(
                f"resize={resize} is smaller than image_size={image_size}: the "
                "centre crop would not fit inside the resized image."
            )
        raise ValueError(
            f"An image of X of {height} x {width} pixels is resized to "
            f"{geometry.resized_height} x {geometry.resized_width} pixels, as "
            f"resize={resize} sets its shorter side, which cannot hold the "
            f"centre {crop_height} x {crop_width} window of image_size="
            f"{image_size}. Raise resize, swap the sides of image_size for "
            "images of the other orientation, or pass resize=None, which "
            "resizes every image to image_size."
        )
    n_resized = geometry.resized_height * geometry.resized_width
    if n_resized > max(height * width, _MAX_RESIZED_PIXELS):
        size = f"({n_resized * 12 / 1e9:.1f} GB)"
        if isinstance(resize, str):
            raise ValueError(
                f"An image of X of {height} x {width} pixels would be resized "
                f"to {geometry.resized_height} x {geometry.resized_width} pixels "
                f"{size}, as resize={resize!r} sets its shorter side to "
                f"image_size={image_size}. Pass max_image_size to cap its "
                "longer side, or crop such elongated images into pieces first."
            )
        # Resizing the shorter side of a very elongated image to ``resize``
        # stretches the longer side by the same factor, although only the
        # centre crop is used.
        raise ValueError(
            f"An image of X of {height} x {width} pixels would be resized to "
            f"{geometry.resized_height} x {geometry.resized_width} pixels "
            f"{size} before its centre {crop_height} x {crop_width} crop, as "
            f"resize={resize} sets its shorter side. Crop such elongated "
            "images into pieces first, or pass resize=None, which resizes "
            "every image to image_size."
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
        geometry.top : geometry.top + crop_height,
        geometry.left : geometry.left + crop_width,
    ]
    return tensor, geometry
