"""Evaluation of folders: matching prediction files to reference label maps (a BraTS dataset folder, a flat folder
or datalist entries), loading and checking them, the per-case rows and their CSV table with summary rows, and the
gathering of the rows of every rank under torchrun. The metrics themselves: ``custom.evaluation.metrics`` and
``custom.evaluation.lesions``.

Problems with the user's folders or cases are ``DataError``s (``EvaluationFailed`` when cases could not be scored,
also a ``RuntimeError`` as before), so that ``python -m custom evaluate`` and evaluate.json end with their messages
and a non-zero exit status, without a traceback.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from custom.core.distributed import rank_and_world_size
from custom.core.errors import DataError, DatasetNotFound
from custom.core.io import atomic_path
from custom.core.labels import LabelScheme, detect_label_scheme, get_scheme, scheme_for_et_label
from custom.core.naming import nifti_stem
from custom.data.discovery import discover_cases
from custom.evaluation.lesions import LESION_METRICS, _lesion_evaluator
from custom.evaluation.metrics import (
    CSV_COLUMNS,
    HD95_MODES,
    METRICS,
    REGIONS,
    both_empty_value,
    case_metrics,
    regions_of,
    summarize,
)

__all__ = ["CSV_COLUMNS", "csv_columns", "evaluate_folder", "evaluate_entries", "EvaluationFailed"]


class EvaluationFailed(DataError, RuntimeError):
    """Cases that could not be evaluated (no prediction, a mismatch, invalid labels): the others are in the table."""


def csv_columns(regions: Sequence[str] = REGIONS, lesion_wise: bool = False) -> list[str]:
    """CSV header: ``case_id``, the per-region metrics, then (``lesion_wise``) the lesion-wise ones."""
    columns = ["case_id"] + [f"{m}_{r}" for m in METRICS for r in regions]
    if lesion_wise:
        columns += [f"{m}_{r}" for m in LESION_METRICS for r in regions]
    return columns


def _flat_niftis(folder: Path) -> dict[str, Path]:
    """``{case_id: file}`` of the NIfTI files directly in ``folder`` (``.nii.gz`` preferred over ``.nii``)."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        stem = nifti_stem(path.name)
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
    """References of a BraTS dataset folder through ``custom.data.discovery.discover_cases``; empty when unusable."""
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

    ``ref_dir`` is a BraTS dataset folder (cases found with ``custom.data.discovery.discover_cases``, label files and their
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
    ``mean, std, median, 25quantile, 75quantile``; prints a one-line summary; then raises ``EvaluationFailed`` (a
    ``DataError`` and a ``RuntimeError``) listing the failed cases, if any. Returns the per-case rows followed by the
    summary rows.
    """
    if hd95_mode not in HD95_MODES:
        raise DataError(f"hd95_mode must be one of {HD95_MODES}, got {hd95_mode!r}.")
    pred_path, ref_path = Path(pred_dir), Path(ref_dir)
    if not pred_path.is_dir():
        raise DatasetNotFound(f"prediction folder {pred_path} does not exist: check --pred_dir.")
    if not ref_path.is_dir():
        raise DatasetNotFound(f"reference folder {ref_path} does not exist: check --ref_dir.")

    references, why_not_dataset = _dataset_references(ref_path)
    if not references:
        references = {case_id: (path, None) for case_id, path in _flat_references(ref_path).items()}
    if not references:
        detail = f" ({why_not_dataset})" if why_not_dataset else ""
        raise DatasetNotFound(
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
        raise DataError(f"hd95_mode must be one of {HD95_MODES}, got {hd95_mode!r}.")
    references = {str(e["case_id"]): (Path(e["label"]), et_label) for e in entries if e.get("label")}
    if not references:
        raise DataError("no labelled cases to evaluate: the entries have no `label` files.")
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
        raise DataError(f"expected true or false, got {value!r}")
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
        shared = (
            {int(ref_et_label)} if ref_et_label is not None else {e for _, e in references.values() if e is not None}
        )
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
                row[k] = metrics[k] if k in metrics else both_empty_value(k)
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
            raise EvaluationFailed(f"{len(failures)} case(s) could not be evaluated (see rank 0's report)")
        return table

    extra = sorted(set(predictions) - set(references))
    if extra:
        print(f"note: {len(extra)} prediction(s) without a reference, not evaluated: {', '.join(extra)}")

    _write_csv_atomic(table, output_csv, columns)
    failed = f"{len(failures)} failed" + (f" ({', '.join(f.split(':', 1)[0] for f in failures)})" if failures else "")
    if rows:
        mean = table[len(rows)]
        means = ", ".join(f"{r.upper()} {mean[f'dice_{r}']:.4f}" for r in regions)
        print(f"{len(rows)} case(s) evaluated, mean Dice {means}; {failed}; written to {output_csv}", flush=True)
    else:
        print(f"0 cases evaluated; {failed}; written to {output_csv}", flush=True)
    if failures:  # the command line prints this message once, without a traceback (a DataError)
        raise EvaluationFailed(f"{len(failures)} case(s) could not be evaluated:\n  " + "\n  ".join(failures))
    return table
