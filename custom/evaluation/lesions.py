"""Lesion-wise metrics of the BraTS 2023+ rankings through the official ``brats-evaluation`` package.

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
import functools
import io
import math
import warnings
from collections.abc import Sequence

import numpy as np
from custom.core.labels import BRATS_MAX_HD95, LabelScheme, get_scheme, regions_of

__all__ = ["LESION_METRICS", "to_gli_labels", "lesion_columns", "lesion_metrics"]

LESION_METRICS = (
    "lesions_tp", "lesions_fp", "lesions_fn", "lesion_dice", "panoptic_dice", "lesion_hd95", "brats23_lesion_dice"
)  # fmt: skip

_GLI_LABELS = {"netc": 1, "snfh": 2, "et": 3, "rc": 4}  # the label values of brats-evaluation's glioma config
_GLI_GROUPS = ("netc", "snfh", "et", "rc", "tc", "wt")


def to_gli_labels(labels: np.ndarray, scheme: str | LabelScheme) -> np.ndarray:
    """A label map of ``scheme`` in the convention of ``brats-evaluation``'s glioma config: 1 NETC, 2 SNFH, 3 ET,
    4 RC (uint8). BraTS 2018-2021 maps (ET 4) must go through this: handed over as they are, their ET would be
    scored as resection cavity."""
    scheme = get_scheme(scheme)
    labels = np.asarray(labels)
    out = np.zeros(labels.shape, np.uint8)
    out[labels == scheme.core_label] = _GLI_LABELS["netc"]
    out[labels == scheme.edema_label] = _GLI_LABELS["snfh"]
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
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(
        io.StringIO()
    ), warnings.catch_warnings():
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
