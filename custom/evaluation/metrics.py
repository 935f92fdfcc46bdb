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

``evaluate_folder`` writes the per-case table plus the summary rows mean, std (population, ``ddof=0``),
median, 25quantile and 75quantile to a CSV (the summary rows of the BraTS platform's result tables); NaN values
(lesion-wise metrics of a region empty in both maps) are left out of the summary rows, as the package does.

Lesion-wise metrics (``lesion_wise=True``, optional extra ``pip install -e .[brats]``) are computed by
``panoptica`` with the glioma configuration of ``brats-evaluation`` (connected components of each region,
26-connectivity; one-to-one matching of predicted to reference lesions maximising Dice, any overlap counts).
That configuration reads 1 NETC, 2 SNFH, 3 ET, 4 RC, so every label map is converted to it first
(``to_gli_labels``): ET 4 of BraTS 2018-2021 files becomes 3, and only a ``brats2024`` map keeps a 4 (RC).
Per region: ``lesions_tp/fp/fn`` (matched reference lesions, unmatched predicted lesions, unmatched reference
lesions), ``lesion_dice`` (mean Dice of the matched pairs, the package's ``sq_dsc``), ``panoptic_dice``
(``sq_dsc * 2TP / (2TP + FP + FN)``, the package's ``pq_dsc``), ``lesion_hd95`` (mean HD95 of the matched
pairs in mm, ``sq_hd95``) and ``brats23_lesion_dice`` (the BraTS 2023 formula, sum of the matched Dice over
``TP + FP + FN``, on the package's matching). Region empty in both maps: the package gives NaN for the three
means (``brats23_lesion_dice`` 1, as the 2023 scripts); empty in exactly one: Dice 0 and HD95 infinite, written
as ``BRATS_MAX_HD95``.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_dice
from monai.metrics.utils import get_mask_edges, get_surface_distance

from custom.core.distributed import rank_and_world_size
from custom.core.io import atomic_path
from custom.core.labels import LabelScheme, detect_label_scheme, get_scheme, scheme_for_et_label

__all__ = [
    "REGIONS",
    "BRATS_MAX_HD95",
    "HD95_MODES",
    "CSV_COLUMNS",
    "SUMMARY_ROWS",
    "LESION_METRICS",
    "labels_to_regions",
    "regions_of",
    "csv_columns",
    "to_gli_labels",
    "lesion_columns",
    "lesion_metrics",
    "region_metrics",
    "case_metrics",
    "summarize",
    "evaluate_folder",
    "evaluate_entries",
]

REGIONS = ("wt", "tc", "et")
BRATS_MAX_HD95 = 373.13  # HD95 (mm) when exactly one of prediction / reference is empty
HD95_MODES = ("max_directed", "pooled")
METRICS = ("dice", "hd95", "sensitivity", "specificity")
CSV_COLUMNS = ["case_id"] + [f"{m}_{r}" for m in METRICS for r in REGIONS]
LESION_METRICS = (
    "lesions_tp", "lesions_fp", "lesions_fn", "lesion_dice", "panoptic_dice", "lesion_hd95", "brats23_lesion_dice"
)  # fmt: skip
SUMMARY_ROWS = ("mean", "std", "median", "25quantile", "75quantile")
_NIFTI_SUFFIXES = (".nii.gz", ".nii")


def regions_of(*schemes: LabelScheme) -> tuple[str, ...]:
    """``REGIONS`` plus ``"rc"`` when one of the schemes has a resection cavity."""
    return REGIONS + (("rc",) if any(s.rc_label is not None for s in schemes) else ())


def csv_columns(regions: Sequence[str] = REGIONS, lesion_wise: bool = False) -> list[str]:
    """CSV header: ``case_id``, the per-region metrics, then (``lesion_wise``) the lesion-wise ones."""
    columns = ["case_id"] + [f"{m}_{r}" for m in METRICS for r in regions]
    if lesion_wise:
        columns += [f"{m}_{r}" for m in LESION_METRICS for r in regions]
    return columns


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
    ncr, ed, et = labels == 1, labels == 2, labels == et_label
    rc = labels == scheme.rc_label if scheme.rc_label is not None else None
    if check:
        known = ncr | ed | et | (labels == 0)
        bad = ~(known | rc) if rc is not None else ~known
        if bad.any():
            found = np.unique(labels[bad]).tolist()
            expected = ", ".join(map(str, scheme.allowed_labels))
            hint = (
                "ET is 4 in BraTS 2018-2021 and 3 in BraTS 2023+: set the et_label of this file accordingly"
                + ("; 2024+ data with a resection cavity (4) needs label_scheme brats2024" if 4 in found and et_label == 3 else "")
                + "."
            )
            raise ValueError(
                f"label values {found} are not BraTS labels for et_label={et_label} "
                f"(label_scheme {scheme.name}: expected {expected}); {hint}"
            )
    tc = ncr | et
    regions = {"wt": tc | ed, "tc": tc, "et": et}
    if rc is not None:
        regions["rc"] = rc
    return regions


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


# ----------------------------------------------------------------------------------------------------------------
# lesion-wise metrics (brats-evaluation / panoptica)

_GLI_LABELS = {"netc": 1, "snfh": 2, "et": 3, "rc": 4}  # the label values of brats-evaluation's glioma config
_GLI_GROUPS = ("netc", "snfh", "et", "rc", "tc", "wt")


def to_gli_labels(labels: np.ndarray, scheme: str | LabelScheme) -> np.ndarray:
    """A label map of ``scheme`` in the convention of ``brats-evaluation``'s glioma config: 1 NETC, 2 SNFH, 3 ET,
    4 RC (uint8). BraTS 2018-2021 maps (ET 4) must go through this: handed over as they are, their ET would be
    scored as resection cavity."""
    scheme = get_scheme(scheme)
    labels = np.asarray(labels)
    out = np.zeros(labels.shape, np.uint8)
    out[labels == 1] = _GLI_LABELS["netc"]
    out[labels == 2] = _GLI_LABELS["snfh"]
    out[labels == scheme.et_label] = _GLI_LABELS["et"]
    if scheme.rc_label is not None:
        out[labels == scheme.rc_label] = _GLI_LABELS["rc"]
    return out


def lesion_columns(result: dict, region: str) -> dict[str, float]:
    """This module's lesion-wise columns of ``region`` from one panoptica group result (``PanopticaResult.to_dict``).

    ``lesion_dice``, ``panoptic_dice`` and ``lesion_hd95`` are the package's ``sq_dsc``, ``pq_dsc`` and ``sq_hd95``
    (NaN when the region is empty in both maps; an infinite HD95, no matched lesion, becomes ``BRATS_MAX_HD95``);
    ``brats23_lesion_dice`` is ``sq_dsc * TP / (TP + FP + FN)``, the sum of the matched lesions' Dice over all
    lesions (1 when there is no lesion at all, as the BraTS 2023 scripts).
    """
    tp, fp, fn = (int(result[k]) for k in ("tp", "fp", "fn"))
    as_float = lambda v: float("nan") if v is None else float(v)  # noqa: E731
    sq_dsc, pq_dsc, sq_hd95 = (as_float(result.get(k)) for k in ("sq_dsc", "pq_dsc", "sq_hd95"))
    if math.isinf(sq_hd95):
        sq_hd95 = BRATS_MAX_HD95
    n_lesions = tp + fp + fn
    brats23 = 1.0 if n_lesions == 0 else (sq_dsc * tp / n_lesions if tp else 0.0)
    values = {
        "lesions_tp": tp,
        "lesions_fp": fp,
        "lesions_fn": fn,
        "lesion_dice": sq_dsc,
        "panoptic_dice": pq_dsc,
        "lesion_hd95": sq_hd95,
        "brats23_lesion_dice": brats23,
    }
    return {f"{m}_{region}": values[m] for m in LESION_METRICS}


@functools.lru_cache(maxsize=1)
def _lesion_evaluator():
    """panoptica's evaluator with ``brats-evaluation``'s glioma config, loaded once (its banners silenced)."""
    try:
        import brats_evaluation
        from panoptica import Panoptica_Evaluator
    except ImportError as e:
        raise ImportError(
            f"lesion-wise metrics need the optional packages brats-evaluation and panoptica ({e}): "
            "pip install -e '.[brats]' (or pip install brats-evaluation)"
        ) from e
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Panoptica_Evaluator.load_from_config(str(brats_evaluation.config_path("gli")))


def lesion_metrics(
    pred_labels: np.ndarray,
    ref_labels: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    pred_scheme: str | LabelScheme = "brats2018",
    ref_scheme: str | LabelScheme = "brats2018",
    regions: Sequence[str] | None = None,
) -> dict[str, float]:
    """Lesion-wise columns (``LESION_METRICS`` x ``regions``) of one case, computed by panoptica with the glioma
    config of ``brats-evaluation`` after ``to_gli_labels``; ``regions`` defaults to ``regions_of(both schemes)``."""
    pred_scheme, ref_scheme = get_scheme(pred_scheme), get_scheme(ref_scheme)
    regions = tuple(regions) if regions else regions_of(pred_scheme, ref_scheme)
    evaluator = _lesion_evaluator()
    pred_gli, ref_gli = to_gli_labels(pred_labels, pred_scheme), to_gli_labels(ref_labels, ref_scheme)
    skip = [g for g in _GLI_GROUPS if g not in regions]
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # panoptica warns about its NSD threshold on every call
        results = evaluator.evaluate(
            pred_gli, ref_gli, voxelspacing=tuple(float(s) for s in spacing), skip_groups=skip, verbose=False
        )
    row: dict[str, float] = {}
    for region in regions:
        row.update(lesion_columns(results[region].to_dict(False), region))
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


def _strip_nifti(name: str) -> str | None:
    for suffix in _NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _flat_niftis(folder: Path) -> dict[str, Path]:
    """``{case_id: file}`` of the NIfTI files directly in ``folder`` (``.nii.gz`` preferred over ``.nii``)."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        stem = _strip_nifti(path.name)
        if stem is None or path.name.startswith(".") or not path.is_file():  # hidden: macOS "._" forks
            continue
        if stem not in found or path.name.endswith(".nii.gz"):
            found[stem] = path
    return found


def _flat_references(ref_dir: Path) -> dict[str, Path]:
    """References of a flat folder: ``<case_id>.nii.gz`` (``<case_id>-seg`` / ``_seg`` accepted too)."""
    refs: dict[str, Path] = {}
    for stem, path in _flat_niftis(ref_dir).items():
        for suffix in ("-seg", "_seg"):
            if stem.endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        refs[stem] = path
    return refs


def _dataset_references(ref_dir: Path) -> tuple[dict[str, tuple[Path, int | None]], str]:
    """References of a BraTS dataset folder through ``custom.data.datalist.discover_cases``; empty when unusable."""
    try:
        from custom.data.datalist import discover_cases  # imported lazily: evaluation works without it
    except ImportError as e:
        return {}, f"custom.data.datalist.discover_cases unavailable ({e})"
    try:
        cases = discover_cases(str(ref_dir))
    except Exception as e:  # not a dataset folder (e.g. a flat folder of labels): fall back to flat matching
        return {}, f"discover_cases({ref_dir}) failed: {e}"
    refs = {}
    for case in cases:
        label = getattr(case, "label", None)
        if label:
            refs[str(case.case_id)] = (Path(label), getattr(case, "et_label", None))
    return refs, "" if refs else f"discover_cases({ref_dir}) found no case with a label"


def _load_labels(path: Path) -> tuple[np.ndarray, tuple[float, ...], tuple[str, ...]]:
    """Label array, spacing (mm) and orientation codes of a NIfTI label map; non-integer values raise."""
    import nibabel as nib

    img = nib.load(str(path))
    if len(img.shape) != 3:
        raise ValueError(f"{path} has shape {img.shape}; a BraTS label map is 3-D.")
    data = np.asanyarray(img.dataobj)
    if not np.issubdtype(data.dtype, np.integer):
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            raise ValueError(f"{path} holds non-integer values; expected a label map.")
        data = rounded.astype(np.int16)
    spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
    return data, spacing, tuple(nib.aff2axcodes(img.affine))


def _write_csv_atomic(rows: list[dict], output_csv: Path, columns: Sequence[str] = CSV_COLUMNS) -> None:
    with atomic_path(output_csv) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in columns})


def evaluate_folder(
    pred_dir: str,
    ref_dir: str,
    output_csv: str,
    et_label: int | None = None,
    ref_et_label: int | None = None,
    hd95_mode: str = "max_directed",
    lesion_wise: bool = False,
    label_scheme: str | None = None,
) -> list[dict]:
    """Evaluate the predictions ``<pred_dir>/<case_id>.nii.gz`` (or ``.nii``) against the references of ``ref_dir``.

    ``ref_dir`` is a BraTS dataset folder (cases found with ``custom.data.datalist.discover_cases``, label files and their
    ET convention taken from it) or a flat folder of ``<case_id>.nii.gz`` label maps. ``et_label`` is the ET value
    of the predictions; ``ref_et_label`` that of the references (None: the dataset's own, or ``et_label`` for a
    flat folder). Spacing comes from the reference header.

    ``label_scheme`` (``brats2018``, ``brats2023``, ``brats2024``; see ``custom.core.labels``) sets the labels of both
    (``et_label`` / ``ref_et_label`` still override the ET value). Without it, references with ET 3 are read as
    ``brats2024`` when one of them holds label 4 (resection cavity; the predictions too, unless ``et_label`` is
    given), else as ``brats2023``. Predictions without ``et_label`` use the references' ET value when all references
    share one (what inference.json writes for that dataset), else 4. ``brats2024`` adds the ``rc`` columns.
    ``lesion_wise`` adds the lesion-wise columns (needs ``pip install -e .[brats]``; see the module docstring).

    Every reference case is evaluated or reported: a missing prediction, a shape / spacing / orientation
    mismatch or invalid labels make that case a failure, the other cases are still evaluated. Writes
    ``output_csv`` (atomically) with ``csv_columns``: one row per evaluated case, then the summary rows
    ``mean, std, median, 25quantile, 75quantile``; prints a one-line summary; then raises a ``RuntimeError``
    listing the failed cases, if any. Returns the per-case rows followed by the summary rows.
    """
    if hd95_mode not in HD95_MODES:
        raise ValueError(f"hd95_mode must be one of {HD95_MODES}, got {hd95_mode!r}.")
    pred_path, ref_path = Path(pred_dir), Path(ref_dir)
    if not pred_path.is_dir():
        raise FileNotFoundError(f"prediction folder {pred_path} does not exist.")
    if not ref_path.is_dir():
        raise FileNotFoundError(f"reference folder {ref_path} does not exist.")

    references, why_not_dataset = _dataset_references(ref_path)
    if not references:
        references = {case_id: (path, None) for case_id, path in _flat_references(ref_path).items()}
    if not references:
        detail = f" ({why_not_dataset})" if why_not_dataset else ""
        raise FileNotFoundError(
            f"no reference label maps in {ref_path}: expected a BraTS dataset folder or <case_id>.nii.gz files{detail}."
        )
    pred_scheme, ref_schemes = _resolve_schemes(references, et_label, ref_et_label, label_scheme)
    return _evaluate_references(
        references, ref_schemes, pred_scheme, pred_path, Path(output_csv), hd95_mode, lesion_wise
    )


def evaluate_entries(
    entries: list[dict],
    pred_dir: str,
    output_csv: str,
    et_label: int = 4,
    hd95_mode: str = "max_directed",
    lesion_wise: bool = False,
    label_scheme: str | None = None,
) -> list[dict]:
    """Evaluate ``<pred_dir>/<case_id>.nii.gz`` against the ``label`` files of datalist entries (one fold's
    validation cases); both use ``label_scheme`` (None: the scheme of ``et_label``). Same output, failure
    handling and return value as ``evaluate_folder``."""
    if hd95_mode not in HD95_MODES:
        raise ValueError(f"hd95_mode must be one of {HD95_MODES}, got {hd95_mode!r}.")
    references = {str(e["case_id"]): (Path(e["label"]), et_label) for e in entries if e.get("label")}
    if not references:
        raise ValueError("no labelled cases to evaluate: the entries have no `label` files.")
    scheme = get_scheme(label_scheme, et_label)
    return _evaluate_references(
        references, {c: scheme for c in references}, scheme, Path(pred_dir), Path(output_csv), hd95_mode, lesion_wise
    )


def _as_bool(value) -> bool:
    """A flag from Python or from a command line (``--lesion_wise true`` / ``false`` arrive as text)."""
    if isinstance(value, str):
        if value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if value.strip().lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"expected true or false, got {value!r}")
    return bool(value)


def _resolve_schemes(
    references: dict[str, tuple[Path, int | None]],
    et_label: int | None,
    ref_et_label: int | None,
    label_scheme: str | None,
) -> tuple[LabelScheme, dict[str, LabelScheme]]:
    """The predictions' scheme and each reference's (see ``evaluate_folder``)."""
    if label_scheme:
        return get_scheme(label_scheme, et_label), {c: get_scheme(label_scheme, ref_et_label) for c in references}
    if et_label is None:  # predictions written by inference.json follow their dataset's convention
        shared = {int(ref_et_label)} if ref_et_label is not None else {e for _, e in references.values() if e is not None}
        pred_default = shared.pop() if len(shared) == 1 else 4
    else:
        pred_default = et_label
    ref_ets = {
        c: int(ref_et_label if ref_et_label is not None else (case_et if case_et is not None else pred_default))
        for c, (_, case_et) in references.items()
    }
    ref_schemes = {c: scheme_for_et_label(et) for c, et in ref_ets.items()}
    et3 = [str(references[c][0]) for c, et in ref_ets.items() if et == 3]
    if et3 and ref_et_label is None and detect_label_scheme(et3, 3).name == "brats2024":
        rc = get_scheme("brats2024")
        ref_schemes.update({c: rc for c, et in ref_ets.items() if et == 3})
        print("references hold label 4 with ET 3: read as label_scheme brats2024 (4 = resection cavity)")
        if et_label is None:
            return rc, ref_schemes
    return scheme_for_et_label(pred_default), ref_schemes


def _evaluate_references(
    references: dict[str, tuple[Path, int | None]],
    ref_schemes: dict[str, LabelScheme],
    pred_scheme: LabelScheme,
    pred_path: Path,
    output_csv: Path,
    hd95_mode: str,
    lesion_wise: bool,
) -> list[dict]:
    predictions = _flat_niftis(pred_path) if pred_path.is_dir() else {}
    lesion_wise = _as_bool(lesion_wise)
    regions = regions_of(pred_scheme, *ref_schemes.values())
    columns = csv_columns(regions, lesion_wise)
    if lesion_wise:
        _lesion_evaluator()  # a missing optional package is one error, not one failure per case

    rows: list[dict] = []
    failures: list[str] = []
    rank, world_size = rank_and_world_size()  # under torchrun every rank scores its share, rank 0 writes the table
    for case_id in sorted(references)[rank::world_size]:
        ref_file, _ = references[case_id]
        pred_file = predictions.get(case_id)
        if pred_file is None:
            failures.append(f"{case_id}: no prediction {pred_path / (case_id + '.nii.gz')} (reference {ref_file})")
            continue
        try:
            pred, pred_spacing, pred_axes = _load_labels(pred_file)
            ref, spacing, ref_axes = _load_labels(ref_file)
            if pred.shape != ref.shape:
                raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
            if not np.allclose(pred_spacing, spacing, rtol=1e-3, atol=1e-4):
                raise ValueError(f"prediction spacing {pred_spacing} mm differs from reference spacing {spacing} mm")
            if pred_axes != ref_axes:
                raise ValueError(
                    f"prediction orientation {''.join(pred_axes)} differs from reference {''.join(ref_axes)}"
                )
            metrics = case_metrics(
                pred, ref, spacing, pred_et_label=pred_scheme.et_label, ref_et_label=ref_schemes[case_id].et_label,
                hd95_mode=hd95_mode, pred_scheme=pred_scheme, ref_scheme=ref_schemes[case_id], lesion_wise=lesion_wise,
            )  # fmt: skip
            row = {"case_id": case_id}
            for k in columns[1:]:  # a case without RC in its schemes: its rc columns score two empty masks
                row[k] = metrics[k] if k in metrics else _both_empty_value(k)
        except Exception as e:  # one bad case must not stop the others
            failures.append(f"{case_id}: {e} (prediction {pred_file}, reference {ref_file})")
            continue
        rows.append(row)

    if world_size > 1:  # every rank reaches this gather: all per-case errors were caught above
        gathered: list = [None] * world_size
        torch.distributed.all_gather_object(gathered, (rows, failures))
        rows = sorted((row for part, _ in gathered for row in part), key=lambda row: row["case_id"])
        failures = sorted(failure for _, part in gathered for failure in part)
    table = rows + summarize(rows, columns)
    if rank > 0:  # rank 0 writes and reports for all
        if failures:
            raise RuntimeError(f"{len(failures)} case(s) could not be evaluated (see rank 0's report)")
        return table

    extra = sorted(set(predictions) - set(references))
    if extra:
        print(f"note: {len(extra)} prediction(s) without a reference, not evaluated: {', '.join(extra)}")

    _write_csv_atomic(table, output_csv, columns)
    if rows:
        mean = table[len(rows)]
        means = ", ".join(f"{r.upper()} {mean[f'dice_{r}']:.4f}" for r in regions)
        print(f"{len(rows)} case(s) evaluated, mean Dice {means}; {len(failures)} failed; written to {output_csv}")
    else:
        print(f"0 cases evaluated; {len(failures)} failed; written to {output_csv}")
    if failures:
        print("failed cases:\n  " + "\n  ".join(failures))
        raise RuntimeError(f"{len(failures)} case(s) could not be evaluated:\n  " + "\n  ".join(failures))
    return table


def _both_empty_value(column: str) -> float:
    """The value of ``column`` for a region empty in both maps (the BraTS rules; lesion-wise as the package)."""
    metric = column.rsplit("_", 1)[0]
    both_empty = {"dice": 1.0, "hd95": 0.0, "sensitivity": 1.0, "specificity": 1.0, "brats23_lesion_dice": 1.0}
    if metric in both_empty:
        return both_empty[metric]
    return 0 if metric.startswith("lesions_") else float("nan")
