"""Tests of custom.evaluation.metrics: BraTS rules on hand-made volumes, a real BraTS case's segmentations, folder evaluation."""

from __future__ import annotations

import csv
import math
import types
from dataclasses import dataclass
from pathlib import Path

import custom.evaluation.folders
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import swap_et
from custom.evaluation.folders import evaluate_folder
from custom.evaluation.metrics import (
    BRATS_MAX_HD95,
    CSV_COLUMNS,
    REGIONS,
    case_metrics,
    labels_to_regions,
    region_metrics,
    summarize,
)
from scipy import ndimage

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


# ---------------------------------------------------------------- segmentations of the real case (BRATS_TEST_CASE)

SHIFT = 2  # voxels along the first axis: the derived prediction is the reference moved by this much


@dataclass(frozen=True)
class RealPair:
    """The case's segmentation as reference; as prediction the same tumour with ET in the other convention, moved
    by ``SHIFT`` voxels: differs from the reference (Dice < 1) and uses the other ET label."""

    case_id: str
    ref: np.ndarray
    ref_path: Path
    ref_et: int
    pred: np.ndarray
    pred_path: Path
    pred_et: int
    spacing: tuple[float, float, float]


@pytest.fixture(scope="module")
def real_pair(labelled_case, tmp_path_factory) -> RealPair:
    ref_img = nib.load(labelled_case.label)
    ref, ref_et = np.asanyarray(ref_img.dataobj), labelled_case.et_label
    if not (ref == ref_et).any():
        pytest.skip(f"{labelled_case.case_id} has no enhancing tumour (label {ref_et}): these tests need one")
    pred = np.roll(swap_et(ref, ref_et), SHIFT, axis=0)
    pred_path = tmp_path_factory.mktemp("shifted") / "prediction.nii.gz"
    nib.save(nib.Nifti1Image(pred, ref_img.affine), str(pred_path))
    spacing = tuple(float(z) for z in ref_img.header.get_zooms()[:3])
    return RealPair(labelled_case.case_id, ref, labelled_case.label, ref_et, pred, pred_path, 7 - ref_et, spacing)


def test_real_pair_is_close_but_not_identical(labelled_case, algorithm_segmentation):
    """The case's segmentation against another algorithm's segmentation of the same case."""
    ref_img = nib.load(labelled_case.label)
    ref, pred = np.asanyarray(ref_img.dataobj), np.asanyarray(nib.load(algorithm_segmentation.path).dataobj)
    spacing = tuple(float(z) for z in ref_img.header.get_zooms()[:3])
    pred_et, ref_et = algorithm_segmentation.et_label, labelled_case.et_label
    m = case_metrics(pred, ref, spacing, pred_et_label=pred_et, ref_et_label=ref_et)
    print(
        f"\n{algorithm_segmentation.path.name} (ET={pred_et}) vs {labelled_case.label.name} (ET={ref_et}):",
        {k: round(v, 4) for k, v in m.items()},
    )
    for r in REGIONS:
        assert 0.0 <= m[f"dice_{r}"] <= 1.0 and 0.0 <= m[f"sensitivity_{r}"] <= 1.0
        assert 0.99 < m[f"specificity_{r}"] <= 1.0  # the tumour is a small part of the volume
    if labelled_case.case_id == "BraTS-GLI-00001-000" and algorithm_segmentation.path.name.endswith("_isen20.nii.gz"):
        for r in REGIONS:  # the top-ranked BraTS 2023 method against this case's reference: close, not identical
            assert 0.85 < m[f"dice_{r}"] < 1.0
            assert 0.0 < m[f"hd95_{r}"] < 10.0
            assert 0.85 < m[f"sensitivity_{r}"] < 1.0
            assert 0.999 < m[f"specificity_{r}"] < 1.0
    # independent HD95 and Dice of one region (scipy EDT on the full volume, no cropping)
    p_wt = labels_to_regions(pred, pred_et)["wt"]
    r_wt = labels_to_regions(ref, ref_et)["wt"]
    if p_wt.any() and r_wt.any():
        assert m["hd95_wt"] == pytest.approx(_scipy_hd95(p_wt, r_wt, spacing), abs=1e-4)
    assert m["dice_wt"] == pytest.approx(2 * (p_wt & r_wt).sum() / (p_wt.sum() + r_wt.sum()), rel=1e-5)


def test_real_shifted_segmentation(real_pair):
    """A pure translation by SHIFT voxels: every surface point is within SHIFT * spacing of the other surface."""
    p = real_pair
    m = case_metrics(p.pred, p.ref, p.spacing, pred_et_label=p.pred_et, ref_et_label=p.ref_et)
    for r in REGIONS:
        assert 0.0 < m[f"dice_{r}"] < 1.0
        assert 0.0 < m[f"hd95_{r}"] <= SHIFT * p.spacing[0] + 1e-6
    p_wt, r_wt = labels_to_regions(p.pred, p.pred_et)["wt"], labels_to_regions(p.ref, p.ref_et)["wt"]
    assert m["dice_wt"] == pytest.approx(2 * (p_wt & r_wt).sum() / (p_wt.sum() + r_wt.sum()), rel=1e-5)
    assert m["hd95_wt"] == pytest.approx(_scipy_hd95(p_wt, r_wt, p.spacing), abs=1e-4)


def test_real_segmentation_against_itself(labelled_case, other_convention_seg):
    ref_img = nib.load(labelled_case.label)
    spacing = tuple(float(z) for z in ref_img.header.get_zooms()[:3])
    own = other_convention_seg
    for path, et in ((labelled_case.label, labelled_case.et_label), (own.path, own.et_label)):
        labels = np.asanyarray(nib.load(path).dataobj)
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
    p = real_pair
    pred, ref, spacing = p.pred, p.ref, p.spacing
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    for case in ("caseA", "caseB", "caseC", "caseD"):
        _link(p.ref_path, ref_dir / f"{case}.nii.gz")  # references with the case's ET label
    _link(p.pred_path, pred_dir / "caseA.nii.gz")  # prediction with the other ET label
    affine = nib.load(str(p.ref_path)).affine
    nib.save(nib.Nifti1Image(swap_et(ref, p.ref_et).astype(np.uint8), affine), str(pred_dir / "caseB.nii"))
    # caseC: no prediction; caseD: wrong shape
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), affine), str(pred_dir / "caseD.nii.gz"))
    out = tmp_path / "results" / "metrics.csv"

    with pytest.raises(RuntimeError) as err:
        evaluate_folder(str(pred_dir), str(ref_dir), str(out), et_label=p.pred_et, ref_et_label=p.ref_et)
    message = str(err.value)
    assert "caseC" in message and "no prediction" in message
    assert "caseD" in message and "shape" in message and "caseD.nii.gz" in message
    assert "caseA" not in message and "caseB" not in message
    printed = capsys.readouterr().out
    assert "mean Dice" in printed and "caseC" in printed

    columns, rows = _read_csv(out)
    assert columns == EXPECTED_COLUMNS
    assert [r["case_id"] for r in rows] == ["caseA", "caseB"] + SUMMARY
    expected_a = case_metrics(pred, ref, spacing, p.pred_et, p.ref_et)
    assert expected_a["dice_wt"] < 1.0  # caseA differs from its reference
    for k, v in expected_a.items():
        assert float(rows[0][k]) == pytest.approx(v, rel=1e-6)
    assert all(float(rows[1][f"dice_{r}"]) == 1.0 and float(rows[1][f"hd95_{r}"]) == 0.0 for r in REGIONS)
    mean = rows[2]
    assert float(mean["dice_wt"]) == pytest.approx((expected_a["dice_wt"] + 1.0) / 2, rel=1e-6)
    assert not list(out.parent.glob(".*tmp"))  # the temporary file was renamed, not left behind


def test_evaluate_folder_wrong_et_label_is_a_reported_failure(real_pair, tmp_path):
    p = real_pair
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    # references with ET 3 read with ET 4 (the reverse, 4 read with ET 3, is the BraTS 2024 scheme: 4 = cavity)
    _link(p.ref_path if p.ref_et == 3 else p.pred_path, ref_dir / "c.nii.gz")
    _link(p.pred_path if p.pred_et == 4 else p.ref_path, pred_dir / "c.nii.gz")
    with pytest.raises(RuntimeError, match=r"c: reference: label values \[3\]"):
        evaluate_folder(str(pred_dir), str(ref_dir), str(tmp_path / "m.csv"), et_label=4)  # refs read with ET 4
    assert [r["case_id"] for r in _read_csv(tmp_path / "m.csv")[1]] == SUMMARY


def test_evaluate_folder_dataset_reference_uses_the_case_et_label(real_pair, tmp_path, monkeypatch):
    """A dataset folder goes through custom.data.discovery.discover_cases (stubbed here) and its per-case et_label."""
    p = real_pair
    calls = []

    def discover_cases(dataset_dir):
        calls.append(dataset_dir)
        case = types.SimpleNamespace(case_id=p.case_id, images={}, label=p.ref_path, et_label=p.ref_et)
        unlabelled = types.SimpleNamespace(case_id="no-label", images={}, label=None, et_label=p.ref_et)
        return [case, unlabelled]

    monkeypatch.setattr(custom.evaluation.folders, "discover_cases", discover_cases)
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    _link(p.pred_path, pred_dir / f"{p.case_id}.nii.gz")
    dataset = tmp_path / "dataset"  # any folder: discovery is stubbed
    dataset.mkdir()
    table = evaluate_folder(str(pred_dir), str(dataset), str(tmp_path / "m.csv"), et_label=p.pred_et)
    assert calls == [str(dataset)]
    assert [r["case_id"] for r in table] == [p.case_id] + SUMMARY
    assert table[0]["dice_et"] == pytest.approx(case_metrics(p.pred, p.ref, p.spacing, p.pred_et, p.ref_et)["dice_et"])


def test_evaluate_folder_falls_back_to_flat_matching(real_pair, tmp_path, monkeypatch):
    def discover_cases(dataset_dir):
        raise FileNotFoundError("not a BraTS dataset folder")

    monkeypatch.setattr(custom.evaluation.folders, "discover_cases", discover_cases)
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    p = real_pair
    _link(p.ref_path, ref_dir / p.ref_path.name)  # the label map's BraTS file name (<case>-seg or <case>_seg)
    _link(p.ref_path, pred_dir / f"{p.case_id}.nii.gz")
    table = evaluate_folder(str(pred_dir), str(ref_dir), str(tmp_path / "m.csv"), et_label=p.ref_et)
    assert table[0]["case_id"] == p.case_id and table[0]["dice_et"] == 1.0


def test_evaluate_folder_with_the_real_discover_cases(labelled_case, real_pair, tmp_path):
    data_module = pytest.importorskip(
        "custom.data.datalist", reason="custom.data.datalist (discover_cases) is not written yet"
    )
    if not hasattr(data_module, "discover_cases"):
        pytest.skip("custom.data.datalist has no discover_cases yet")
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    p = real_pair
    _link(p.pred_path, pred_dir / f"{p.case_id}.nii.gz")
    table = evaluate_folder(str(pred_dir), str(labelled_case.dir), str(tmp_path / "m.csv"), et_label=p.pred_et)
    row = next(r for r in table if r["case_id"] == p.case_id)
    # the reference was read with the ET label its naming implies (read with the prediction's, it would fail)
    assert row["dice_et"] == pytest.approx(case_metrics(p.pred, p.ref, p.spacing, p.pred_et, p.ref_et)["dice_et"])
    assert 0.0 < row["dice_et"] < 1.0


def test_evaluate_folder_reads_predictions_in_the_references_convention(tmp_path):
    """Inference writes ET 3 for a BraTS 2023 dataset: evaluating that folder needs no --et_label."""
    import shutil

    from custom.data.synthetic import case_files, synthesize

    dataset, predictions = tmp_path / "data", tmp_path / "pred"
    ids = synthesize(str(dataset), num_cases=2, shape=(32, 32, 32), seed=2, naming="2023")
    predictions.mkdir()
    for case_id in ids:
        shutil.copy(case_files(dataset / case_id, "2023")["seg"], predictions / f"{case_id}.nii.gz")
    table = evaluate_folder(str(predictions), str(dataset), str(tmp_path / "m.csv"))
    assert [row["dice_et"] for row in table[: len(ids)]] == [1.0] * len(ids)
