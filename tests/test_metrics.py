"""Tests of custom.metrics: BraTS rules on hand-made volumes, the real BraTS 2023 pair, folder evaluation."""

from __future__ import annotations

import csv
import math
import sys
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from custom.metrics import (
    BRATS_MAX_HD95,
    CSV_COLUMNS,
    REGIONS,
    case_metrics,
    evaluate_folder,
    labels_to_regions,
    region_metrics,
    summarize,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CASE_ID = "BraTS-GLI-00001-000"
SEG_2023 = DATA / CASE_ID / f"{CASE_ID}-seg.nii.gz"  # ET = 3
SEG_ISEN20 = DATA / "algorithm_segmentations" / f"{CASE_ID}_isen20.nii.gz"  # ET = 4

EXPECTED_COLUMNS = [
    "case_id",
    "dice_wt", "dice_tc", "dice_et",
    "hd95_wt", "hd95_tc", "hd95_et",
    "sensitivity_wt", "sensitivity_tc", "sensitivity_et",
    "specificity_wt", "specificity_tc", "specificity_et",
]  # fmt: skip
SUMMARY = ["mean", "std", "median", "25quantile", "75quantile"]


def _cube(shape, start, size):
    m = np.zeros(shape, dtype=bool)
    m[tuple(slice(s, s + size) for s in start)] = True
    return m


def _scipy_hd95(pred, ref, spacing, mode="max_directed"):
    """Independent HD95: scipy erosion for the surfaces, scipy's exact EDT for the distances."""
    e_pred = pred & ~ndimage.binary_erosion(pred)
    e_ref = ref & ~ndimage.binary_erosion(ref)
    d_pr = ndimage.distance_transform_edt(~e_ref, sampling=spacing)[e_pred]
    d_rp = ndimage.distance_transform_edt(~e_pred, sampling=spacing)[e_ref]
    if mode == "pooled":
        return float(np.percentile(np.concatenate([d_pr, d_rp]), 95))
    return float(max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)))


# ---------------------------------------------------------------- hand-made volumes


def test_dice_sensitivity_specificity_of_overlapping_cubes():
    shape = (20, 20, 20)
    ref = _cube(shape, (5, 5, 5), 4)  # 64 voxels
    pred = _cube(shape, (6, 5, 5), 4)  # shifted by 1 voxel: overlap 3 * 4 * 4 = 48
    m = region_metrics(pred, ref)
    assert m["dice"] == pytest.approx(2 * 48 / (64 + 64), rel=1e-6)
    assert m["sensitivity"] == pytest.approx(48 / 64)
    assert m["specificity"] == pytest.approx((8000 - 64 - 16) / (8000 - 64))
    # the neighbours are 1 voxel apart at most along axis 0 -> HD95 1 (isotropic)
    assert m["hd95"] == pytest.approx(1.0)


def test_hd95_uses_anisotropic_spacing():
    # A 6^3 cube vs the same cube shifted by 2 voxels along axis 2, spacing 2 mm along that axis.
    # Directed distances of A's 152 surface voxels: bottom face z=5 (36 voxels) -> 2 voxels * 2 mm = 4 mm;
    # side ring z=6 (20) -> 2 mm; side rings z=7..9 (60) -> 0; top face z=10: its ring (20) -> 0, the inner
    # 4x4 (16) lie 1 mm (12 voxels) or 2 mm (4 voxels) from B's sides. Sorted: 80 x 0, 12 x 1, 24 x 2, 36 x 4:
    # the 95th percentile (rank 143.45 of 0..151) is 4 mm; by symmetry the other direction too.
    shape = (20, 20, 20)
    a = _cube(shape, (5, 5, 5), 6)
    b = _cube(shape, (5, 5, 7), 6)
    for mode in ("max_directed", "pooled"):
        assert region_metrics(a, b, (1.0, 1.0, 2.0), hd95_mode=mode)["hd95"] == pytest.approx(4.0)
        assert region_metrics(b, a, (1.0, 1.0, 2.0), hd95_mode=mode)["hd95"] == pytest.approx(4.0)
    assert region_metrics(a, b, (1.0, 1.0, 1.0))["hd95"] == pytest.approx(2.0)
    # the spacing applies to the array axes in order: 2 mm along axis 0 leaves the axis-2 shift at 2 voxels
    assert region_metrics(a, b, (2.0, 1.0, 1.0))["hd95"] == pytest.approx(2.0)
    assert region_metrics(a, b, (2.0, 1.0, 1.0))["dice"] == pytest.approx(2 * 6 * 6 * 4 / (2 * 216))


def test_max_directed_and_pooled_differ_as_documented():
    # the prediction = reference cube + a small far blob: only the prediction->reference direction sees it
    shape = (24, 24, 24)
    ref = _cube(shape, (4, 4, 4), 8)  # 296 surface voxels
    pred = ref | _cube(shape, (15, 15, 15), 3)  # + 26 surface voxels far away (8 % of 322)
    hd_max = region_metrics(pred, ref, hd95_mode="max_directed")["hd95"]
    hd_pooled = region_metrics(pred, ref, hd95_mode="pooled")["hd95"]
    assert hd_max == pytest.approx(_scipy_hd95(pred, ref, (1, 1, 1)), abs=1e-5)
    assert hd_pooled == pytest.approx(_scipy_hd95(pred, ref, (1, 1, 1), "pooled"), abs=1e-5)
    assert hd_max > 3.0  # 26 of 322 distances are > 3 voxels
    assert hd_pooled == 0.0  # 26 of 618 pooled distances (4.2 %) are not enough to move the 95th percentile
    with pytest.raises(ValueError, match="hd95_mode"):
        region_metrics(pred, ref, hd95_mode="mean")


def test_hd95_matches_scipy_and_monai_on_random_blobs_touching_the_border():
    rng = np.random.default_rng(0)
    shape, spacing = (24, 20, 16), (1.0, 1.5, 2.5)
    pred = ndimage.gaussian_filter(rng.standard_normal(shape), 2) > 0.05
    ref = ndimage.gaussian_filter(rng.standard_normal(shape), 2) > 0.05
    assert pred[0].any() and ref[:, :, -1].any()  # blobs reach the volume's faces
    for mode in ("max_directed", "pooled"):
        assert region_metrics(pred, ref, spacing, mode)["hd95"] == pytest.approx(
            _scipy_hd95(pred, ref, spacing, mode), abs=1e-4
        )
    from monai.metrics import compute_hausdorff_distance

    monai_hd = compute_hausdorff_distance(
        torch.from_numpy(pred)[None, None].float(), torch.from_numpy(ref)[None, None].float(),
        include_background=True, percentile=95, spacing=spacing,
    )  # fmt: skip
    assert region_metrics(pred, ref, spacing)["hd95"] == pytest.approx(float(monai_hd), abs=1e-4)


def test_both_empty_and_one_empty_follow_the_brats_rules():
    shape = (20, 20, 20)
    empty = np.zeros(shape, dtype=bool)
    cube = _cube(shape, (2, 3, 4), 5)
    both = region_metrics(empty, empty.copy())
    assert both == {"dice": 1.0, "hd95": 0.0, "sensitivity": 1.0, "specificity": 1.0}
    missed = region_metrics(empty, cube)  # nothing predicted
    assert missed["dice"] == 0.0 and missed["hd95"] == BRATS_MAX_HD95 == 373.13
    assert missed["sensitivity"] == 0.0 and missed["specificity"] == 1.0
    false_alarm = region_metrics(cube, empty)  # nothing to find, something predicted
    assert false_alarm["dice"] == 0.0 and false_alarm["hd95"] == 373.13
    assert false_alarm["sensitivity"] == 0.0
    assert false_alarm["specificity"] == pytest.approx((8000 - 125) / 8000)
    for m in (both, missed, false_alarm):
        assert all(math.isfinite(v) for v in m.values())


def test_labels_to_regions_for_et_4_and_3():
    legacy = np.array([0, 1, 2, 4, 4, 2, 0])
    expected = {
        "wt": np.array([0, 1, 1, 1, 1, 1, 0], bool),
        "tc": np.array([0, 1, 0, 1, 1, 0, 0], bool),
        "et": np.array([0, 0, 0, 1, 1, 0, 0], bool),
    }
    for labels, et in ((legacy, 4), (np.where(legacy == 4, 3, legacy), 3)):
        regions = labels_to_regions(labels, et)
        assert set(regions) == set(REGIONS)
        for r in REGIONS:
            assert regions[r].dtype == bool
            np.testing.assert_array_equal(regions[r], expected[r])
    with pytest.raises(ValueError, match=r"\[4\].*et_label=3"):
        labels_to_regions(legacy, 3)  # ET written as 4 but read as 3 must not give an empty ET silently
    with pytest.raises(ValueError, match="et_label"):
        labels_to_regions(legacy, 2)


def test_case_metrics_keys_and_label_conventions():
    ref = np.zeros((12, 12, 12), np.uint8)
    ref[2:8, 2:8, 2:8] = 2
    ref[3:7, 3:7, 3:7] = 1
    ref[4:6, 4:6, 4:6] = 3
    pred = np.where(ref == 3, 4, ref)  # same segmentation, legacy ET label
    m = case_metrics(pred, ref, (1, 1, 1), pred_et_label=4, ref_et_label=3)
    assert list(m) == EXPECTED_COLUMNS[1:] == CSV_COLUMNS[1:]
    assert all(m[f"dice_{r}"] == 1.0 and m[f"hd95_{r}"] == 0.0 for r in REGIONS)
    with pytest.raises(ValueError, match="prediction"):
        case_metrics(pred, ref, (1, 1, 1), pred_et_label=3, ref_et_label=3)
    with pytest.raises(ValueError, match="shape"):
        case_metrics(pred[:-1], ref, (1, 1, 1), 4, 3)


def test_summarize_rows():
    rows = [{"case_id": f"c{i}", **{k: float(i) for k in CSV_COLUMNS[1:]}} for i in range(5)]  # 0..4
    summary = summarize(rows)
    assert [r["case_id"] for r in summary] == SUMMARY
    by_name = {r["case_id"]: r for r in summary}
    assert by_name["mean"]["dice_wt"] == 2.0
    assert by_name["std"]["hd95_et"] == pytest.approx(np.sqrt(2.0))  # population std of 0..4
    assert by_name["median"]["sensitivity_tc"] == 2.0
    assert by_name["25quantile"]["specificity_et"] == 1.0
    assert by_name["75quantile"]["dice_et"] == 3.0
    assert all(math.isnan(r["dice_wt"]) for r in summarize([]))


# ---------------------------------------------------------------- the real BraTS 2023 pair


@pytest.fixture(scope="module")
def real_pair():
    if not (SEG_2023.exists() and SEG_ISEN20.exists()):
        pytest.skip(f"real BraTS data not found under {DATA} (see shared/data/README.md)")
    ref_img, pred_img = nib.load(str(SEG_2023)), nib.load(str(SEG_ISEN20))
    spacing = tuple(float(z) for z in ref_img.header.get_zooms()[:3])
    return np.asanyarray(pred_img.dataobj), np.asanyarray(ref_img.dataobj), spacing


def test_real_pair_is_close_but_not_identical(real_pair):
    pred, ref, spacing = real_pair
    m = case_metrics(pred, ref, spacing, pred_et_label=4, ref_et_label=3)
    print("\nisen20 (ET=4) vs BraTS 2023 pseudo-label (ET=3):", {k: round(v, 4) for k, v in m.items()})
    for r in REGIONS:
        assert 0.85 < m[f"dice_{r}"] < 1.0
        assert 0.0 < m[f"hd95_{r}"] < 10.0
        assert 0.85 < m[f"sensitivity_{r}"] < 1.0
        assert 0.999 < m[f"specificity_{r}"] < 1.0
    # independent HD95 of one region (scipy EDT on the full volume, no cropping)
    p_wt = labels_to_regions(pred, 4)["wt"]
    r_wt = labels_to_regions(ref, 3)["wt"]
    assert m["hd95_wt"] == pytest.approx(_scipy_hd95(p_wt, r_wt, spacing), abs=1e-4)
    assert m["dice_wt"] == pytest.approx(2 * (p_wt & r_wt).sum() / (p_wt.sum() + r_wt.sum()), rel=1e-5)


def test_real_segmentation_against_itself(real_pair):
    pred, ref, spacing = real_pair
    for labels, et in ((ref, 3), (pred, 4)):
        m = case_metrics(labels, labels.copy(), spacing, et, et)
        assert all(m[f"dice_{r}"] == 1.0 and m[f"hd95_{r}"] == 0.0 for r in REGIONS)
        assert all(m[f"sensitivity_{r}"] == 1.0 and m[f"specificity_{r}"] == 1.0 for r in REGIONS)


# ---------------------------------------------------------------- evaluate_folder


def _read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def _link(target: Path, link: Path):
    link.symlink_to(target)


def test_evaluate_folder_flat_reports_missing_and_mismatched_cases(real_pair, tmp_path, capsys):
    pred, ref, spacing = real_pair
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    for case in ("caseA", "caseB", "caseC", "caseD"):
        _link(SEG_2023, ref_dir / f"{case}.nii.gz")  # BraTS 2023 references, ET = 3
    _link(SEG_ISEN20, pred_dir / "caseA.nii.gz")  # legacy prediction, ET = 4
    affine = nib.load(str(SEG_2023)).affine
    nib.save(nib.Nifti1Image(np.where(ref == 3, 4, ref).astype(np.uint8), affine), str(pred_dir / "caseB.nii"))
    # caseC: no prediction; caseD: wrong shape
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), affine), str(pred_dir / "caseD.nii.gz"))
    out = tmp_path / "results" / "metrics.csv"

    with pytest.raises(RuntimeError) as err:
        evaluate_folder(str(pred_dir), str(ref_dir), str(out), et_label=4, ref_et_label=3)
    message = str(err.value)
    assert "caseC" in message and "no prediction" in message
    assert "caseD" in message and "shape" in message and "caseD.nii.gz" in message
    assert "caseA" not in message and "caseB" not in message
    printed = capsys.readouterr().out
    assert "mean Dice" in printed and "caseC" in printed

    columns, rows = _read_csv(out)
    assert columns == EXPECTED_COLUMNS
    assert [r["case_id"] for r in rows] == ["caseA", "caseB"] + SUMMARY
    expected_a = case_metrics(pred, ref, spacing, 4, 3)
    for k, v in expected_a.items():
        assert float(rows[0][k]) == pytest.approx(v, rel=1e-6)
    assert all(float(rows[1][f"dice_{r}"]) == 1.0 and float(rows[1][f"hd95_{r}"]) == 0.0 for r in REGIONS)
    mean = rows[2]
    assert float(mean["dice_wt"]) == pytest.approx((expected_a["dice_wt"] + 1.0) / 2, rel=1e-6)
    assert not list(out.parent.glob(".*tmp"))  # the temporary file was renamed, not left behind


def test_evaluate_folder_wrong_et_label_is_a_reported_failure(real_pair, tmp_path):
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    _link(SEG_2023, ref_dir / "c.nii.gz")
    _link(SEG_ISEN20, pred_dir / "c.nii.gz")
    with pytest.raises(RuntimeError, match=r"c: reference: label values \[3\]"):
        evaluate_folder(str(pred_dir), str(ref_dir), str(tmp_path / "m.csv"), et_label=4)  # refs read with ET 4
    assert [r["case_id"] for r in _read_csv(tmp_path / "m.csv")[1]] == SUMMARY


def test_evaluate_folder_dataset_reference_uses_the_case_et_label(real_pair, tmp_path, monkeypatch):
    """A dataset folder goes through custom.data.discover_cases (stubbed here) and its per-case et_label."""
    pred, ref, spacing = real_pair
    calls = []

    def discover_cases(dataset_dir):
        calls.append(dataset_dir)
        case = types.SimpleNamespace(case_id=CASE_ID, images={}, label=SEG_2023, et_label=3)
        unlabelled = types.SimpleNamespace(case_id="no-label", images={}, label=None, et_label=3)
        return [case, unlabelled]

    monkeypatch.setitem(sys.modules, "custom.data", types.SimpleNamespace(discover_cases=discover_cases))
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    _link(SEG_ISEN20, pred_dir / f"{CASE_ID}.nii.gz")
    table = evaluate_folder(str(pred_dir), str(DATA), str(tmp_path / "m.csv"), et_label=4)
    assert calls == [str(DATA)]
    assert [r["case_id"] for r in table] == [CASE_ID] + SUMMARY
    assert table[0]["dice_et"] == pytest.approx(case_metrics(pred, ref, spacing, 4, 3)["dice_et"])


def test_evaluate_folder_falls_back_to_flat_matching(real_pair, tmp_path, monkeypatch):
    def discover_cases(dataset_dir):
        raise FileNotFoundError("not a BraTS dataset folder")

    monkeypatch.setitem(sys.modules, "custom.data", types.SimpleNamespace(discover_cases=discover_cases))
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    _link(SEG_2023, ref_dir / f"{CASE_ID}-seg.nii.gz")  # BraTS 2023 file name of a label map
    _link(SEG_2023, pred_dir / f"{CASE_ID}.nii.gz")
    table = evaluate_folder(str(pred_dir), str(ref_dir), str(tmp_path / "m.csv"), et_label=3)
    assert table[0]["case_id"] == CASE_ID and table[0]["dice_et"] == 1.0


def test_evaluate_folder_with_the_real_discover_cases(real_pair, tmp_path):
    data_module = pytest.importorskip("custom.data", reason="custom.data (discover_cases) is not written yet")
    if not hasattr(data_module, "discover_cases"):
        pytest.skip("custom.data has no discover_cases yet")
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    _link(SEG_ISEN20, pred_dir / f"{CASE_ID}.nii.gz")
    table = evaluate_folder(str(pred_dir), str(DATA / CASE_ID), str(tmp_path / "m.csv"), et_label=4)
    row = next(r for r in table if r["case_id"] == CASE_ID)
    assert 0.85 < row["dice_et"] < 1.0  # the reference was read with ET = 3, as the 2023 naming says
