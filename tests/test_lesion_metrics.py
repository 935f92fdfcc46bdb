"""Lesion-wise metrics (custom.evaluation.lesions with brats-evaluation / panoptica) on hand-made volumes.

The conversion to the package's label convention and the mapping of its results run without the package; the
tests that run it skip when the optional extra ``pip install -e .[brats]`` is not installed.
"""

from __future__ import annotations

import csv
import importlib.util
import math

import nibabel as nib
import numpy as np
import pytest
from custom.evaluation.folders import csv_columns, evaluate_folder
from custom.evaluation.lesions import LESION_METRICS, lesion_columns, lesion_metrics, to_gli_labels
from custom.evaluation.metrics import BRATS_MAX_HD95, case_metrics

HAVE_BRATS_EVALUATION = importlib.util.find_spec("brats_evaluation") is not None
needs_package = pytest.mark.skipif(
    not HAVE_BRATS_EVALUATION, reason="optional extra not installed: pip install -e '.[brats]' (brats-evaluation)"
)
SHAPE = (32, 32, 32)


def _two_lesions_three_predictions(et_label: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference: ET lesions A and B (6^3 cubes). Prediction: A shifted by 1 voxel along x (matched), a cube
    beside B that does not touch it (B is missed, the cube is a false positive) and one far away (false positive)."""
    ref, pred = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    ref[4:10, 4:10, 4:10] = et_label  # A
    ref[20:26, 4:10, 4:10] = et_label  # B
    pred[5:11, 4:10, 4:10] = et_label  # A shifted: Dice 2 * 180 / 432 = 5/6, HD95 1 voxel
    pred[20:23, 12:15, 4:7] = et_label  # beside B, 2 voxels away: no overlap
    pred[26:29, 26:29, 26:29] = et_label  # far away
    return pred, ref


# ---------------------------------------------------------------- without the package


def test_conversion_to_the_glioma_config_labels():
    # the trap: in the package's glioma config 4 is the resection cavity, so ET 4 must become 3 first
    labels = np.array([0, 1, 2, 4], np.uint8)
    assert to_gli_labels(labels, "brats2018").tolist() == [0, 1, 2, 3]
    assert to_gli_labels(np.array([0, 1, 2, 3]), "brats2023").tolist() == [0, 1, 2, 3]
    assert to_gli_labels(np.array([0, 1, 2, 3, 4]), "brats2024").tolist() == [0, 1, 2, 3, 4]


def test_columns_from_a_package_result():
    matched = {"tp": 1, "fp": 2, "fn": 1, "sq_dsc": 5 / 6, "pq_dsc": 1 / 3, "sq_hd95": 1.0}
    row = lesion_columns(matched, "et")
    assert list(row) == [f"{m}_et" for m in LESION_METRICS]
    assert (row["lesions_tp_et"], row["lesions_fp_et"], row["lesions_fn_et"]) == (1, 2, 1)
    assert row["lesion_dice_et"] == pytest.approx(5 / 6) and row["panoptic_dice_et"] == pytest.approx(1 / 3)
    assert row["brats23_lesion_dice_et"] == pytest.approx((5 / 6) / 4)  # sum of matched Dice / (TP + FP + FN)
    # empty in one map: the package gives Dice 0 and HD95 inf, written as the BraTS maximum
    missed = lesion_columns({"tp": 0, "fp": 0, "fn": 1, "sq_dsc": 0.0, "pq_dsc": 0.0, "sq_hd95": math.inf}, "et")
    assert missed["lesion_hd95_et"] == BRATS_MAX_HD95 and missed["brats23_lesion_dice_et"] == 0.0
    # empty in both: NaN means (left out of the summary rows), 1 for the 2023 formula
    empty = lesion_columns(
        {"tp": 0, "fp": 0, "fn": 0, "sq_dsc": math.nan, "pq_dsc": math.nan, "sq_hd95": math.nan}, "rc"
    )
    assert math.isnan(empty["lesion_dice_rc"]) and math.isnan(empty["lesion_hd95_rc"])
    assert empty["brats23_lesion_dice_rc"] == 1.0


# ---------------------------------------------------------------- with the package


@needs_package
def test_two_reference_lesions_three_predicted_by_hand():
    pred, ref = _two_lesions_three_predictions(et_label=3)
    row = lesion_metrics(pred, ref, (1.0, 1.0, 1.0), "brats2023", "brats2023")
    for region in ("et", "tc", "wt"):  # every lesion is ET, so TC and WT have the same lesions
        assert (row[f"lesions_tp_{region}"], row[f"lesions_fp_{region}"], row[f"lesions_fn_{region}"]) == (1, 2, 1)
        assert row[f"lesion_dice_{region}"] == pytest.approx(5 / 6)
        assert row[f"panoptic_dice_{region}"] == pytest.approx(5 / 6 * 2 / (2 + 2 + 1))  # SQ x RQ = 1/3
        assert row[f"lesion_hd95_{region}"] == pytest.approx(1.0)
        assert row[f"brats23_lesion_dice_{region}"] == pytest.approx(5 / 6 / 4)
    assert "lesions_tp_rc" not in row
    # the shift is along x: with 2 mm voxels along x the lesion HD95 is 2 mm
    assert lesion_metrics(pred, ref, (2.0, 1.0, 1.0), "brats2023", "brats2023")["lesion_hd95_et"] == pytest.approx(2.0)


@needs_package
def test_et_4_and_et_3_files_give_the_same_numbers():
    row3 = case_metrics(*_two_lesions_three_predictions(3), pred_et_label=3, ref_et_label=3, lesion_wise=True)
    row4 = case_metrics(*_two_lesions_three_predictions(4), pred_et_label=4, ref_et_label=4, lesion_wise=True)
    assert row3.keys() == row4.keys() and all(row3[k] == pytest.approx(row4[k]) for k in row3)
    assert row4["lesions_tp_et"] == 1 and row4["lesions_fp_et"] == 2  # ET 4 was not scored as resection cavity


@needs_package
def test_brats2024_adds_the_rc_region():
    pred, ref = _two_lesions_three_predictions(3)
    ref[12:16, 20:24, 20:24] = 4  # a resection cavity, predicted exactly
    pred[12:16, 20:24, 20:24] = 4
    row = case_metrics(pred, ref, pred_scheme="brats2024", ref_scheme="brats2024", lesion_wise=True)
    assert row["dice_rc"] == 1.0 and row["hd95_rc"] == 0.0
    assert (row["lesions_tp_rc"], row["lesions_fp_rc"], row["lesions_fn_rc"]) == (1, 0, 0)
    assert row["lesion_dice_rc"] == pytest.approx(1.0) and row["lesion_hd95_rc"] == pytest.approx(0.0)
    assert row["lesions_fp_et"] == 2  # RC is not tumor: no change to the tumor regions
    # no cavity in either map: counts 0, NaN means, 2023 formula 1
    pred[pred == 4], ref[ref == 4] = 0, 0
    row = case_metrics(pred, ref, pred_scheme="brats2024", ref_scheme="brats2024", lesion_wise=True)
    assert row["lesions_tp_rc"] == row["lesions_fp_rc"] == row["lesions_fn_rc"] == 0
    assert math.isnan(row["lesion_dice_rc"]) and row["brats23_lesion_dice_rc"] == 1.0 and row["dice_rc"] == 1.0


@needs_package
def test_evaluate_folder_writes_lesion_columns_and_summary_rows(tmp_path):
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    pred, ref = _two_lesions_three_predictions(3)
    empty = np.zeros(SHAPE, np.uint8)
    for case_id, (p, r) in {"c1": (pred, ref), "c2": (empty, empty)}.items():
        nib.save(nib.Nifti1Image(p, np.eye(4)), str(pred_dir / f"{case_id}.nii.gz"))
        nib.save(nib.Nifti1Image(r, np.eye(4)), str(ref_dir / f"{case_id}.nii.gz"))
    out = tmp_path / "m.csv"
    evaluate_folder(str(pred_dir), str(ref_dir), str(out), et_label=3, lesion_wise=True)
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == csv_columns(("wt", "tc", "et"), lesion_wise=True)
    by_id = {r["case_id"]: r for r in rows}
    assert float(by_id["c1"]["lesion_dice_et"]) == pytest.approx(5 / 6)
    assert by_id["c2"]["lesion_dice_et"] == "nan"  # empty in both maps
    # summary rows leave NaN out: the mean of lesion_dice is c1's; counts and the 2023 formula average both cases
    assert float(by_id["mean"]["lesion_dice_et"]) == pytest.approx(5 / 6)
    assert float(by_id["mean"]["lesions_fp_et"]) == pytest.approx(1.0)
    assert float(by_id["mean"]["brats23_lesion_dice_et"]) == pytest.approx((5 / 24 + 1) / 2)
