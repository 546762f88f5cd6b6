"""Every benchmark script, run at a tiny size as its users run it.

The benchmarks reach into skpatchcore's private modules (through
``benchmarks/_internals.py``) and nothing else runs them, so a refactor of
the package could break them unnoticed. Each script runs here in a child
process from the repository root, for seconds: only its exit code, the
header rows of its tables and its notes are checked, since scores and
timings at these sizes mean nothing.
"""

import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
# The shared MVTec-style data sets beside the repository, as the scripts'
# defaults find them.
FOLDERS = {
    "mpdd": REPO.parent / "shared" / "data" / "mpdd_metal_plate",
    "kolektorsdd": REPO.parent / "shared" / "data" / "kolektorsdd",
}
# No interpreter there: the anomalib rows are skipped even on a machine that
# has the anomalib environment, and the skip itself is checked.
NO_ANOMALIB = ["--anomalib-python", "{tmp}/no-anomalib/bin/python"]
ANOMALIB_SKIPPED = "skipped: no interpreter"


class Case(NamedTuple):
    # "{tmp}" in an argument becomes a fresh folder: caches start empty, so
    # that features cached by other code cannot hide a failure.
    args: list
    # Folders of FOLDERS and modules without which the script cannot run.
    needs: tuple
    # Header rows of the tables it prints, whole lines.
    headers: tuple
    # Text that its output must contain.
    notes: tuple = ()


QUALITY_METRICS = (
    "image AUROC | pixel AUROC | AUPRO | fit s | predict ms/img | "
    "scores-only ms/img | peak MiB |"
)
CASES = {
    "quality.py": Case(
        [
            "--datasets=elpv_mono",
            "--train-size=4",
            "--n-test=2",
            "--repeat=1",
            "--image-size=64",
            *NO_ANOMALIB,
        ],
        needs=("elpv_dataset",),
        headers=(f"| data set | method | {QUALITY_METRICS}",),
        notes=(f"anomalib rows {ANOMALIB_SKIPPED}",),
    ),
    "ablation.py": Case(
        [
            "--train-size=2",
            "--n-test=1",
            "--geometries=crop",
            "--backbones=efficientnet_lite0",
            "--ratios=0.1",
            "--anomalib-runs=crop:0.1",
            *NO_ANOMALIB,
        ],
        needs=("kolektorsdd",),
        headers=(
            f"| geometry | backbone | coreset ratio | method | {QUALITY_METRICS}",
        ),
        notes=(f"anomalib rows {ANOMALIB_SKIPPED}",),
    ),
    "speed.py": Case(
        # The search table is left out: pynndescent's compilation by numba
        # alone takes a minute. The index table runs the same searches.
        [
            "--parts=coreset,index,prediction,extend",
            "--points=2000",
            "--dim=16",
            "--repeats=1",
            "--bank-sizes=1568",
            "--pynndescent-sizes=",
            "--n-test=8",
            "--ranking-bank=1568",
            "--extend-sizes=1000+568",
            "--cache={tmp}/speed",
        ],
        needs=("elpv_dataset",),
        headers=(
            "| one thread (s) | default threads (s) | default / one |",
            "| bank | index | build (s) | exact ms/img | index ms/img | speedup | "
            "recall@1 | max score diff | AUROC exact | AUROC index | "
            "break-even images |",
            "| stage | before | after | before ms/img | after ms/img | ratio | same |",
            "| bank + new | index | lists | seconds | search ms/img | recall@1 |",
        ),
    ),
    "scale.py": Case(
        [
            "--sizes=4",
            "--exact-sizes=",
            "--radius-sizes=4",
            "--anomalib-sizes=4",
            "--wrn-size=0",
            "--n-test=2",
            "--n-jobs=1",
            "--partial-images=2",
            "--cache={tmp}/cells",
            *NO_ANOMALIB,
        ],
        needs=("elpv_dataset",),
        headers=(
            "| N images | method | fit s | fit ms/img | features s | coreset s | "
            "calibration s | peak MiB | bank | predict ms/img | image AUROC | "
            "search | offset (bootstrap sd) | coverage radius | partial_fit +2 s |",
        ),
        notes=(f"anomalib at N=4 {ANOMALIB_SKIPPED}",),
    ),
    "score_folder.py": Case(
        [
            "--n-train=4",
            "--n-score=4",
            "--workers=1",
            "--chunk-size=2",
            "--cache={tmp}/cells",
        ],
        needs=("elpv_dataset", "distributed"),
        headers=("| how | images/s | largest relative score difference |",),
    ),
    "thresholds.py": Case(
        # MPDD alone: a data set with masks prints both tables, and every
        # data set costs a fit.
        [
            "--datasets=mpdd_metal_plate",
            "--folder-subset",
            "--train-size=4",
            "--n-test=2",
        ],
        needs=("mpdd",),
        headers=("| rule | MPDD metal_plate |",),
        notes=("predict_masks at pixel_threshold_",),
    ),
    "calibration.py": Case(
        # MPDD alone, two splits: every split costs two fits.
        [
            "--datasets=mpdd_metal_plate",
            "--folder-subset",
            "--train-size=4",
            "--n-test=2",
            "--splits=2",
            "--side=64",
        ],
        needs=("mpdd",),
        headers=(
            "| data set | calibration | splits | alpha | exchangeable rate | image "
            "false alarms | image defects caught | pixel false alarms | pixel "
            "defects caught |",
            "| data set | calibration | calibration images | bank | image AUROC | "
            "fit s |",
        ),
        notes=("disagreed on 0 test images",),
    ),
    "partial_fit.py": Case(
        # ELPV alone: MPDD's rows would cost three more fits and run the
        # same code but for the masks, which thresholds.py covers.
        [
            "--elpv-size=4",
            "--n-test=2",
            "--mpdd={tmp}/no-mpdd",
            "--cache={tmp}/cells",
        ],
        needs=("elpv_dataset",),
        headers=(
            "| data set | how | image AUROC | pixel AUROC | AUPRO | coverage radius | "
            "bank | last call s |",
        ),
    ),
    "grid_search.py": Case(
        [
            "--n-normal=4",
            "--n-defective=2",
            "--patch-sizes=1,3",
            "--coreset-ratios=0.5",
            "--folds=2",
            "--image-size=64",
        ],
        needs=("elpv_dataset",),
        headers=(
            "| memory | search s | ratio to None | best parameters | best AUROC |",
        ),
        notes=("| cv_results_ identical | yes |",),
    ),
    "export.py": Case(
        ["--n-train=4", "--n-test=2", "--image-size=64"],
        needs=("mpdd", "onnxruntime"),
        headers=("| | detector | ONNX (onnxruntime) | TorchScript |",),
    ),
}


def test_every_script_has_a_case():
    scripts = {
        path.name for path in BENCHMARKS.glob("*.py") if not path.name.startswith("_")
    }
    assert scripts == set(CASES)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_runs_at_a_tiny_size(script, tmp_path):
    case = CASES[script]
    for need in case.needs:
        if need in FOLDERS:
            if not FOLDERS[need].is_dir():
                pytest.skip(f"no data folder {FOLDERS[need]}")
        else:
            pytest.importorskip(need)
    env = dict(os.environ)
    # A script's own folder heads its sys.path, not the repository: without
    # this, an installed skpatchcore (another checkout's editable install)
    # would be the one tested.
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *filter(None, [env.get("PYTHONPATH")])]
    )
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in case.args]
    run = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    assert run.returncode == 0, output
    lines = run.stdout.splitlines()
    for header in case.headers:
        assert header in lines, output
    for note in case.notes:
        assert note in run.stdout, output
