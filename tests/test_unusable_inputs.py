"""Inputs that used to vanish or crash, through the commands users run: every case found ends in exactly one list of
the summary (written / failed) with its reason and file, the run exits non-zero, and nothing prints a traceback;
training's pre-flight reports the same cases, one line each, before any epoch."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import CONFIG_DIR, REPO_ROOT
from custom.data.synthetic import synthesize
from custom.model.network import CascadedUNet

NARROW = ["--network_def#init_filters", "8", "--network_def#blocks_down", "[1,1,1,1]"]


def _resave(path: Path, transform) -> None:
    image = nib.load(str(path))
    nib.Nifti1Image(transform(np.asarray(image.dataobj)), image.affine).to_filename(str(path))


def _copy_case(root: Path, source: str, target: str) -> Path:
    folder = root / target
    shutil.copytree(root / source, folder)
    for f in list(folder.iterdir()):
        f.rename(folder / f.name.replace(source, target))
    return folder


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Path:
    """Two good cases, one with all four sequences stored as (X, Y, Z, 1) (loads, is written), one with only its T2
    so stored (the loader cannot stack it), one not skull-stripped (background of low noise), and a 3-channel study."""
    root = tmp_path_factory.mktemp("inputs") / "cases"
    good, singleton = synthesize(root, 2, shape=32, seed=1, naming="2021")
    for f in (root / singleton).glob("*.nii.gz"):
        _resave(f, lambda a: a[..., None])
    mixed = _copy_case(root, good, "BraTS2021_00090")
    _resave(mixed / "BraTS2021_00090_t2.nii.gz", lambda a: a[..., None])
    noisy = _copy_case(root, good, "BraTS2021_00091")
    rng = np.random.default_rng(0)
    for f in noisy.glob("*.nii.gz"):
        if not f.name.endswith("_seg.nii.gz"):
            _resave(f, lambda a: np.where(a > 0, a, rng.uniform(1, 20, a.shape)).astype(np.float32))
    sequences = [np.asarray(nib.load(str(root / good / f"{good}_{s}.nii.gz")).dataobj) for s in ("t1", "t1ce", "t2")]
    nib.Nifti1Image(np.stack(sequences, -1).astype(np.float32), np.eye(4)).to_filename(str(root / "three.nii.gz"))
    return root


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )


def _section(log: str, title: str) -> list[str]:
    """The case ids listed under ``title`` in the run's summary (lines '  <case_id>: ...' up to the next title)."""
    listed = []
    for line in log[log.index(f"\n{title}") + 1 :].splitlines()[1:]:
        if not line.startswith("  "):
            break
        listed.append(line.strip().split(":")[0])
    return listed


def test_inference_reports_every_case_once_and_exits_nonzero(cases, tmp_path):
    checkpoint = tmp_path / "model.pt"
    torch.manual_seed(0)
    torch.save(CascadedUNet(init_filters=8, blocks_down=(1, 1, 1, 1), trilinear_decoder=False).state_dict(), checkpoint)
    out = tmp_path / "out"
    result = _run(
        [
            "--config_file", str(CONFIG_DIR / "inference.json"), "--dataset_dir", str(cases), "--output_dir", str(out),
            "--checkpoints", f"['{checkpoint}']", "--tta", "1", *NARROW,
        ]
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in log, log[-4000:]
    summary = log[log.rindex("\nsegmented ") :]
    written, failed = _section(summary, "written:"), _section(summary, "failed (not written):")
    assert sorted(written) == ["BraTS2021_00000", "BraTS2021_00001"]  # (X, Y, Z, 1) x 4 is a readable case
    assert sorted(failed) == ["BraTS2021_00090", "BraTS2021_00091", "three"]
    assert "BraTS2021_00090_t2.nii.gz" in summary and "(X, Y, Z, 1)" in summary
    assert "not skull-stripped" in summary and "(32, 32, 32, 3)" in summary
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["BraTS2021_00000.nii.gz", "BraTS2021_00001.nii.gz"]
    assert nib.load(str(out / "BraTS2021_00001.nii.gz")).shape == (32, 32, 32)


def test_training_preflight_reports_the_same_cases_in_one_list(cases, tmp_path):
    result = _run(
        [
            "training", "--config_file", str(CONFIG_DIR / "train.json"), "--dataset_dir", str(cases),
            "--output_dir", str(tmp_path / "run"), "--epochs", "1", "--patch_size", "[32,32,32]", *NARROW,
        ]
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in log, log[-4000:]
    for case_id in ("BraTS2021_00090", "BraTS2021_00091", "three"):
        assert case_id in log, case_id
    assert "3 problem(s) in 3 of 5 case(s)" in log
    assert not list((tmp_path / "run").rglob("*.pt"))  # stopped before any epoch
