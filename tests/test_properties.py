"""Property-based tests of input validation.

Whatever is passed as images, a fitted detector either returns finite
results of the right shape or raises a ValueError or TypeError of its own
that names the input; never an error from deep inside torch, NumPy or PIL.
Inputs that the documented rules accept must be accepted.
"""

import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

import skpatchcore
from skpatchcore import PatchCoreDetector

# Hundreds of examples, each through a real backbone: seconds in all.
pytestmark = pytest.mark.slow

# Tiny model inputs keep every example to a few milliseconds.
TINY_PARAMS = dict(
    backbone="efficientnet_lite0",
    image_size=32,
    resize=None,
    feature_dim=16,
    coreset_ratio=0.5,
    random_state=0,
)

DTYPES = (
    "uint8",
    "uint16",
    ">u2",
    "float32",
    "float64",
    "bool",
    "int64",
    "complex128",
    "object",
)
# How the values of an array are drawn: within the range of its dtype (for
# floats [0, 1]), outside it, or with a NaN or an infinity.
REGIMES = ("in range", "out of range", "nan", "inf")

PACKAGE = Path(skpatchcore.__file__).resolve().parent
NAMES_THE_INPUT = re.compile(r"\bX\b|\b[Ii]mages?\b")


def make_array(shape, dtype, regime, seed):
    """An array of ``shape`` and ``dtype`` with values drawn as ``regime`` says."""
    rng = np.random.default_rng(seed)
    if dtype in ("uint8", "uint16", ">u2", "int64"):
        high = {"uint8": 256, "int64": 256}.get(dtype, 65536)
        values = np.asarray(rng.integers(0, high, shape))
        if dtype == "int64" and regime == "out of range":
            values -= 1000
        return values.astype(dtype)
    values = np.asarray(rng.random(shape))
    if dtype == "bool":
        return values > 0.5
    if regime == "out of range":
        values = 4 * values - 2
    elif regime in ("nan", "inf") and values.size:
        values.flat[rng.integers(values.size)] = np.nan if regime == "nan" else np.inf
    if dtype == "complex128":
        return values + 1j * rng.random(shape)
    return values.astype(dtype)


def in_range(array):
    """Whether the dtype and values of ``array`` are those of an image."""
    if array.dtype.kind == "u" and array.dtype.itemsize in (1, 2):
        return True
    if array.dtype.kind != "f":
        return False
    return bool(np.all(np.isfinite(array)) and np.all((array >= 0) & (array <= 1)))


def valid_image(array):
    """Whether ``array`` is one valid image, as an item of a list."""
    shape = array.shape
    return (
        in_range(array)
        and (array.ndim == 2 or (array.ndim == 3 and shape[2] in (1, 3, 4)))
        and min(shape[:2]) >= 1
    )


def valid_batch(array):
    """Whether ``array`` is a valid stack of images (the rule of check_images)."""
    if array.ndim not in (3, 4) or array.shape[0] == 0:
        return False
    if array.ndim == 3 and array.shape[2] in (3, 4):
        # One colour image without its batch axis is refused.
        if min(array.shape[:2]) > array.shape[2]:
            return False
    return valid_image(array[0]) and in_range(array)


@st.composite
def arrays(draw, batch, wellformed):
    """An array of any listed dtype and shape; ``wellformed`` ones are images.

    A well-formed array has the commonest image dtypes, values in range and
    sides of at least one pixel, so that valid inputs are drawn as often as
    invalid ones.
    """
    sides = st.integers(1, 10) if wellformed else st.integers(0, 10)
    head = (draw(st.integers(1 if wellformed else 0, 3)),) if batch else ()
    shape = head + (draw(sides), draw(sides))
    channels = draw(st.sampled_from((None, 1, 3, 4) + (() if wellformed else (2, 5))))
    if channels is not None:
        shape += (channels,)
    if not wellformed and draw(st.integers(0, 4)) == 0:
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=5)))
    return make_array(
        shape,
        draw(st.sampled_from(("uint8", "float32") if wellformed else DTYPES)),
        "in range" if wellformed else draw(st.sampled_from(REGIMES)),
        draw(st.integers(0, 2**16)),
    )


def items(wellformed):
    """Items of a list: (kind, payload, valid); files are made by ``files``."""
    valid_items = [
        arrays(False, wellformed).map(lambda a: ("array", a, valid_image(a))),
        arrays(False, wellformed).map(lambda a: ("pil", a, valid_image(a))),
        st.just(("file", "good.png", True)),
    ]
    if wellformed:
        return st.one_of(valid_items)
    return st.one_of(
        *valid_items,
        st.just(("file", "broken.png", False)),
        st.just(("file", "missing.png", False)),
        st.just(("file", "float.tif", False)),
        st.just(("closed pil", None, False)),
        st.sampled_from([3, None, 1.5, b"bytes"]).map(lambda v: ("object", v, False)),
        arrays(False, False).map(lambda a: ("nested list", a.tolist(), False)),
    )


CONTAINERS = ("list", "tuple", "generator")


@st.composite
def inputs(draw):
    """(kind, payload, n_images, valid) of one input X."""
    wellformed = draw(st.booleans())
    kinds = ("ndarray", *CONTAINERS, "mixed")
    if not wellformed:
        kinds += ("dict", "missing path")
    kind = draw(st.sampled_from(kinds))
    if kind == "ndarray":
        array = draw(arrays(True, wellformed))
        n = array.shape[0] if array.ndim else 0
        return kind, array, n, valid_batch(array)
    if kind in CONTAINERS:
        payload = draw(st.lists(arrays(False, wellformed), max_size=3))
        valid = bool(payload) and all(valid_image(a) for a in payload)
        return kind, payload, len(payload), valid
    if kind == "mixed":
        payload = draw(st.lists(items(wellformed), min_size=1, max_size=3))
        return kind, payload, len(payload), all(valid for _, _, valid in payload)
    if kind == "dict":
        payload = draw(st.lists(arrays(False, False), min_size=1, max_size=2))
        return kind, {f"{i}.png": a for i, a in enumerate(payload)}, len(payload), False
    return kind, "missing.png", 1, False


def build(case, folder):
    """A fresh X for ``case``; generators are single-use."""
    kind, payload, _, _ = case
    if kind == "list":
        return list(payload)
    if kind == "tuple":
        return tuple(payload)
    if kind == "generator":
        return (item for item in payload)
    if kind == "missing path":
        return str(folder / payload)
    if kind != "mixed":
        return payload
    X = []
    for item_kind, value, _ in payload:
        if item_kind == "file":
            X.append(folder / value)
        elif item_kind == "pil":
            X.append(to_pil(value))
        elif item_kind == "closed pil":
            image = Image.fromarray(np.zeros((4, 4), np.uint8))
            image.close()
            X.append(image)
        else:
            X.append(value)
    return X


def to_pil(array):
    """A PIL image of ``array`` where PIL has a mode for it, else the array."""
    try:
        return Image.fromarray(array)
    except (TypeError, ValueError, KeyError):
        return array


def check_outcome(call, X, n_images, valid):
    """The property: finite results of the right shape, or our own clear error."""
    try:
        result = call(X)
    # FileNotFoundError: a path that names nothing, as the built-in open says.
    except (ValueError, TypeError, FileNotFoundError) as error:
        assert not valid, f"valid input refused: {error}"
        traceback = error.__traceback__
        while traceback.tb_next is not None:
            traceback = traceback.tb_next
        origin = Path(traceback.tb_frame.f_code.co_filename).resolve()
        assert PACKAGE in origin.parents, f"raised in {origin}: {error!r}"
        assert NAMES_THE_INPUT.search(str(error)), str(error)
        return
    assert result.shape == (n_images,)
    assert np.all(np.isfinite(result))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A folder with a good, a broken and an out-of-range image file."""
    folder = tmp_path_factory.mktemp("images")
    Image.fromarray(np.full((6, 7), 120, np.uint8)).save(folder / "good.png")
    (folder / "broken.png").write_bytes(b"not a png")
    Image.fromarray(np.full((6, 7), 2.5, np.float32)).save(folder / "float.tif")
    return folder


@pytest.fixture(scope="module")
def tiny_detector():
    """A detector fitted on four tiny textured images; do not modify it."""
    rng = np.random.default_rng(0)
    base = rng.integers(90, 160, (1, 12, 12), np.uint8)
    noise = rng.integers(-8, 9, (4, 12, 12))
    images = np.clip(base + noise, 0, 255).astype(np.uint8)
    return PatchCoreDetector(**TINY_PARAMS).fit(images)


# Big-endian 16-bit images were once refused.
BIG_ENDIAN = make_array((2, 5, 6), ">u2", "in range", 0)
GOOD_STACK = make_array((3, 8, 8), "uint8", "in range", 0)


@settings(max_examples=40, deadline=None)
@given(case=inputs(), method=st.sampled_from(("score_samples", "predict")))
@example(case=("ndarray", BIG_ENDIAN, 2, True), method="score_samples")
@example(case=("list", list(BIG_ENDIAN), 2, True), method="score_samples")
def test_scoring_returns_results_or_names_the_input(tiny_detector, files, case, method):
    _, _, n_images, valid = case
    check_outcome(getattr(tiny_detector, method), build(case, files), n_images, valid)


@settings(max_examples=6, deadline=None)
@given(case=inputs())
@example(case=("generator", list(GOOD_STACK), 3, True))
def test_fit_succeeds_or_names_the_input(files, case):
    _, _, n_images, _ = case

    def fit(X):
        detector = PatchCoreDetector(**TINY_PARAMS).fit(X)
        return np.full(detector.n_train_images_, detector.offset_)

    # fit needs two images and may find nothing to calibrate on: an input
    # that is valid for scoring may still be refused here, with a message.
    check_outcome(fit, build(case, files), n_images, valid=False)
