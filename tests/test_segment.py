"""Segmenting a folder: per-case input checks, quality flags, volumes.csv, the summary, skipping finished cases."""

import csv
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import CONFIG_DIR
from custom.core.errors import DataError
from custom.data.synthetic import case_files, synthesize
from custom.inference.inferer import inference_files
from custom.inference.segment import QualityCheck, label_volumes, segment_cases, split_by_size
from monai.bundle import ConfigParser


class ThresholdNet(torch.nn.Module):
    """Calls tumor wherever the z-scored FLAIR is bright: a stand-in network whose output follows the image."""

    def forward(self, x):
        bright = (x[:, 3:4] > 1.0).float() * 20 - 10
        return bright.repeat(1, 3, 1, 1, 1)


class NothingNet(torch.nn.Module):
    def forward(self, x):
        return torch.full((x.shape[0], 3, *x.shape[2:]), -10.0)


def _pipeline(output_dir, **overrides):
    """preprocessing, inferer, postprocessing and writer of inference.json, as the run uses them."""
    parser = ConfigParser()
    parser.read_config(str(CONFIG_DIR / "inference.json"))
    parser.update({"output_dir": str(output_dir), "tta": 2, "et_label": 4, "et_threshold": 0, **overrides})
    return {key: parser.get_parsed_content(key) for key in ("preprocessing", "inferer", "postprocessing", "writer")}


def _run(data, output_dir, network, **kwargs):
    parts = _pipeline(output_dir, **kwargs.pop("config", {}))
    return segment_cases(
        data,
        parts["preprocessing"],
        network,
        parts["inferer"],
        parts["postprocessing"],
        parts["writer"],
        progress=False,
        quality_check=QualityCheck(),
        **kwargs,
    )


def _rewrite(path: Path, transform) -> None:
    image = nib.load(str(path))
    data = transform(np.asanyarray(image.dataobj).astype(np.float32))
    header = image.header.copy()
    header.set_data_dtype(np.float32)
    nib.Nifti1Image(data, image.affine, header).to_filename(str(path))


@pytest.fixture()
def cases(tmp_path):
    root = tmp_path / "cases"
    synthesize(str(root), num_cases=3, shape=(32, 32, 32), seed=2, spacing=(1.0, 1.5, 2.5))
    return root


def test_nan_voxel_fails_its_case_and_the_others_are_written(cases, tmp_path, capsys):
    files = case_files(cases / "BraTS2021_00001")

    def one_nan(d):
        d[16, 16, 16] = np.nan
        return d

    _rewrite(files["t2"], one_nan)
    out = tmp_path / "out"
    with pytest.raises(DataError) as failure:  # the entry point turns it into a clean non-zero exit
        _run(inference_files(str(cases)), out, ThresholdNet())
    message = str(failure.value)
    assert "BraTS2021_00001" in message and "NaN" in message and "t2" in message
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["BraTS2021_00000.nii.gz", "BraTS2021_00002.nii.gz"]
    printed = capsys.readouterr().out
    assert "segmented 2 of 3 cases" in printed and "failed (not written):\n  BraTS2021_00001: " in printed


def test_blank_flair_is_a_warning_unless_strict(cases, tmp_path, capsys):
    _rewrite(case_files(cases / "BraTS2021_00002")["flair"], np.zeros_like)
    out = tmp_path / "out"
    summary = _run(inference_files(str(cases)), out, ThresholdNet())
    assert len(summary.written) == 3 and not summary.failed
    (flagged,) = [r for r in summary.flagged if r.case_id == "BraTS2021_00002"]
    assert "flair is zero everywhere" in "; ".join(flagged.flags)
    assert (
        "flagged (written; please look at them):\n  BraTS2021_00002: flair is zero everywhere"
        in capsys.readouterr().out
    )
    with pytest.raises(DataError, match="BraTS2021_00002: .*flair is zero everywhere"):
        _run(inference_files(str(cases)), tmp_path / "strict", ThresholdNet(), config={"strict": True})
    assert not (tmp_path / "strict" / "BraTS2021_00002.nii.gz").exists()


def test_empty_prediction_is_flagged_and_volumes_are_written(cases, tmp_path, capsys):
    out = tmp_path / "out"
    summary = _run(inference_files(str(cases)), out, NothingNet())
    assert len(summary.written) == 3 and {r.case_id for r in summary.flagged} == {
        f"BraTS2021_0000{i}" for i in range(3)
    }
    assert "empty prediction although the brain has" in capsys.readouterr().out
    with open(out / "volumes.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert all(r["qc"].startswith("empty prediction") and float(r["wt_ml"]) == 0 for r in rows)
    assert all(float(r["brain_ml"]) > 0 for r in rows)


def test_volumes_csv_is_voxel_counts_times_voxel_volume(cases, tmp_path):
    out = tmp_path / "out"
    _run(inference_files(str(cases)), out, ThresholdNet())
    with open(out / "volumes.csv", newline="") as f:
        rows = {r["case_id"]: r for r in csv.DictReader(f)}
    assert set(rows) == {f"BraTS2021_0000{i}" for i in range(3)}
    for case_id, row in rows.items():
        image = nib.load(out / f"{case_id}.nii.gz")
        labels = np.asarray(image.dataobj)
        assert image.header.get_zooms()[:3] == (1.0, 1.5, 2.5)  # anisotropic: 3.75 mm^3 per voxel
        voxel_ml = 1.0 * 1.5 * 2.5 / 1000
        assert float(row["ed_ml"]) == pytest.approx((labels == 2).sum() * voxel_ml, abs=1e-4)
        assert float(row["ncr_ml"]) == pytest.approx((labels == 1).sum() * voxel_ml, abs=1e-4)
        assert float(row["et_ml"]) == pytest.approx((labels == 4).sum() * voxel_ml, abs=1e-4)
        assert float(row["wt_ml"]) == pytest.approx((labels > 0).sum() * voxel_ml, abs=1e-4)
        assert float(row["tc_ml"]) == pytest.approx(np.isin(labels, (1, 4)).sum() * voxel_ml, abs=1e-4)
    assert (labels > 0).sum() > 0  # the stand-in network found something to measure


def test_label_volumes_by_hand():
    labels = np.zeros((4, 4, 4), np.uint8)
    labels[0, 0, :3] = 1
    labels[1, :2, 0] = 2
    labels[2, 0, 0] = 3
    labels[3, 0, :2] = 4
    # ET = 3 with BraTS 2024's resection cavity as 4; voxels of 2 x 1 x 0.5 mm = 1 microlitre
    assert label_volumes(labels, (2, 1, 0.5), et_label=3, rc_label=4) == {
        "ncr_ml": 0.003,
        "ed_ml": 0.002,
        "et_ml": 0.001,
        "rc_ml": 0.002,
        "tc_ml": 0.004,
        "wt_ml": 0.006,
    }
    assert label_volumes(labels, (1, 1, 1), et_label=4)["et_ml"] == 0.002


def test_rerun_skips_finished_cases_and_overwrite_redoes_them(cases, tmp_path, capsys):
    out = tmp_path / "out"
    data = inference_files(str(cases))
    _run(data, out, ThresholdNet())
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
    time.sleep(0.05)
    summary = _run(data, out, ThresholdNet())
    assert len(summary.of("skipped")) == 3 and {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")} == stamps
    assert "3 already written (skipped" in capsys.readouterr().out
    # other settings (here: another ET threshold) never keep an output made with the old ones
    summary = _run(data, out, ThresholdNet(), settings={"et_threshold": 10})
    assert len(summary.written) == 3
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
    (out / "BraTS2021_00001.nii.gz").write_bytes(b"truncated")  # a broken output is redone
    summary = _run(data, out, ThresholdNet(), settings={"et_threshold": 10})
    assert [r.case_id for r in summary.of("written")] == ["BraTS2021_00001"]
    summary = _run(data, out, ThresholdNet(), settings={"et_threshold": 10}, overwrite=True)
    assert len(summary.written) == 3 and all(
        p.stat().st_mtime_ns > stamps[p.name] for p in out.glob("*.nii.gz") if p.name != "BraTS2021_00001.nii.gz"
    )


def test_split_by_size_balances_voxels_and_covers_every_case_once():
    sizes = [100, 90, 10, 10, 50, 40, 5]
    parts = split_by_size(sizes, 2)
    assert sorted(i for part in parts for i in part) == list(range(7))
    totals = [sum(sizes[i] for i in part) for part in parts]
    assert totals == [150, 155] or totals == [155, 150]  # by count alone it could be 4 vs 3 cases of 250 vs 55
    assert split_by_size(sizes, 3) == split_by_size(sizes, 3)  # the same on every rank
    assert split_by_size([1, 1], 3)[2] == []  # more ranks than cases: a rank may get none
