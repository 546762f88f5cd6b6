"""Helpers shared by the benchmark scripts.

Data sets (paths, loading, the notes of those skipped), ELPV training cells
beyond the good ones, the coverage radius of a fitted bank, timers, child
processes and their peak memory, the lines printed above a table and the
markdown tables themselves.

The scripts are run as ``python benchmarks/<name>.py``, which puts this
folder first on ``sys.path``, so they ``import _common`` as it is. torch and
skpatchcore are imported inside the functions that need them, as the scripts
did before: ``--help`` stays instant, and the anomalib worker of
``quality.py`` imports only what it uses under its own interpreter.

The private names of skpatchcore that the benchmarks use are in
``_internals.py``, not here.
"""

import datetime
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# The MVTec-style data sets lie in the `shared` folder beside the repository.
MPDD_FOLDER = os.path.normpath(REPO / ".." / "shared" / "data" / "mpdd_metal_plate")
KOLEKTORSDD_FOLDER = os.path.normpath(REPO / ".." / "shared" / "data" / "kolektorsdd")
ANOMALIB_PYTHON = "/tmp/anomalib-venv/bin/python"

# Every data set a benchmark can run on, by the name its options take, with
# the name its tables print.
DATASETS = {
    "mpdd_metal_plate": "MPDD metal_plate",
    "elpv_mono": "ELPV mono",
    "elpv_poly": "ELPV poly",
    "kolektorsdd": "KolektorSDD",
}
# The data sets read from a folder, and the option (attribute of the parsed
# arguments) that names it.
FOLDERS = {"mpdd_metal_plate": "mpdd", "kolektorsdd": "kolektorsdd"}


# --- Command-line options -------------------------------------------------


def add_split_options(parser):
    """``--train-size`` and ``--n-test`` of the ELPV split, ``--coreset-ratio``
    and ``--batch-size``, as the threshold and calibration studies share them."""
    parser.add_argument(
        "--train-size", type=int, default=100, help="normal ELPV cells to train on"
    )
    parser.add_argument(
        "--n-test",
        type=int,
        default=50,
        help="ELPV test cells of each class, normal and defective",
    )
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=16)


def add_folder_options(parser):
    """``--mpdd``, ``--kolektorsdd`` (the shared folders by default) and
    ``--folder-subset``, which ``load_dataset`` reads."""
    parser.add_argument(
        "--mpdd",
        default=MPDD_FOLDER,
        help="MVTec-style folder of MPDD metal_plate (skipped when absent)",
    )
    parser.add_argument(
        "--kolektorsdd",
        default=KOLEKTORSDD_FOLDER,
        help="MVTec-style folder of KolektorSDD (skipped when absent)",
    )
    parser.add_argument(
        "--folder-subset",
        action="store_true",
        help="cut MPDD and KolektorSDD to their first --train-size training "
        "images and --n-test test images of each class too (plumbing checks); "
        "by default they are used whole",
    )


def int_list(text):
    """Comma-separated integers, for options such as ``--sizes``; '' is none."""
    return [int(item) for item in text.split(",") if item.strip()]


def split_choices(parser, option, value, known):
    """The comma-separated items of ``value``, each one of ``known``."""
    chosen = [item.strip() for item in value.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in known]
    if unknown or not chosen:
        parser.error(f"{option} takes a comma-separated subset of {', '.join(known)}")
    return chosen


# --- Data sets ------------------------------------------------------------


def dataset_notes(names, args):
    """The data sets of ``names`` that can run, and a note for each skipped."""
    runnable, notes = [], []
    for name in names:
        folder = getattr(args, FOLDERS[name]) if name in FOLDERS else None
        if folder is not None and not Path(folder).is_dir():
            notes.append(f"{DATASETS[name]} skipped: no folder {folder}.")
            continue
        if name.startswith("elpv"):
            try:
                import elpv_dataset  # noqa: F401
            except ImportError:
                notes.append(
                    f"{DATASETS[name]} skipped: the elpv-dataset package is not "
                    "installed."
                )
                continue
        runnable.append(name)
    return runnable, notes


def first_images(train, test, labels, masks, n_train=None, n_test=None):
    """The first ``n_train`` training images and ``n_test`` test images of
    each class (None: all of them), test images kept in their order."""
    if n_train is not None:
        train = train[:n_train]
    if n_test is not None:
        keep = np.concatenate([np.flatnonzero(labels == c)[:n_test] for c in (1, -1)])
        keep.sort()
        test = [test[i] for i in keep]
        labels = labels[keep]
        masks = None if masks is None else [masks[i] for i in keep]
    return train, test, labels, masks


def load_dataset(name, args, lazy=False):
    """Train images, test images, test labels (+1/-1) and test masks.

    Images are uint8 arrays, or paths if ``lazy``. Masks are boolean arrays
    (paths if ``lazy``) or None for a good image; the whole list is None when
    the data set has no pixel ground truth. ``args`` gives the folders
    (``mpdd``, ``kolektorsdd``), the ELPV split (``train_size``, ``n_test``,
    ``seed``) and, with ``folder_subset``, cuts the folder data sets to the
    same sizes.
    """
    from skpatchcore.datasets import load_elpv, load_mvtec_folder

    if name in FOLDERS:
        data = load_mvtec_folder(getattr(args, FOLDERS[name]), lazy=lazy)
        loaded = (data.train_images, data.test_images, data.test_labels)
        if not getattr(args, "folder_subset", False):
            return (*loaded, data.test_masks)
        return first_images(*loaded, data.test_masks, args.train_size, args.n_test)
    data = load_elpv(
        name.removeprefix("elpv_"),
        train_size=args.train_size,
        n_test_normal=args.n_test,
        n_test_defective=args.n_test,
        lazy=lazy,
        random_state=args.seed,
    )
    return data.train_images, data.test_images, data.test_labels, None


def load_cells(n_train, args):
    """N training cell paths (copies beyond the good cells), test paths, labels.

    All ELPV cells, mono and poly: ``args.n_test`` good and ``args.n_test``
    defective test cells (split with ``args.seed``), and ``n_train`` of the
    other good cells, shuffled; beyond the good cells the package has,
    flipped and 90-degree-rotated copies of them, written once to
    ``args.cache``.
    """
    from _internals import read_elpv_labels
    from PIL import Image

    from skpatchcore.datasets import load_elpv

    n_normal = int(np.sum(read_elpv_labels()[1] == 0))
    # Every good cell but n_test goes to the training pool.
    data = load_elpv(
        "all",
        train_size=n_normal - args.n_test,
        n_test_normal=args.n_test,
        n_test_defective=args.n_test,
        random_state=args.seed,
    )
    pool = [Path(p) for p in data.train_images]
    pool = [pool[i] for i in np.random.RandomState(args.seed).permutation(len(pool))]
    train = pool[:n_train]
    transforms = [
        Image.Transpose.FLIP_LEFT_RIGHT,
        Image.Transpose.FLIP_TOP_BOTTOM,
        Image.Transpose.ROTATE_90,
        Image.Transpose.ROTATE_180,
        Image.Transpose.ROTATE_270,
        Image.Transpose.TRANSPOSE,
        Image.Transpose.TRANSVERSE,
    ]
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    for k in range(n_train - len(train)):
        transform, source = transforms[k // len(pool)], pool[k % len(pool)]
        path = cache / f"{source.stem}-{transform.name.lower()}.png"
        if not path.exists():
            with Image.open(source) as image:
                image.transpose(transform).save(path)
        train.append(path)
    if len(train) < n_train:
        raise ValueError(f"at most {8 * len(pool)} training cells can be made")
    return train, data.test_images, data.test_labels


# --- Measurements ---------------------------------------------------------


def coverage_radius(detector, train):
    """Largest distance of any training patch to its nearest bank feature."""
    from _internals import fitted_searcher

    searcher = fitted_searcher(detector)
    radius = 0.0
    for features, _ in detector.feature_extractor_.iter_batches(train):
        distances, _ = searcher.kneighbors(features.reshape(-1, features.shape[-1]), 1)
        radius = max(radius, float(distances.max()))
    return radius


def timed(function):
    """The result of ``function()`` and its wall time in seconds."""
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def best_of(repeats, function):
    """Smallest wall time of ``repeats`` calls, in seconds."""
    return min(timed(function)[1] for _ in range(repeats))


def alternating(repeats, variants):
    """Best wall time and last result of each variant, their passes alternating.

    ``variants`` maps a name to a function of no arguments. Alternating
    spreads load from other processes over all variants alike.
    """
    times, found = {name: [] for name in variants}, {}
    for _ in range(repeats):
        for name, run in variants.items():
            found[name], seconds = timed(run)
            times[name].append(seconds)
    return {name: min(t) for name, t in times.items()}, found


def peak_rss_mib():
    """Peak resident set size of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_child(command):
    """Run ``command``; return its exit code, wall seconds and peak RSS (MiB)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO)
    # wait4 gives the resource usage of this child alone (RUSAGE_CHILDREN
    # would be the maximum over every child so far).
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, time.perf_counter() - start, usage.ru_maxrss / 1024.0


def anomalib_status(python):
    """None when ``python`` imports anomalib, else why it cannot be used."""
    if not Path(python).is_file():
        return f"no interpreter {python}"
    check = subprocess.run(
        [python, "-c", "import anomalib; print(anomalib.__version__)"],
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        return f"{python} cannot import anomalib"
    return None


# --- Printed output -------------------------------------------------------


def markdown_row(cells):
    """One row of a markdown table; an empty cell prints as ``| |``."""
    return "|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|"


def markdown_table(headers, cell_rows, align=None):
    """A markdown table of ``headers`` over rows of string cells.

    ``align`` has one letter per column, ``l`` or ``r`` (right-aligned,
    for numbers); None leaves every column to the renderer.
    """
    rule = "|".join("---:" if a == "r" else "---" for a in align or "l" * len(headers))
    lines = [markdown_row(headers), f"|{rule}|"]
    lines += [markdown_row(cells) for cells in cell_rows]
    return "\n".join(lines)


def command_line(script, argv):
    """How ``script`` was run with ``argv`` (None: this process's arguments)."""
    arguments = sys.argv[1:] if argv is None else argv
    return "python " + shlex.join([os.path.relpath(script, REPO), *arguments])


def print_run_facts(command, settings):
    """Print the date, command, machine and settings lines above a table."""
    print()
    print(f"Date: {datetime.date.today().isoformat()}")
    print(f"Command: {command}")
    print(f"Machine: {machine_note()}")
    print(f"Settings: {settings}")


def machine_note():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return f"{cpu}, {cores or os.cpu_count()} usable cores, {platform.platform()}"
