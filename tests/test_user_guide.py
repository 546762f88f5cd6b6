"""The user guide's walkthrough runs as written, on a small folder of images.

The walkthrough is the code a new user copies first: its ``python`` code
blocks are read from ``docs/user_guide.rst`` and run in order, in one
namespace, in a temporary folder laid out as the guide says, so that a
renamed function or a changed signature fails here instead of in a reader's
notebook.
"""

import ast
import importlib
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "user_guide.rst"
WALKTHROUGH = "Your own images, step by step"


def _section(text, title):
    """The lines of the top-level section ``title``, up to the next one."""
    lines = text.splitlines()
    start = lines.index(title)
    assert set(lines[start + 1]) == {"="}, f"{title!r} is not a section title"
    for end in range(start + 2, len(lines) - 1):
        if lines[end + 1] and set(lines[end + 1]) == {"="} and lines[end].strip():
            return lines[start:end]
    return lines[start:]


def walkthrough_code():
    """The walkthrough's ``.. code-block:: python`` blocks, dedented, in order."""
    lines = _section(GUIDE.read_text(encoding="utf-8"), WALKTHROUGH)
    blocks = []
    for i, line in enumerate(lines):
        if line.strip() != ".. code-block:: python":
            continue
        indent = len(line) - len(line.lstrip())
        body = []
        for following in lines[i + 1 :]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            body.append(following)
        blocks.append(textwrap.dedent("\n".join(body)).strip("\n"))
    return blocks


def test_walkthrough_code_compiles_and_imports_existing_names():
    blocks = walkthrough_code()
    assert len(blocks) >= 8, "the walkthrough's code blocks were not found"
    tree = ast.parse("\n\n".join(blocks))
    imported = [
        (node.module, alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module.startswith("skpatchcore")
        for alias in node.names
    ]
    assert ("skpatchcore", "PatchCoreDetector") in imported
    for module, name in imported:
        assert hasattr(importlib.import_module(module), name), f"{module}.{name}"


def _part(rng, defect=False):
    """A 96 x 96 RGB 'part': a regular grid on a gradient, a dark spot if defective."""
    rows, cols = np.mgrid[0:96, 0:96]
    image = 0.35 + 0.3 * rows / 96 + 0.15 * ((rows // 8 + cols // 8) % 2)
    image = image + rng.normal(scale=0.02, size=image.shape)
    if defect:
        row, col = rng.randint(24, 72, size=2)
        image[(rows - row) ** 2 + (cols - col) ** 2 < 8**2] = 0.02
    rgb = np.stack([image, image * 0.9, image * 0.8], axis=-1)
    return Image.fromarray((255 * np.clip(rgb, 0, 1)).astype(np.uint8))


def _write_parts(folder, rng, n, defect=False):
    folder.mkdir(parents=True)
    for i in range(n):
        _part(rng, defect).save(folder / f"{'bad' if defect else 'ok'}_{i:02d}.png")


@pytest.mark.slow
def test_walkthrough_runs_on_a_folder_of_images(tmp_path, monkeypatch):
    matplotlib = pytest.importorskip("matplotlib")
    for module in ("skops", "onnx", "onnxscript"):
        pytest.importorskip(module)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.RandomState(0)
    parts = tmp_path / "my_parts"
    _write_parts(parts / "good", rng, 10)
    _write_parts(parts / "new", rng, 2)
    for i in range(2):
        _part(rng, defect=True).save(parts / "new" / f"bad_{i:02d}.png")
    _write_parts(parts / "labelled" / "good", rng, 3)
    _write_parts(parts / "labelled" / "defective", rng, 3, defect=True)
    monkeypatch.chdir(tmp_path)

    namespace = {}
    for block in walkthrough_code():
        exec(compile(block, str(GUIDE), "exec"), namespace)
    plt.close("all")

    for name in (
        "least_normal.png",
        "worst_cases.png",
        "detector.joblib",
        "detector.skops",
        "detector.onnx",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    # The spotted parts are the least normal of the new images, and flagged.
    new = [path.name for path in namespace["new"]]
    assert new == ["bad_00.png", "bad_01.png", "ok_00.png", "ok_01.png"]
    scores, flags = namespace["scores"], namespace["flags"]
    assert scores[:2].max() < scores[2:].min()
    assert list(flags[:2]) == [-1, -1]
    # The labelled images are told apart; the threshold chosen on them
    # survived saving and loading with skops.
    good = namespace["scores_labelled"][namespace["y_labelled"] == 1]
    defective = namespace["scores_labelled"][namespace["y_labelled"] == -1]
    assert defective.max() < good.min()
    detector = namespace["detector"]
    assert detector.offset_ == namespace["threshold"]
    np.testing.assert_allclose(
        detector.score_samples(namespace["new"]), scores, rtol=1e-5
    )
