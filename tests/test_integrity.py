"""Nothing lost, nothing stale, nothing silently dropped (issue 23): inference holds the output folder's lock, a rerun
redoes exactly what changed (settings and inputs), a lock cannot be stolen by deleting its file, killed saves leave no
temporary files behind, outputs are fsynced, an unwritable output folder or a foreign volumes.csv is found before the
first case, and ``python -m custom evaluate`` ends failed cases without a traceback."""

import csv
import json
import os
import shutil
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import CONFIG_DIR, REPO_ROOT
from custom.core.errors import DataError, OutputDirLocked
from custom.core.io import atomic_path
from custom.core.lock import LOCK_NAME, lock_output_dir, release_output_dir
from custom.data.synthetic import case_files, synthesize
from custom.inference.ensemble import SnapshotFlipEnsemble
from custom.inference.inferer import inference_files
from custom.inference.segment import QualityCheck, segment_cases
from custom.model.checkpoints import atomic_save
from custom.model.network import CascadedUNet
from monai.bundle import ConfigParser

ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
SMALL = {"init_filters": 8, "blocks_down": (1, 1, 1, 1), "trilinear_decoder": False}
HOLD_LOCK = (
    "import sys, time\n"
    "from custom.core.lock import lock_output_dir\n"
    "lock_output_dir(sys.argv[1], rank=0)\n"
    "print('locked', flush=True)\n"
    "time.sleep(120)\n"
)


class ThresholdNet(torch.nn.Module):
    """Tumor wherever the z-scored FLAIR is bright; counts its calls."""

    calls = 0

    def forward(self, x):
        ThresholdNet.calls += 1
        return ((x[:, 3:4] > 1.0).float() * 20 - 10).repeat(1, 3, 1, 1, 1)


class EverythingNet(torch.nn.Module):
    """Tumor in every voxel of the crop, the background around the brain included."""

    def forward(self, x):
        return torch.full((x.shape[0], 3, *x.shape[2:]), 10.0)


def _pipeline(output_dir, **overrides):
    parser = ConfigParser()
    parser.read_config(str(CONFIG_DIR / "inference.json"))
    parser.update({"output_dir": str(output_dir), "tta": 1, "et_label": 4, "et_threshold": 0, **overrides})
    return {key: parser.get_parsed_content(key) for key in ("preprocessing", "inferer", "postprocessing", "writer")}


def _run(data, output_dir, network=None, config=None, **kwargs):
    parts = _pipeline(output_dir, **(config or {}))
    return segment_cases(
        data, parts["preprocessing"], network if network is not None else ThresholdNet(), parts["inferer"],
        parts["postprocessing"], parts["writer"], progress=False, quality_check=QualityCheck(), **kwargs,
    )  # fmt: skip


@pytest.fixture()
def cases(tmp_path):
    root = tmp_path / "cases"
    synthesize(str(root), num_cases=2, shape=(32, 32, 32), seed=3)
    return root


@pytest.fixture()
def holder(tmp_path):
    """Starts another process that holds the lock of a folder; yields a function taking the folder."""
    started = []

    def hold(folder):
        process = subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK, str(folder)], cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE, text=True
        )
        started.append(process)
        assert process.stdout.readline().strip() == "locked"
        return process

    yield hold
    for process in started:
        process.kill()
        process.wait()


# ---------------------------------------------------------------------------------------------------------------
# 1. inference holds the lock of its output folder


def test_inference_into_a_folder_another_run_holds_ends_cleanly_and_keeps_the_first_runs_results(
    cases, tmp_path, holder
):
    out = tmp_path / "out"
    _run(inference_files(str(cases)), out)
    volumes = (out / "volumes.csv").read_bytes()
    first = holder(out)  # the first run, still going
    ThresholdNet.calls = 0
    with pytest.raises(OutputDirLocked, match=rf"output_dir {out} is in use by another run \(PID {first.pid}"):
        _run(inference_files(str(cases)), out, overwrite=True)
    assert ThresholdNet.calls == 0 and (out / "volumes.csv").read_bytes() == volumes
    first.kill()
    first.wait()
    _run(inference_files(str(cases)), out)  # the lock of a killed run is stale: the next run takes it
    lock_output_dir(str(out), rank=0)  # and gives it back at its end
    release_output_dir(str(out))


def test_a_second_bundle_run_into_a_locked_folder_prints_one_line_without_a_traceback(cases, tmp_path, holder):
    out = tmp_path / "out"
    checkpoint = tmp_path / "model.pt"
    torch.save(CascadedUNet(**SMALL).state_dict(), checkpoint)
    first = holder(out)
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CONFIG_DIR / "inference.json")]
    settings = {
        "dataset_dir": str(cases), "output_dir": str(out), "checkpoints": json.dumps([str(checkpoint)]), "tta": "1",
        "network_def#init_filters": "8", "network_def#blocks_down": "[1,1,1,1]",
    }  # fmt: skip
    for key, value in settings.items():
        command += [f"--{key}", value]
    second = subprocess.run(command, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert second.returncode == 1, second.stdout[-2000:] + second.stderr[-2000:]
    assert "Traceback" not in second.stderr, second.stderr[-3000:]
    last = second.stderr.strip().splitlines()[-1]
    assert f"output_dir {out} is in use by another run (PID {first.pid}" in last
    assert not list(out.glob("*.nii.gz")) and not (out / "volumes.csv").exists()


# ---------------------------------------------------------------------------------------------------------------
# 2. the fingerprint: every setting that changes a result or the files written, and the inputs


def test_a_rerun_with_save_probabilities_writes_them(cases, tmp_path):
    out = tmp_path / "out"
    data = inference_files(str(cases))
    _run(data, out)
    summary = _run(data, out, config={"save_probabilities": True})
    assert len(summary.written) == 2
    assert sorted(p.name for p in out.glob("*_probabilities.nii.gz")) == [
        "BraTS2021_00000_probabilities.nii.gz",
        "BraTS2021_00001_probabilities.nii.gz",
    ]
    (out / "BraTS2021_00001_probabilities.nii.gz").unlink()  # one of a case's files missing: that case is redone
    summary = _run(data, out, config={"save_probabilities": True})
    assert [r.case_id for r in summary.of("written")] == ["BraTS2021_00001"]


def test_a_rerun_with_another_crop_margin_redoes_the_cases(cases, tmp_path):
    out = tmp_path / "out"
    data = inference_files(str(cases))
    _run(data, out)
    assert len(_run(data, out).of("skipped")) == 2
    assert len(_run(data, out, config={"crop_margin": 2}).written) == 2
    assert len(_run(data, out, config={"crop_margin": 2}).of("skipped")) == 2


def test_a_rerun_with_another_n_snapshots_redoes_the_cases(cases, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    for epoch in (1, 2):
        torch.manual_seed(epoch)
        state = {"model": CascadedUNet(**SMALL).state_dict(), "trainer": {}}
        atomic_save(state, str(models / f"snapshot_epoch={epoch}.pt"))

    def ensemble(n_snapshots):
        return SnapshotFlipEnsemble(CascadedUNet(**SMALL), [str(models)], tta=1, n_snapshots=n_snapshots)

    out = tmp_path / "out"
    data = inference_files(str(cases))[:1]
    settings = {"checkpoints": [str(models)]}  # what inference.json's output_settings holds: not n_snapshots
    assert len(_run(data, out, ensemble(1), settings=settings).written) == 1
    assert len(_run(data, out, ensemble(1), settings=settings).of("skipped")) == 1
    assert len(_run(data, out, ensemble(2), settings=settings).written) == 1


def test_a_case_whose_inputs_were_replaced_is_segmented_again_and_the_other_is_skipped(tmp_path):
    pool, root = tmp_path / "pool", tmp_path / "cases"
    synthesize(str(pool), num_cases=3, shape=(32, 32, 32), seed=4)
    for case in ("BraTS2021_00000", "BraTS2021_00001"):
        shutil.copytree(pool / case, root / case)
    out = tmp_path / "out"
    assert len(_run(inference_files(str(root)), out).written) == 2
    replaced, other = case_files(root / "BraTS2021_00001"), case_files(pool / "BraTS2021_00002")
    for key in ("t1", "t1c", "t2", "flair"):  # another case's four sequences under this case's names
        shutil.copyfile(other[key], replaced[key])
    summary = _run(inference_files(str(root)), out)
    assert [r.case_id for r in summary.of("written")] == ["BraTS2021_00001"]
    assert [r.case_id for r in summary.of("skipped")] == ["BraTS2021_00000"]
    assert len(_run(inference_files(str(root)), out).of("skipped")) == 2


# ---------------------------------------------------------------------------------------------------------------
# 3. the lock cannot be stolen by deleting its file


def test_deleting_the_lock_file_does_not_let_a_second_process_in(tmp_path, holder):
    out = tmp_path / "run"
    first = holder(out)
    (out / LOCK_NAME).unlink()
    with pytest.raises(OutputDirLocked, match=rf"output_dir {out} is in use by another run"):
        lock_output_dir(str(out), rank=0)
    first.kill()
    first.wait()
    lock_output_dir(str(out), rank=0)
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    release_output_dir(str(out))


# ---------------------------------------------------------------------------------------------------------------
# 4. temporary files, fsync, unwritable folders, foreign tables, clean exits


def test_taking_the_lock_removes_the_temporary_files_of_killed_saves_only(tmp_path):
    out = tmp_path / "run"
    (out / "models").mkdir(parents=True)
    old = time.time() - 3600
    stale = [out / ".BraTS2021_00000.nii.gz.0123456789ab.nii.gz", out / "models" / ".model.pt.a1b2c3d4e5f6.tmp"]
    fresh = out / "models" / ".snapshot_epoch=3.pt.abcdefabcdef.tmp"  # a live writer's (newer than this process)
    kept = [fresh, out / ".hidden_notes.txt", out / "notes.0123456789ab.tmp", out / "BraTS2021_00000.nii.gz"]
    for path in stale + kept:
        path.write_bytes(b"x" * 100)
    for path in stale + kept[1:]:
        os.utime(path, (old, old))
    lock_output_dir(str(out), rank=0)
    release_output_dir(str(out))
    assert [p.exists() for p in stale] == [False, False]
    assert all(p.exists() for p in kept)


def test_atomic_writes_fsync_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    synced, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (synced.append(("replace", str(b))), real_replace(a, b)))
    target = tmp_path / "volumes.csv"
    with atomic_path(target) as tmp, open(tmp, "w") as f:
        f.write("case_id\n")
    assert len(synced) == 3 and synced[1] == ("replace", str(target))
    assert os.path.basename(synced[0]).startswith(".volumes.csv.") and synced[2] == str(tmp_path)


def test_an_output_dir_that_cannot_be_written_fails_before_the_first_case(cases, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    ThresholdNet.calls = 0
    with pytest.raises(DataError, match=rf"output_dir {blocker / 'out'} is not writable"):
        _run(inference_files(str(cases)), blocker / "out")
    assert ThresholdNet.calls == 0
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        if os.access(read_only, os.W_OK):
            return  # root: permissions do not stop it (the case above is the one every user can meet)
        with pytest.raises(DataError, match=rf"output_dir {read_only} is not writable"):
            _run(inference_files(str(cases)), read_only)
        assert ThresholdNet.calls == 0
    finally:
        read_only.chmod(0o755)


def test_a_volumes_csv_without_case_id_is_kept_aside_with_one_warning(cases, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    (out / "volumes.csv").write_text("name,size\nsomething,1\n")
    summary = _run(inference_files(str(cases)), out)
    assert len(summary.written) == 2
    assert (out / "volumes.csv.bak").read_text() == "name,size\nsomething,1\n"
    with open(out / "volumes.csv", newline="") as f:
        assert [r["case_id"] for r in csv.DictReader(f)] == ["BraTS2021_00000", "BraTS2021_00001"]
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "volumes.csv" in r.getMessage()]
    assert len(warnings) == 1 and "no case_id column" in warnings[0].getMessage()


def test_python_m_custom_evaluate_ends_a_failed_case_without_a_traceback(tmp_path):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    ref.mkdir()
    labels = np.zeros((8, 8, 8), np.uint8)
    labels[2:5, 2:5, 2:5] = 2
    for case in ("a", "b"):
        nib.save(nib.Nifti1Image(labels, np.eye(4)), str(ref / f"{case}.nii.gz"))
    nib.save(nib.Nifti1Image(labels, np.eye(4)), str(pred / "a.nii.gz"))  # b has no prediction
    result = subprocess.run(
        [sys.executable, "-m", "custom", "evaluate", "--pred_dir", str(pred), "--ref_dir", str(ref),
         "--output_csv", str(tmp_path / "m.csv")],
        cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "1 case(s) evaluated" in result.stdout and "1 failed (b)" in result.stdout
    assert result.stderr.strip().splitlines()[-1].startswith("  b: no prediction")
    assert (tmp_path / "m.csv").exists()


# ---------------------------------------------------------------------------------------------------------------
# issue 21: the quality check's tumor fraction is a fraction of the brain


def test_the_tumor_fraction_counts_only_tumor_inside_the_brain(cases, tmp_path):
    labels = np.zeros((10, 10, 10), np.uint8)
    brain = np.zeros_like(labels, bool)
    brain[:5] = True  # 500 brain voxels
    labels[5:] = 2  # 500 tumor voxels, all outside the brain
    labels[0, 0, :10] = 1  # and 10 inside it: 2% of the brain
    assert QualityCheck()(labels, 500, brain) == []
    flags = _run(inference_files(str(cases)), tmp_path / "out", EverythingNet()).flagged[0].flags
    (fraction,) = [f for f in flags if "whole tumor covers" in f]
    assert fraction.startswith("whole tumor covers 100% of the brain"), fraction
