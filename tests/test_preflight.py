"""The pre-flight of training: one report of every data problem of the whole dataset, a clean exit, skip_invalid;
and the lock that keeps two runs out of one output_dir."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import CONFIG_DIR, REPO_ROOT, TINY_TRAINING
from custom.core.lock import LOCK_NAME
from custom.data.datalist import load_datalist
from custom.data.synthetic import case_files, synthesize

TINY = {**TINY_TRAINING, "num_folds": 2, "cache": "none"}
ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}


def _train(dataset, output_dir, **overrides):
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(CONFIG_DIR / "train.json")]
    settings = {**TINY, "dataset_dir": str(dataset), "output_dir": str(output_dir), **overrides}
    for key, value in settings.items():
        command += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return command


def _rewrite(path: Path, transform) -> None:
    image = nib.load(str(path))
    data = transform(np.asanyarray(image.dataobj).copy())
    header = image.header.copy()
    header.set_data_dtype(data.dtype)
    nib.Nifti1Image(data, image.affine, header).to_filename(str(path))


@pytest.fixture(scope="module")
def broken_tree(tmp_path_factory):
    """A BraTS 2021 tree of 10 cases, 6 of them broken in the ways users meet."""
    root = tmp_path_factory.mktemp("broken")
    synthesize(str(root), num_cases=10, shape=(32, 32, 32), seed=5)
    files = {i: case_files(root / f"BraTS2021_{i:05d}") for i in range(10)}
    files[0]["flair"].unlink()  # missing FLAIR (found by discovery)
    raw = files[1]["t1c"].read_bytes()
    files[1]["t1c"].write_bytes(raw[: len(raw) // 2])  # truncated download
    _rewrite(files[2]["t2"], lambda d: d[:, :, :30])  # another shape
    _rewrite(files[3]["seg"], lambda d: np.where(d == 2, 7, d).astype(np.uint8))  # label 7
    _rewrite(
        files[4]["t1"], lambda d: np.where(np.arange(d.size).reshape(d.shape) == 5000, np.nan, d.astype(np.float32))
    )
    _rewrite(files[5]["flair"], lambda d: np.zeros_like(d))  # a missing sequence exported as zeros
    return root, {
        "BraTS2021_00000": "missing flair",
        "BraTS2021_00001": "not a readable NIfTI",
        "BraTS2021_00002": "shape (32, 32, 30) differs",
        "BraTS2021_00003": "label values [7]",
        "BraTS2021_00004": "1 NaN voxel",
        "BraTS2021_00005": "flair is zero everywhere",
    }


def test_one_report_of_every_problem_without_a_traceback(broken_tree, tmp_path):
    root, expected = broken_tree
    # the truncated case lands in the validation fold: its problem must be reported all the same
    folds = {
        e["case_id"]: e["fold"] for e in load_datalist(str(root), folds=2, seed=0, allow_incomplete=True)["training"]
    }
    result = subprocess.run(
        _train(root, tmp_path / "run", fold=folds["BraTS2021_00001"]),
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "ConfigExpression" not in result.stderr, result.stderr[-3000:]
    tail = result.stderr.strip().splitlines()
    problem_lines = [line for line in tail if line.startswith("BraTS2021_")]
    for case_id, problem in expected.items():
        assert any(line.startswith(case_id) and problem in line for line in problem_lines), (
            case_id,
            result.stderr[-3000:],
        )
    assert len({line.split(":")[0] for line in problem_lines}) == 6  # the 4 good cases are not named
    assert "--skip_invalid true" in tail[-1]  # the list is the last thing on the terminal, with a key users can pass
    assert "allow_incomplete=True" not in result.stderr
    assert "Epoch[" not in result.stdout + result.stderr  # no epoch started
    assert not (tmp_path / "run" / "models" / "model.pt").exists()


def test_skip_invalid_trains_on_the_good_cases(broken_tree, tmp_path):
    root, expected = broken_tree
    result = subprocess.run(
        _train(root, tmp_path / "run", skip_invalid=True),
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "skipping 6 of 10 case(s)" in log and "cases left per fold: fold 0:" in log
    assert "Epoch[1] Complete" in log
    assert (tmp_path / "run" / "models" / "model.pt").exists()


def test_second_run_on_one_output_dir_refuses_and_kill_9_leaves_no_lock(tmp_path):
    data = tmp_path / "data"
    synthesize(str(data), num_cases=4, shape=(32, 32, 32), seed=1)
    output_dir = tmp_path / "run"
    first = subprocess.Popen(
        _train(data, output_dir, epochs=50),
        cwd=REPO_ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not list(output_dir.glob("models/**/*snapshot*.pt")):
            assert first.poll() is None and time.time() < deadline, "the first training did not reach epoch 1"
            time.sleep(0.2)
        second = subprocess.run(
            _train(data, output_dir, epochs=50), cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=120
        )
        assert second.returncode != 0
        assert f"PID {first.pid}" in second.stderr and "Traceback" not in second.stderr, second.stderr[-2000:]
        assert first.poll() is None  # the first run is untouched
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (output_dir / LOCK_NAME).exists()  # left behind by kill -9: stale, not blocking
    resumed = subprocess.run(
        _train(data, output_dir, epochs=2), cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
