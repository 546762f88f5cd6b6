"""Image files named by a folder or a glob pattern, and what to say when none are.

``X`` given as a string or path stands for the image files of a folder, or for
the files a glob pattern matches; a mistake here (a missing folder, a folder
whose images sit in sub-folders, a pattern that matches nothing) is answered
with the path and what to pass instead.
"""

import glob
import os
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# How many sub-folders with images a message names, and how deep it looks:
# MVTec's category/test/<defect type> is two levels down.
_SHOWN_SUBFOLDERS = 3
_SEARCH_DEPTH = 3
# A bound on the folders looked into per level, so that a huge tree answers
# quickly.
_MAX_VISITED = 200


def _is_image_file(path):
    # Hidden files are skipped because archives made on macOS carry
    # "._name.png" resource forks that are not images.
    return (
        path.is_file()
        and not path.name.startswith(".")
        and path.suffix.lower() in IMAGE_SUFFIXES
    )


def list_image_files(folder):
    """The image files directly inside ``folder``, sorted by name."""
    return sorted(path for path in Path(folder).iterdir() if _is_image_file(path))


def _subfolders_with_images(folder):
    """A few sub-folders of ``folder`` that hold images, relative to it.

    Those of images to train on come first (a "train", then a "good" folder
    in the path, as MVTec's ``train/good``), then the shallower, then by
    name.
    """
    found, level = [], [Path(folder)]
    for _ in range(_SEARCH_DEPTH):
        level = [
            child
            for parent in level
            for child in parent.iterdir()
            if child.is_dir() and not child.name.startswith(".")
        ][:_MAX_VISITED]
        found += [
            child.relative_to(folder)
            for child in level
            if any(_is_image_file(path) for path in child.iterdir())
        ]

    def order(relative):
        parts = {part.lower() for part in relative.parts}
        return (
            "train" not in parts,
            "good" not in parts,
            len(relative.parts),
            relative.as_posix(),
        )

    return [relative.as_posix() for relative in sorted(found, key=order)][
        :_SHOWN_SUBFOLDERS
    ]


def _has_glob_characters(text):
    return any(character in text for character in "*?[")


def image_files_of(X):
    """The image files that the string or path ``X`` stands for, as Paths.

    A folder stands for its image files, sorted by name; a glob pattern (with
    ``*``, ``?`` or ``[``, ``**`` for any depth) for the image files it
    matches, sorted. Raises ``TypeError`` for one image file,
    ``FileNotFoundError`` for a path or pattern that names nothing, and
    ``ValueError`` for a folder or pattern without image files.
    """
    text = os.fspath(X)
    path = Path(text)
    if path.is_dir():
        files = list_image_files(path)
        if files:
            return files
        message = (
            f"X is the folder {text!r}, which holds no image files "
            f"({', '.join(IMAGE_SUFFIXES)}) at its top; sub-folders are not "
            "searched."
        )
        subfolders = _subfolders_with_images(path)
        if subfolders:
            shown = ", ".join(repr(name) for name in subfolders)
            message += (
                f" Sub-folders with images: {shown}; pass one of them, such "
                f"as {str(path / subfolders[0])!r}."
            )
        raise ValueError(message)
    if path.is_file():
        raise TypeError(
            f"X is the file {text!r}; X must be a collection of images or a "
            "folder of image files: to pass one image file, wrap it in a list: "
            f"[{text!r}]."
        )
    if _has_glob_characters(text):
        matches = sorted(glob.glob(text, recursive=True))
        if not matches:
            raise FileNotFoundError(
                f"X is the pattern {text!r}, which matches no file."
            )
        files = [Path(match) for match in matches if _is_image_file(Path(match))]
        if not files:
            raise ValueError(
                f"X is the pattern {text!r}, whose {len(matches)} match(es), "
                f"such as {matches[0]!r}, include no image file "
                f"({', '.join(IMAGE_SUFFIXES)})."
            )
        return files
    raise FileNotFoundError(
        f"X is {text!r}, which does not exist: pass an existing folder of "
        "images, a glob pattern such as 'images/*.png', or a list of images."
    )
