"""Speed of the parts of skpatchcore that dominate fit and predict time.

Run ``python benchmarks/speed.py``; it prints one markdown table per part,
each with side-by-side timings and their ratio, measured in this one run.
Random data and random backbone weights are used: this measures speed only.

* Greedy coreset: one CPU thread in the selection loop (what skpatchcore
  does) against the process's default thread count.
* Nearest-neighbour search for patch scores: exact blocked search against a
  pynndescent index (index build excluded, reported separately).
"""

import argparse
import time

import numpy as np
import torch

from skpatchcore._coreset import _greedy_steps
from skpatchcore._memory_bank import MemoryBank


def best_of(repeats, function):
    """Smallest wall time of ``repeats`` calls, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def coreset_table(n_points, dim, ratio, repeats):
    points = torch.from_numpy(
        np.random.default_rng(0).normal(size=(n_points, dim)).astype(np.float32)
    )
    n_samples = int(ratio * n_points)
    default_threads = torch.get_num_threads()

    def run(threads):
        torch.set_num_threads(threads)
        try:
            return best_of(repeats, lambda: _greedy_steps(points, n_samples, 0))
        finally:
            torch.set_num_threads(default_threads)

    one, default = run(1), run(default_threads)
    print(f"\n### Greedy coreset: {n_points} x {dim} points, {n_samples} chosen\n")
    print("| one thread (s) | default threads (s) | default / one |")
    print("|---:|---:|---:|")
    print(f"| {one:.2f} | {default:.2f} ({default_threads}) | {default / one:.2f} |")


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
    print(
        "| exact (s) | pynndescent (s) | exact / pynndescent | "
        "same neighbour | index build (s) |"
    )
    print("|---:|---:|---:|---:|---:|")
    print(
        f"| {t_exact:.3f} | {t_approx:.3f} | {t_exact / t_approx:.2f} | "
        f"{agree:.3f} | {build:.1f} |"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    coreset_table(args.points, args.dim, args.ratio, args.repeats)
    search_table(args.bank, args.queries, args.feature_dim, args.repeats)


if __name__ == "__main__":
    main()
