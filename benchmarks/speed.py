"""Speed of the parts of skpatchcore that dominate fit and predict time.

Run ``python benchmarks/speed.py``; it prints one markdown table per part,
each with side-by-side timings and their ratio, measured in this one run.

* Greedy coreset: one CPU thread in the selection loop (what skpatchcore
  does) against the process's default thread count (random data).
* Nearest-neighbour search for patch scores: exact blocked search against a
  pynndescent index (random data; index build excluded, reported
  separately).
* Approximate indexes on real patch features: memory banks of every size in
  ``--bank-sizes`` made of the EfficientNet-Lite0 patch features (224 x 224
  input, 784 patches per cell) of good ELPV cells, all patches kept (cells
  beyond the good ones are flipped and rotated copies, as in ``scale.py``).
  50 good and 50 defective ELPV test cells are scored against each bank as
  ``PatchCoreDetector.score_samples`` does (nearest bank feature of every
  patch, then the re-weighting of eq. 7), by exact search and by each index,
  batch by batch in turn. Per bank size and index: build seconds, search
  milliseconds per test image, speedup over exact search, recall@1 (test
  patches given a neighbour at the exact nearest distance), the largest
  image-score difference, both image AUROCs, and the number of test images
  after which the index has saved its build time. pynndescent's
  compilation by numba, once per process, is timed apart.
* Prediction stages on the CPU, each against what it replaced, on the same
  inputs in alternating passes: ranking the nearest bank entry by int8
  products against float32 ones (real ELPV patch features; a bank of
  ``--ranking-bank`` patches, the patches of 16 test cells as queries;
  whether the neighbours and distances are identical); selecting each
  query's candidates by ``torch.topk`` over every bank row against
  the bank's ``smallest_per_row``, and ranking tiles of
  2,048 queries against 1,024 (same inputs, int8 ranking); the Lite0
  backbone with its batch norms folded into the convolutions against the
  backbone as loaded (16 images; the largest feature difference), and the
  16 images in one pass against passes of a few
  (``_CPU_PIXELS_PER_THREAD``); anomaly maps of 16
  grids of patch distances upsampled and Gaussian-filtered map by map
  (SciPy) against one operator matrix per axis
  (the package's ``model_input_maps``).
* Keeping an inverted file current when ``partial_fit`` adds entries: the
  index of the first entries of a bank of real patch features extended by
  the next ones (``--extend-sizes``), against an index built on all of
  them; seconds, search milliseconds per test cell and recall@1 of each.

Usage, from the repository root::

    python benchmarks/speed.py
    python benchmarks/speed.py --parts index --bank-sizes 10000,100000
    python benchmarks/speed.py --parts prediction --repeats 7
"""

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from _common import (
    alternating,
    best_of,
    command_line,
    int_list,
    load_cells,
    markdown_table,
    print_run_facts,
)
from _internals import (
    CANDIDATE_SELECTION,
    CPU_PIXELS_PER_THREAD,
    INT8_RANKING,
    QUERY_TILE,
    MemoryBank,
    extractor_networks,
    greedy_steps,
    model_input_maps,
    score_features,
)

PATCHES_PER_CELL = 784
# Test cells per scoring call: PatchCoreDetector's default batch_size.
SCORE_BATCH = 16


def coreset_table(n_points, dim, ratio, repeats):
    points = torch.from_numpy(
        np.random.default_rng(0).normal(size=(n_points, dim)).astype(np.float32)
    )
    n_samples = int(ratio * n_points)
    default_threads = torch.get_num_threads()

    def run(threads):
        torch.set_num_threads(threads)
        try:
            return best_of(repeats, lambda: greedy_steps(points, n_samples, 0))
        finally:
            torch.set_num_threads(default_threads)

    one, default = run(1), run(default_threads)
    print(f"\n### Greedy coreset: {n_points} x {dim} points, {n_samples} chosen\n")
    headers = ("one thread (s)", "default threads (s)", "default / one")
    cells = (f"{one:.2f}", f"{default:.2f} ({default_threads})", f"{default / one:.2f}")
    print(markdown_table(headers, [cells], align="rrr"))


def search_table(n_bank, n_queries, dim, repeats):
    rng = np.random.default_rng(1)
    bank = rng.normal(size=(n_bank, dim)).astype(np.float32)
    queries = rng.normal(size=(n_queries, dim)).astype(np.float32)
    exact = MemoryBank(bank)
    start = time.perf_counter()
    approximate = MemoryBank(bank, algorithm="pynndescent", random_state=0)
    build = time.perf_counter() - start
    approximate.kneighbors(queries[:10], 1)  # compile numba code once
    t_exact = best_of(repeats, lambda: exact.kneighbors(queries, 1))
    t_approx = best_of(repeats, lambda: approximate.kneighbors(queries, 1))
    agree = np.mean(
        exact.kneighbors(queries, 1)[1] == approximate.kneighbors(queries, 1)[1]
    )
    print(f"\n### 1-NN search: bank {n_bank} x {dim}, {n_queries} queries\n")
    headers = (
        "exact (s)",
        "pynndescent (s)",
        "exact / pynndescent",
        "same neighbour",
        "index build (s)",
    )
    cells = (
        f"{t_exact:.3f}",
        f"{t_approx:.3f}",
        f"{t_exact / t_approx:.2f}",
        f"{agree:.3f}",
        f"{build:.1f}",
    )
    print(markdown_table(headers, [cells], align="rrrrr"))


def cell_features(n_cells, args):
    """Lite0 patch features of ``n_cells`` good training cells and the test cells.

    Returns ``(train, test, labels)``: arrays of shape (n_cells, 784, 152)
    and (n_test, 28, 28, 152), and the test labels (+1 good, -1 defective).
    The features are kept in ``--cache`` and read from there next time.
    """
    from skpatchcore import PatchFeatureExtractor

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    stored = cache / f"features-{n_cells}-{args.n_test}-{args.seed}.npz"
    if stored.exists():
        with np.load(stored) as saved:
            return saved["train"], saved["test"], saved["labels"]
    cells, test_cells, labels = load_cells(n_cells, args)
    extractor = PatchFeatureExtractor(
        backbone="efficientnet_lite0", image_size=224, resize=None, device="cpu"
    ).fit()
    test = extractor.transform(test_cells)
    train = np.empty((n_cells, PATCHES_PER_CELL, test.shape[-1]), np.float32)
    done = 0
    for features, _ in extractor.iter_batches(cells, batch_size=32):
        train[done : done + len(features)] = features.reshape(
            len(features), PATCHES_PER_CELL, -1
        )
        done += len(features)
    labels = np.asarray(labels)
    np.savez(stored, train=train, test=test, labels=labels)
    return train, test, labels


class RecordingBank:
    """A memory bank that keeps the 1-NN distances it returns, in order."""

    def __init__(self, bank):
        self.bank = bank
        self.features = bank.features
        self.nearest = []

    def kneighbors(self, queries, n_neighbors=1, exclude_groups=None):
        distances, indices = self.bank.kneighbors(queries, n_neighbors, exclude_groups)
        if n_neighbors == 1:
            self.nearest.append(distances[:, 0])
        return distances, indices

    def __len__(self):
        return len(self.bank)

    def exact_distances(self, queries, indices):
        return self.bank.exact_distances(queries, indices)


def index_table(args):
    from skpatchcore import PatchCoreDetector
    from skpatchcore.metrics import image_auroc

    print_run_facts(
        command_line(__file__, None),
        "backbone efficientnet_lite0 (ImageNet weights), whole cell resized to "
        "224 x 224, layers stage3 and stage5, 3 x 3 neighbourhoods, banks of "
        "all patches of the first cells, 9 re-weighting neighbours, "
        f"{SCORE_BATCH} test cells per search, seed {args.seed}",
    )
    n_cells = math.ceil(max(args.bank_sizes) / PATCHES_PER_CELL)
    start = time.perf_counter()
    train, test, labels = cell_features(n_cells, args)
    print(
        f"\nfeatures of {n_cells} training and {len(test)} test cells: "
        f"{time.perf_counter() - start:.0f} s"
    )
    # Scores exactly as score_samples computes them, from the bank given.
    scorer = PatchCoreDetector(n_reweight_neighbors=9)
    batches = [
        test[start : start + SCORE_BATCH] for start in range(0, len(test), SCORE_BATCH)
    ]
    all_patches = train.reshape(-1, train.shape[-1])
    if set(args.bank_sizes) & set(args.pynndescent_sizes):
        # numba compiles pynndescent's functions once per process, on the
        # first index: timed apart, so that build times are the indexes' own.
        start = time.perf_counter()
        MemoryBank(all_patches[:2000], algorithm="pynndescent").kneighbors(
            test[0].reshape(-1, test.shape[-1]), 1
        )
        print(
            "pynndescent's compilation and a first index of 2,000 entries: "
            f"{time.perf_counter() - start:.0f} s"
        )
    rows = []
    for n_bank in args.bank_sizes:
        bank = all_patches[:n_bank]
        algorithms = ["ivf"] + (
            ["pynndescent"] if n_bank in args.pynndescent_sizes else []
        )
        searchers, build = {"exact": RecordingBank(MemoryBank(bank))}, {}
        for algorithm in algorithms:
            start = time.perf_counter()
            searchers[algorithm] = RecordingBank(
                MemoryBank(bank, algorithm=algorithm, random_state=args.seed)
            )
            build[algorithm] = time.perf_counter() - start
        seconds = dict.fromkeys(searchers, 0.0)
        scores = {name: [] for name in searchers}
        for features in batches:
            # In turn, batch by batch: load from other processes slows all
            # searches alike.
            for name, searcher in searchers.items():
                start = time.perf_counter()
                batch_scores, _ = score_features(scorer, searcher, features)
                seconds[name] += time.perf_counter() - start
                scores[name].append(batch_scores)
        scores = {name: np.concatenate(found) for name, found in scores.items()}
        nearest = {
            name: np.concatenate(searcher.nearest)
            for name, searcher in searchers.items()
        }
        exact_ms = 1000 * seconds["exact"] / len(test)
        exact_auroc = image_auroc(labels, -scores["exact"])
        for algorithm in algorithms:
            index_ms = 1000 * seconds[algorithm] / len(test)
            saved_per_image = (exact_ms - index_ms) / 1000
            rows.append(
                [
                    f"{n_bank:,}",
                    algorithm,
                    f"{build[algorithm]:.1f}",
                    f"{exact_ms:.0f}",
                    f"{index_ms:.0f}",
                    f"{exact_ms / index_ms:.1f}",
                    f"{np.mean(nearest[algorithm] <= nearest['exact']):.4f}",
                    f"{np.max(np.abs(scores[algorithm] - scores['exact'])):.3f}",
                    f"{exact_auroc:.4f}",
                    f"{image_auroc(labels, -scores[algorithm]):.4f}",
                    (
                        f"{build[algorithm] / saved_per_image:.0f}"
                        if saved_per_image > 0
                        else "never"
                    ),
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
    print(
        f"\n### Approximate search on real patch features: {len(test)} ELPV "
        f"test cells, {test.shape[1] * test.shape[2]} patches each\n"
    )
    headers = (
        "bank",
        "index",
        "build (s)",
        "exact ms/img",
        "index ms/img",
        "speedup",
        "recall@1",
        "max score diff",
        "AUROC exact",
        "AUROC index",
        "break-even images",
    )
    print(markdown_table(headers, rows, align="rlrrrrrrrrr"))


def extend_table(args):
    """Extending an inverted file by new entries against building it again."""
    print_run_facts(
        command_line(__file__, None),
        "Lite0 patch features of good ELPV cells (224 x 224, 152 values), an "
        "index of the first entries extended by the next ones or built on "
        f"all; 1-NN search of the test cells' patches, best of {args.repeats}",
    )
    pairs = [tuple(int(n) for n in pair.split("+")) for pair in args.extend_sizes]
    n_cells = math.ceil(max(a + b for a, b in pairs) / PATCHES_PER_CELL)
    train, test, _ = cell_features(n_cells, args)
    all_patches = train.reshape(-1, train.shape[-1])
    queries = test.reshape(-1, test.shape[-1])
    rows = []
    for n_old, n_new in pairs:
        bank = all_patches[: n_old + n_new]
        old = MemoryBank(bank[:n_old], algorithm="ivf", random_state=args.seed)
        exact, _ = MemoryBank(bank).kneighbors(queries, 1)
        built, seconds = {}, {}
        for how in ("extend", "rebuild"):
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                if how == "extend":
                    built[how] = old.extended(bank[n_old:])
                else:
                    built[how] = MemoryBank(
                        bank, algorithm="ivf", random_state=args.seed
                    )
                times.append(time.perf_counter() - start)
            seconds[how] = min(times)
        for how, searcher in built.items():
            start = time.perf_counter()
            distances, _ = searcher.kneighbors(queries, 1)
            search_ms = 1000 * (time.perf_counter() - start) / len(test)
            rows.append(
                [
                    f"{n_old:,} + {n_new:,}",
                    how,
                    str(len(searcher._index[0])),
                    f"{seconds[how]:.2f}",
                    f"{search_ms:.0f}",
                    f"{np.mean(distances[:, 0] <= exact[:, 0]):.4f}",
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
    headers = ("bank + new", "index", "lists", "seconds", "search ms/img", "recall@1")
    print(markdown_table(headers, rows, align="llrrrr"))


def _with_setting(module, name, value, run):
    """A function calling ``run`` with ``module.name`` set to ``value``."""

    def call():
        before = getattr(module, name)
        setattr(module, name, value)
        try:
            return run()
        finally:
            setattr(module, name, before)

    return call


def _same_neighbours(a, b):
    return "yes" if all(np.array_equal(x, y) for x, y in zip(a, b)) else "NO"


def filtered_maps(patch_scores, size, sigma):
    """Model-input maps as computed before: upsampling, then a filter per map."""
    from scipy.ndimage import gaussian_filter

    upsampled = torch.nn.functional.interpolate(
        torch.from_numpy(patch_scores)[:, None],
        size=(size, size),
        mode="bilinear",
        align_corners=False,
    )[:, 0].numpy()
    return np.stack(
        [
            gaussian_filter(m, sigma=sigma, mode="reflect", truncate=4.0)
            for m in upsampled
        ]
    )


def prediction_table(args):
    """The CPU speed-ups of prediction, each against what it replaced.

    Nearest-entry ranking by int8 products against float32 ones, on real
    ELPV patch features (a bank sampled from the training cells' patches,
    the test cells' patches as queries), candidate selection by
    ``torch.topk`` against span minima first, ranking tiles of 2,048 and
    1,024 queries, the backbone with batch norms folded against the
    backbone as loaded, one backbone pass per batch against passes of a few
    images, and anomaly maps upsampled and filtered map by map against
    per-axis operators; the passes alternate, and the best of ``--repeats``
    is kept for each.
    """
    from skpatchcore import PatchFeatureExtractor

    n_cells = -(-args.ranking_bank // PATCHES_PER_CELL)
    train, test, _ = cell_features(n_cells, args)
    rng = np.random.default_rng(args.seed)
    flat = train.reshape(-1, train.shape[-1])
    bank = flat[rng.choice(len(flat), args.ranking_bank, replace=False)]
    queries = test[:SCORE_BATCH].reshape(-1, test.shape[-1])
    searcher = MemoryBank(bank)

    def search():
        return searcher.kneighbors(queries, 1)

    best, found = alternating(
        args.repeats,
        {
            "float32": _with_setting(*INT8_RANKING, False, search),
            "int8": search,
        },
    )
    rows = [
        (
            f"1-NN search, bank {len(bank)} x {bank.shape[1]}, {len(queries)} queries",
            "float32 ranking",
            "int8 ranking",
            best["float32"],
            best["int8"],
            _same_neighbours(found["float32"], found["int8"]),
        )
    ]

    def topk_per_row(keys, k):
        return torch.topk(keys, k, dim=1, largest=False)

    best, found = alternating(
        args.repeats,
        {
            "topk": _with_setting(*CANDIDATE_SELECTION, topk_per_row, search),
            "spans": search,
        },
    )
    rows.append(
        (
            "same search, candidates selected",
            "torch.topk",
            "span minima first",
            best["topk"],
            best["spans"],
            _same_neighbours(found["topk"], found["spans"]),
        )
    )
    best, found = alternating(
        args.repeats,
        {
            "2048": _with_setting(*QUERY_TILE, 2048, search),
            "1024": _with_setting(*QUERY_TILE, 1024, search),
        },
    )
    rows.append(
        (
            "same search, queries per ranking tile",
            "2,048",
            "1,024",
            best["2048"],
            best["1024"],
            _same_neighbours(found["2048"], found["1024"]),
        )
    )

    extractor = PatchFeatureExtractor(
        backbone="efficientnet_lite0", image_size=224, resize=None, device="cpu"
    ).fit()
    images = np.random.default_rng(args.seed).random((SCORE_BATCH, 224, 224, 3))
    images = images.astype(np.float32)
    folded, loaded, network_holder = extractor_networks(extractor)

    def features(network):
        return _with_setting(
            *network_holder, network, lambda: extractor.transform(images)
        )

    best, found = alternating(
        args.repeats, {"loaded": features(loaded), "folded": features(folded)}
    )
    scale = np.abs(found["loaded"]).max()

    def agreement(before, after):
        if np.array_equal(before, after):
            return "identical"
        return f"within {np.abs(before - after).max() / scale:.1e} of the largest"

    rows.append(
        (
            f"Lite0 features, {SCORE_BATCH} images of 224 x 224",
            "batch norms as loaded",
            "batch norms folded",
            best["loaded"],
            best["folded"],
            agreement(found["loaded"], found["folded"]),
        )
    )
    whole_batch = 224 * 224 * SCORE_BATCH
    best, found = alternating(
        args.repeats,
        {
            "batch": _with_setting(
                *CPU_PIXELS_PER_THREAD, whole_batch, features(folded)
            ),
            "few": features(folded),
        },
    )
    pixels = getattr(*CPU_PIXELS_PER_THREAD) * torch.get_num_threads()
    per_pass = min(SCORE_BATCH, pixels // (224 * 224))
    rows.append(
        (
            "same, images per backbone pass",
            f"{SCORE_BATCH} (the batch)",
            f"{per_pass}",
            best["batch"],
            best["few"],
            agreement(found["batch"], found["few"]),
        )
    )

    distances = searcher.kneighbors(queries, 1)[0]
    grids = np.ascontiguousarray(distances.reshape(SCORE_BATCH, 28, 28))
    sigma = 4.0
    best, found = alternating(
        args.repeats,
        {
            "filtered": lambda: filtered_maps(grids, 224, sigma),
            "operators": lambda: model_input_maps(grids, 224, sigma),
        },
    )
    largest = np.abs(found["filtered"]).max()
    difference = np.abs(found["filtered"] - found["operators"]).max() / largest
    rows.append(
        (
            f"anomaly maps, {SCORE_BATCH} grids of 28 x 28 to 224 x 224",
            "upsampled, then filtered map by map",
            "one operator per axis",
            best["filtered"],
            best["operators"],
            f"within {difference:.1e} of the largest",
        )
    )
    print(f"\n### Prediction stages on the CPU (best of {args.repeats})\n")

    def per_image(seconds):
        milliseconds = 1000 * seconds / SCORE_BATCH
        return f"{milliseconds:.2f}" if milliseconds < 1 else f"{milliseconds:.1f}"

    headers = (
        "stage",
        "before",
        "after",
        "before ms/img",
        "after ms/img",
        "ratio",
        "same",
    )
    cell_rows = [
        [
            stage,
            before,
            after,
            per_image(t_before),
            per_image(t_after),
            f"{t_before / t_after:.2f}",
            same,
        ]
        for stage, before, after, t_before, t_after, same in rows
    ]
    print(markdown_table(headers, cell_rows, align="lllrrrl"))


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )

    parser.add_argument(
        "--parts",
        default="coreset,search,index,prediction,extend",
        help="tables to print, of coreset, search (random data), index, "
        "prediction and extend",
    )
    parser.add_argument(
        "--extend-sizes",
        type=lambda text: text.split(","),
        default=["78400+7840", "50000+50000"],
        help="OLD+NEW bank sizes of the extend table: an index of OLD entries "
        "extended by NEW",
    )
    parser.add_argument(
        "--points", type=int, default=47040, help="patches: 60 images of 28 x 28"
    )
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--bank", type=int, default=20000)
    parser.add_argument(
        "--queries", type=int, default=7840, help="patches: 10 images of 28 x 28"
    )
    parser.add_argument("--feature-dim", type=int, default=152)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--bank-sizes",
        type=int_list,
        default=[10000, 30000, 100000, 1000000],
        help="memory-bank sizes of the index table, in patches",
    )
    parser.add_argument(
        "--pynndescent-sizes",
        type=int_list,
        default=[10000, 100000],
        help="bank sizes at which pynndescent is measured too",
    )
    parser.add_argument(
        "--n-test", type=int, default=50, help="good and defective test cells, each"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--ranking-bank",
        type=int,
        default=7840,
        help="bank size of the prediction table: 10 %% of 100 cells' patches",
    )
    parser.add_argument(
        "--cache",
        default="/tmp/skpatchcore-speed",
        help="folder for flipped cells and extracted features",
    )
    args = parser.parse_args()
    parts = args.parts.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if "coreset" in parts:
        coreset_table(args.points, args.dim, args.ratio, args.repeats)
    if "search" in parts:
        search_table(args.bank, args.queries, args.feature_dim, args.repeats)
    if "index" in parts:
        index_table(args)
    if "prediction" in parts:
        prediction_table(args)
    if "extend" in parts:
        extend_table(args)


if __name__ == "__main__":
    main()
