"""BraTS evaluation: Dice, HD95, sensitivity and specificity of WT, TC and ET (and RC), per case and summarised,
plus the lesion-wise metrics of the BraTS 2023+ rankings through the official ``brats-evaluation`` package.

Regions (from a label map; ``et`` is 4 for BraTS 2018-2021 and 3 for BraTS 2023+, and a prediction and its
reference may use different conventions, hence the separate ``pred_et_label`` / ``ref_et_label``; the label
schemes are defined in ``custom.core.labels``):

- whole tumor ``wt`` = labels {1, 2, et}; tumor core ``tc`` = {1, et}; enhancing tumor ``et`` = {et};
- with ``label_scheme="brats2024"`` (labels 1, 2, 3 and resection cavity 4) also ``rc`` = {4}.

Label maps are checked: a value outside the scheme's labels raises a ``ValueError`` that names the values found,
so that ET written as 4 but read with ``et_label=3`` (or the reverse) cannot silently give an empty ET.

Per region, with ``P`` the predicted mask and ``R`` the reference mask, counts over the whole volume:

- **Dice**: MONAI's ``compute_dice(include_background=True, ignore_empty=False)``; 1 when both masks are empty,
  0 when exactly one is empty (the BraTS rule).
- **HD95** in millimetres, with the voxel spacing of the NIfTI header. Both empty: 0. Exactly one empty:
  ``BRATS_MAX_HD95`` = 373.13 mm (the value the BraTS platform reports, the diagonal of the 240x240x155 mm
  volume). Otherwise the surfaces are the boundary voxels of each mask (the voxels that a binary erosion with
  the 6-connected structure removes; MONAI's ``get_mask_edges``) and the distances are exact Euclidean
  distances in mm from every surface voxel of one mask to the nearest surface voxel of the other (MONAI's
  ``get_surface_distance``). Two published ways to turn those into one number:

  - ``hd95_mode="max_directed"`` (the default, the number this project reports): the larger of the two
    directed 95th percentiles, ``max(p95(d(P->R)), p95(d(R->P)))``. This is what MONAI's
    ``compute_hausdorff_distance(percentile=95)`` returns (the test suite checks the two agree) and the
    "robust Hausdorff" of DeepMind's ``surface-distance`` package (which, unlike this function, weights each
    surface element by its area).
  - ``hd95_mode="pooled"``: the 95th percentile of the distances of both directions pooled together,
    ``p95(d(P->R) U d(R->P))``; never larger than ``max_directed``.

  Percentiles interpolate linearly (``numpy.percentile``'s default, as ``torch.quantile`` in MONAI). For speed,
  both masks are first cropped to their joint bounding box plus one voxel, which changes no surface voxel.
- **Sensitivity** ``TP / (TP + FN)``. When the reference is empty this ratio is undefined; this module reports
  **1 when the prediction is empty too and 0 when it is not** (a false positive region, consistent with the
  Dice and HD95 rules for exactly one empty mask).
- **Specificity** ``TN / (TN + FP)`` over the whole volume (background included, hence values close to 1);
  1 when the reference has no background voxel.

``summarize`` gives the summary rows mean, std (population, ``ddof=0``), median, 25quantile and 75quantile (the
summary rows of the BraTS platform's result tables); NaN values (lesion-wise metrics of a region empty in both
maps) are left out of them, as the package does.

Lesion-wise metrics: ``custom.evaluation.lesions``; folders and CSV tables: ``custom.evaluation.folders``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from custom.core.labels import BRATS_MAX_HD95, LabelScheme, get_scheme, regions_of, scheme_for_et_label
from custom.evaluation.lesions import lesion_metrics
from monai.metrics import compute_dice
from monai.metrics.utils import get_mask_edges, get_surface_distance

__all__ = [
    "REGIONS",
    "METRICS",
    "BRATS_MAX_HD95",
    "HD95_MODES",
    "SUMMARY_ROWS",
    "CSV_COLUMNS",
    "labels_to_regions",
    "regions_of",
    "region_metrics",
    "case_metrics",
    "summarize",
    "both_empty_value",
]

REGIONS = ("wt", "tc", "et")
HD95_MODES = ("max_directed", "pooled")
METRICS = ("dice", "hd95", "sensitivity", "specificity")
SUMMARY_ROWS = ("mean", "std", "median", "25quantile", "75quantile")
CSV_COLUMNS = ["case_id"] + [f"{m}_{r}" for m in METRICS for r in REGIONS]  # the columns of ``case_metrics``


def labels_to_regions(
    labels: np.ndarray, et_label: int | None = None, check: bool = True, label_scheme: str | LabelScheme | None = None
) -> dict[str, np.ndarray]:
    """Boolean masks ``{"wt", "tc", "et"}`` (and ``"rc"`` for ``brats2024``) of a BraTS label map.

    The scheme is ``label_scheme``, or the one of ``et_label`` (4: ``brats2018``, 3: ``brats2023``). With
    ``check`` (default) a value outside the scheme's labels raises a ``ValueError`` naming it.
    """
    labels = np.asarray(labels)
    if et_label is not None and label_scheme is None and int(et_label) in (0, 1, 2):
        raise ValueError(f"et_label must not be 0, 1 or 2 (BraTS uses 4, or 3 since 2023), got {et_label}.")
    scheme = get_scheme(label_scheme, et_label)
    et_label = scheme.et_label
    masks = scheme.region_masks(labels)
    if check:
        known = masks["wt"] | (labels == 0)  # every label value is in WT or RC
        if "rc" in masks:
            known |= masks["rc"]
        bad = ~known
        if bad.any():
            found = np.unique(labels[bad]).tolist()
            expected = ", ".join(map(str, scheme.allowed_labels))
            hint = (
                "ET is 4 in BraTS 2018-2021 and 3 in BraTS 2023+: set the et_label of this file accordingly"
                + (
                    "; 2024+ data with a resection cavity (4) needs label_scheme brats2024"
                    if 4 in found and et_label == 3
                    else ""
                )
                + "."
            )
            raise ValueError(
                f"label values {found} are not BraTS labels for et_label={et_label} "
                f"(label_scheme {scheme.name}: expected {expected}); {hint}"
            )
    return {region: masks[region] for region in regions_of(scheme)}  # evaluation order: WT, TC, ET (, RC)


def _joint_bbox(pred: np.ndarray, ref: np.ndarray, margin: int = 1) -> tuple[slice, ...] | None:
    """Slices of the bounding box of ``pred | ref`` grown by ``margin`` voxels (clipped); None when both are empty."""
    union = pred | ref
    slices = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        idx = np.flatnonzero(union.any(axis=other))
        if idx.size == 0:
            return None
        slices.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + margin + 1, union.shape[axis])))
    return tuple(slices)


def _hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], hd95_mode: str) -> float:
    """HD95 in mm of two non-empty boolean masks (already cropped); see the module docstring."""
    edges_pred, edges_ref = get_mask_edges(pred, ref, crop=False)
    d_pred_to_ref = np.asarray(get_surface_distance(edges_pred, edges_ref, spacing=spacing), dtype=np.float64)
    d_ref_to_pred = np.asarray(get_surface_distance(edges_ref, edges_pred, spacing=spacing), dtype=np.float64)
    if hd95_mode == "pooled":
        return float(np.percentile(np.concatenate([d_pred_to_ref, d_ref_to_pred]), 95))
    return float(max(np.percentile(d_pred_to_ref, 95), np.percentile(d_ref_to_pred, 95)))


def region_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0), hd95_mode: str = "max_directed"
) -> dict[str, float]:
    """``{"dice", "hd95", "sensitivity", "specificity"}`` of a binary prediction against a binary reference.

    ``spacing`` is the voxel size in mm along the array axes (``header.get_zooms()[:3]``); HD95 is in mm.
    Empty masks follow the BraTS rules of the module docstring.
    """
    if hd95_mode not in HD95_MODES:
        raise ValueError(f"hd95_mode must be one of {HD95_MODES}, got {hd95_mode!r}.")
    pred, ref = np.asarray(pred).astype(bool, copy=False), np.asarray(ref).astype(bool, copy=False)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}.")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {spacing} must have one value per axis of the {pred.ndim}-D masks.")
    n_voxels = pred.size

    box = _joint_bbox(pred, ref)
    if box is None:  # both empty: nothing to find, nothing found
        p_crop, r_crop = pred[(slice(0, 1),) * pred.ndim], ref[(slice(0, 1),) * ref.ndim]
    else:
        p_crop, r_crop = pred[box], ref[box]
    tp = int(np.count_nonzero(p_crop & r_crop))
    n_pred, n_ref = int(np.count_nonzero(p_crop)), int(np.count_nonzero(r_crop))
    fp, fn = n_pred - tp, n_ref - tp
    tn = n_voxels - tp - fp - fn

    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]  # noqa: E731
    dice = float(compute_dice(as_tensor(p_crop), as_tensor(r_crop), include_background=True, ignore_empty=False))

    if n_pred == 0 and n_ref == 0:
        hd95 = 0.0
    elif n_pred == 0 or n_ref == 0:
        hd95 = BRATS_MAX_HD95
    else:
        hd95 = _hd95(p_crop, r_crop, spacing, hd95_mode)

    if n_ref == 0:
        sensitivity = 1.0 if n_pred == 0 else 0.0
    else:
        sensitivity = tp / (tp + fn)
    specificity = tn / (tn + fp) if (tn + fp) > 0 else 1.0
    return {"dice": dice, "hd95": hd95, "sensitivity": float(sensitivity), "specificity": float(specificity)}


def case_metrics(
    pred_labels: np.ndarray,
    ref_labels: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    pred_et_label: int = 4,
    ref_et_label: int = 4,
    hd95_mode: str = "max_directed",
    pred_scheme: str | LabelScheme | None = None,
    ref_scheme: str | LabelScheme | None = None,
    lesion_wise: bool = False,
) -> dict[str, float]:
    """Metrics of one case from two BraTS label maps: keys ``dice_wt, dice_tc, dice_et, hd95_wt, ...,
    sensitivity_*, specificity_*`` (the order of ``csv_columns``). Each map has its own label scheme
    (``pred_scheme`` / ``ref_scheme``, else the one of its ET label value); ``rc`` columns are added when one of
    them is ``brats2024``, the lesion-wise columns with ``lesion_wise``."""
    pred_labels, ref_labels = np.asarray(pred_labels), np.asarray(ref_labels)
    if pred_labels.shape != ref_labels.shape:
        raise ValueError(f"prediction shape {pred_labels.shape} differs from reference shape {ref_labels.shape}.")
    p_scheme = get_scheme(pred_scheme) if pred_scheme else None
    r_scheme = get_scheme(ref_scheme) if ref_scheme else None
    try:
        pred_regions = labels_to_regions(pred_labels, None if p_scheme else pred_et_label, label_scheme=p_scheme)
    except ValueError as e:
        raise ValueError(f"prediction: {e}") from None
    try:
        ref_regions = labels_to_regions(ref_labels, None if r_scheme else ref_et_label, label_scheme=r_scheme)
    except ValueError as e:
        raise ValueError(f"reference: {e}") from None
    p_scheme = p_scheme or scheme_for_et_label(pred_et_label)
    r_scheme = r_scheme or scheme_for_et_label(ref_et_label)
    regions = regions_of(p_scheme, r_scheme)
    empty = np.zeros(pred_labels.shape, bool)
    per_region = {
        r: region_metrics(pred_regions.get(r, empty), ref_regions.get(r, empty), spacing, hd95_mode) for r in regions
    }
    row = {f"{m}_{r}": per_region[r][m] for m in METRICS for r in regions}
    if lesion_wise:
        row.update(lesion_metrics(pred_labels, ref_labels, spacing, p_scheme, r_scheme, regions))
    return row


def summarize(rows: list[dict], columns: Sequence[str] | None = None) -> list[dict]:
    """Summary rows ``mean, std, median, 25quantile, 75quantile`` of per-case metric rows.

    The name of each statistic is in the ``case_id`` column; std is the population one (``ddof=0``); the
    quantiles interpolate linearly. NaN values (lesion-wise metrics of a region empty in both maps) are left
    out; a column without a value gives NaN. ``columns`` defaults to ``CSV_COLUMNS``.
    """
    keys = [k for k in (columns or CSV_COLUMNS) if k != "case_id"]
    values = {k: np.array([float(row[k]) for row in rows], dtype=np.float64) for k in keys}
    stats = {
        "mean": np.mean,
        "std": np.std,
        "median": np.median,
        "25quantile": lambda v: np.percentile(v, 25),
        "75quantile": lambda v: np.percentile(v, 75),
    }
    out = []
    for name in SUMMARY_ROWS:
        row: dict = {"case_id": name}
        for k in keys:
            v = values[k][~np.isnan(values[k])]
            row[k] = float(stats[name](v)) if v.size else float("nan")
        out.append(row)
    return out


def both_empty_value(column: str) -> float:
    """The value of ``column`` for a region empty in both maps (the BraTS rules; lesion-wise as the package)."""
    metric = column.rsplit("_", 1)[0]
    both_empty = {"dice": 1.0, "hd95": 0.0, "sensitivity": 1.0, "specificity": 1.0, "brats23_lesion_dice": 1.0}
    if metric in both_empty:
        return both_empty[metric]
    return 0 if metric.startswith("lesions_") else float("nan")
