"""Images per second of ``skpatchcore.score_folder`` on a local dask cluster.

Fits :class:`~skpatchcore.PatchCoreDetector` (EfficientNet-Lite0 ImageNet
weights, whole cell resized to 224 x 224, coreset ratio 0.1) on ``--n-train``
good ELPV cells, then scores ``--n-score`` cells (the scale benchmark's
training cells, flipped and rotated beyond the good ones) three ways: in
this process (``score_samples``), and with ``score_folder`` on a
``distributed.LocalCluster`` of 1 and of 2 worker processes of one thread
each, the scores compared with the first. The cluster's start-up is not
timed; the first ``score_folder`` call on it is, shipping of the detector
included.

Usage, from the repository root::

    python benchmarks/score_folder.py
    python benchmarks/score_folder.py --n-train 50 --n-score 100 --workers 1,2
"""

import argparse
import os
import tempfile
import time

import joblib
import numpy as np
from _common import command_line, int_list, load_cells, markdown_table, print_run_facts


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--n-train", type=int, default=100)
    parser.add_argument("--n-score", type=int, default=200)
    parser.add_argument("--workers", type=int_list, default=[1, 2])
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--n-test", type=int, default=50, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cache",
        default=os.path.join(tempfile.gettempdir(), "skpatchcore-scale-cells"),
        help="folder for the flipped and rotated cells",
    )
    args = parser.parse_args(argv)

    import distributed

    from skpatchcore import PatchCoreDetector, score_folder

    cells = load_cells(args.n_train + args.n_score, args)[0]
    train, score = cells[: args.n_train], cells[args.n_train :]
    detector = PatchCoreDetector(
        "efficientnet_lite0",
        image_size=224,
        resize=None,
        device="cpu",
        random_state=args.seed,
    ).fit(train)
    start = time.perf_counter()
    expected = detector.score_samples(score)
    rows = [
        [
            "score_samples, this process",
            f"{len(score) / (time.perf_counter() - start):.1f}",
            "—",
        ]
    ]
    for n_workers in args.workers:
        with (
            distributed.LocalCluster(
                n_workers=n_workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
            ) as cluster,
            distributed.Client(cluster),
            joblib.parallel_backend("dask"),
        ):
            start = time.perf_counter()
            scores = score_folder(detector, score, chunk_size=args.chunk_size)
            seconds = time.perf_counter() - start
        rows.append(
            [
                f"score_folder, dask, {n_workers} worker(s) x 1 thread",
                f"{len(score) / seconds:.1f}",
                f"{np.max(np.abs(scores - expected) / np.abs(expected)):.1e}",
            ]
        )
        print(" | ".join(rows[-1]), flush=True)
    print_run_facts(
        command_line(__file__, argv),
        f"Lite0 at 224 x 224, fitted on {args.n_train} ELPV cells "
        f"(bank {len(detector.memory_bank_):,}, nn_algorithm_ "
        f"{detector.nn_algorithm_!r}), {len(score)} cells scored, chunks of "
        f"{args.chunk_size}, seed {args.seed}, CPU",
    )
    print()
    headers = ("how", "images/s", "largest relative score difference")
    print(markdown_table(headers, rows, align="lrr"))
    return 0


if __name__ == "__main__":
    main()
