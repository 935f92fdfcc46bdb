"""BraTS label schemes in one place: label values, tumor regions, network channels, detection and conversions.

==============  ==========================  =========  ===============================================
scheme          labels (besides 0)          ET label   regions in network channel order
==============  ==========================  =========  ===============================================
``brats2018``   1 NCR/NET, 2 ED, 4 ET        4          TC {1, 4}, WT {1, 2, 4}, ET {4}
``brats2023``   1 NETC, 2 SNFH, 3 ET         3          TC {1, 3}, WT {1, 2, 3}, ET {3}
``brats2024``   1 NETC, 2 SNFH, 3 ET, 4 RC   3          TC {1, 3}, WT {1, 2, 3}, ET {3}, RC {4}
``msd``         1 edema, 2 NET, 3 ET         3          TC {2, 3}, WT {1, 2, 3}, ET {3}
==============  ==========================  =========  ===============================================

``brats2018`` covers the BraTS 2018-2021 releases (the paper's setting and this bundle's default), ``brats2023``
the 2023 releases, ``brats2024`` the 2024+ adult glioma (post-treatment) data with the resection cavity (RC).
RC is not tumor: it is in none of TC, WT and ET (as in the official ``brats-evaluation`` glioma config).

The file naming tells 2018-2021 (``<case>_t1ce.nii.gz``: ET 4) from 2023+ (``<case>-t1c.nii.gz``: ET 3), but
2023 and 2024 use the same naming: a 2023+ dataset is ``brats2024`` when most of its label maps hold the value 4.

``msd`` is the Medical Segmentation Decathlon's Task01_BrainTumour (BraTS 2016/2017 cases relabelled): edema and
the non-enhancing core swap values (1 edema, 2 non-enhancing tumor, 3 enhancing tumour). A Decathlon
``dataset.json`` declares its labels by name (``"labels": {"0": "background", "1": "edema", ...}``);
``scheme_from_label_names`` reads such a map, and datalists made from such a tree carry ``"label_scheme": "msd"``.
Predictions are written back in the scheme's own values (``regions_to_labels``).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = [
    "LabelScheme",
    "SCHEMES",
    "DEFAULT_SCHEME",
    "ET_LABELS",
    "BRATS_MAX_HD95",
    "regions_of",
    "get_scheme",
    "scheme_for_et_label",
    "allowed_labels",
    "distinct_values",
    "label_values",
    "detect_label_scheme",
    "scheme_from_label_names",
    "resolve_label_scheme",
    "labels_to_regions",
    "regions_to_labels",
    "LabelsToRegionsd",
]


@dataclass(frozen=True)
class LabelScheme:
    """One BraTS labelling convention (see the module table)."""

    name: str
    labels: tuple[int, ...]  # label values besides background 0
    et_label: int
    rc_label: int | None
    region_labels: dict[str, tuple[int, ...]] = field(hash=False)  # region -> label values, network channel order

    @property
    def regions(self) -> tuple[str, ...]:
        """Region names in network channel order: ``("tc", "wt", "et")`` or ``("tc", "wt", "et", "rc")``."""
        return tuple(self.region_labels)

    @property
    def out_channels(self) -> int:
        return len(self.region_labels)

    @property
    def allowed_labels(self) -> tuple[int, ...]:
        return (0,) + self.labels

    @property
    def edema_label(self) -> int:
        """The value of the whole tumour outside the core (edema / SNFH): 2 in BraTS, 1 in ``msd``."""
        (value,) = set(self.region_labels["wt"]) - set(self.region_labels["tc"])
        return value

    @property
    def core_label(self) -> int:
        """The value of the tumour core outside ET (necrosis / non-enhancing core): 1 in BraTS, 2 in ``msd``."""
        (value,) = set(self.region_labels["tc"]) - set(self.region_labels["et"])
        return value

    @property
    def volume_labels(self) -> dict[str, int | None]:
        """The values ``volumes.csv`` counts (``custom.inference.segment.label_volumes`` keywords)."""
        return {
            "et_label": self.et_label,
            "rc_label": self.rc_label,
            "core_label": self.core_label,
            "edema_label": self.edema_label,
        }

    def to_regions(self, labels):
        """Label map -> region masks ``(C, H, W, D)`` in network channel order (``labels_to_regions``)."""
        return labels_to_regions(labels, self)

    def to_labels(self, regions, et_threshold: int = 0):
        """Region masks in network channel order -> one label map, uint8 (``regions_to_labels``)."""
        return regions_to_labels(regions, self, et_threshold)

    def region_masks(self, labels: np.ndarray) -> dict[str, np.ndarray]:
        """Boolean masks ``{region: labels in region}`` of a label map, in network channel order: one comparison per
        label value (5x faster than ``np.isin`` on a 240x240x155 map)."""
        labels = np.asarray(labels)
        is_value = {v: labels == v for v in sorted({v for values in self.region_labels.values() for v in values})}
        masks = {}
        for region, values in self.region_labels.items():
            mask = is_value[values[0]]
            for v in values[1:]:  # `|`, not a copy and `|=`: keeps the memory order (NIfTI data is Fortran-ordered)
                mask = mask | is_value[v]
            masks[region] = mask
        return masks

    def __str__(self) -> str:
        return self.name


def _scheme(name: str, et: int, rc: int | None) -> LabelScheme:
    regions = {"tc": (1, et), "wt": (1, 2, et), "et": (et,)}
    if rc is not None:
        regions["rc"] = (rc,)
    return LabelScheme(name, tuple(sorted({1, 2, et} | ({rc} if rc else set()))), et, rc, regions)


SCHEMES: dict[str, LabelScheme] = {
    s.name: s for s in (_scheme("brats2018", 4, None), _scheme("brats2023", 3, None), _scheme("brats2024", 3, 4))
}
# Medical Segmentation Decathlon Task01_BrainTumour: 1 edema, 2 non-enhancing tumor, 3 enhancing tumour
SCHEMES["msd"] = LabelScheme("msd", (1, 2, 3), 3, None, {"tc": (2, 3), "wt": (1, 2, 3), "et": (3,)})
_ET_SWAPPABLE = ("brats2018", "brats2023")  # the schemes an explicit et_label turns into each other
DEFAULT_SCHEME = "brats2018"  # the paper's data (BraTS 2019)
BRATS_MAX_HD95 = 373.13  # HD95 (mm) the BraTS platform reports when exactly one of prediction / reference is empty
ET_LABELS = tuple(sorted({s.et_label for s in SCHEMES.values()}))  # (3, 4)


def get_scheme(label_scheme: str | LabelScheme | None = None, et_label: int | None = None) -> LabelScheme:
    """The ``LabelScheme`` named ``label_scheme`` (None: from ``et_label``, else the default ``brats2018``).

    ``et_label`` given with a scheme overrides its ET value where that names another scheme (``brats2018`` with
    ET 3 is ``brats2023`` and the reverse), so that an explicit ``et_label`` keeps working; ``brats2024`` with
    ET 4 is a contradiction (4 is RC there) and raises.
    """
    if isinstance(label_scheme, LabelScheme):
        scheme = label_scheme
    elif label_scheme in (None, ""):
        return scheme_for_et_label(et_label) if et_label is not None else SCHEMES[DEFAULT_SCHEME]
    else:
        name = str(label_scheme).lower()
        if name not in SCHEMES:
            raise ValueError(
                f"label_scheme must be one of {', '.join(SCHEMES)} (labels 1, 2, 4 / 1, 2, 3 / 1, 2, 3 + RC 4), "
                f"got {label_scheme!r}"
            )
        scheme = SCHEMES[name]
    if et_label is None or int(et_label) == scheme.et_label:
        return scheme
    if scheme.name in _ET_SWAPPABLE:
        return scheme_for_et_label(et_label)
    other = f", RC is {scheme.rc_label}" if scheme.rc_label is not None else ""
    raise ValueError(
        f"et_label {et_label} contradicts label_scheme {scheme.name} (ET is {scheme.et_label}{other}); "
        "drop et_label or pick label_scheme brats2018 (ET 4) / brats2023 (ET 3)"
    )


def regions_of(*schemes: LabelScheme) -> tuple[str, ...]:
    """The evaluated regions ``("wt", "tc", "et")`` plus ``"rc"`` when one of the schemes has a resection cavity."""
    return ("wt", "tc", "et") + (("rc",) if any(s.rc_label is not None for s in schemes) else ())


def scheme_for_et_label(et_label: int) -> LabelScheme:
    """``brats2018`` for ET 4, ``brats2023`` for ET 3 (the two schemes without RC)."""
    try:
        value = int(et_label)
    except (TypeError, ValueError):
        value = None
    if isinstance(et_label, bool) or value not in ET_LABELS:
        raise ValueError(f"et_label must be 4 (BraTS 2018-2021 labels) or 3 (BraTS 2023+ labels), got {et_label!r}")
    return SCHEMES["brats2018" if value == 4 else "brats2023"]


def allowed_labels(label_scheme: str | LabelScheme | None = None, et_label: int | None = None) -> tuple[int, ...]:
    """The label values a label map of this scheme may hold, background included (for validation)."""
    return get_scheme(label_scheme, et_label).allowed_labels


def distinct_values(data: np.ndarray) -> np.ndarray:
    """The distinct finite values of a label map, sorted (a bincount for small non-negative integers: about twice
    as fast as ``np.unique`` on a 240x240x155 uint8 map)."""
    if np.issubdtype(data.dtype, np.integer) and data.size and data.min() >= 0 and data.max() < 65536:
        return np.flatnonzero(np.bincount(data.ravel().astype(np.int64, copy=False)))
    return np.unique(data[np.isfinite(data)] if np.issubdtype(data.dtype, np.floating) else data)


def label_values(path: str) -> set[int]:
    """The distinct values of a label map file, rounded to integers (voxel data read)."""
    import nibabel as nib

    return {int(v) for v in np.rint(distinct_values(np.asanyarray(nib.load(str(path)).dataobj)))}


DETECTION_SAMPLE = 15  # label maps read to detect the scheme of a 2023+ dataset


def detect_label_scheme(label_files: Iterable[str], et_label: int = 4) -> LabelScheme:
    """The scheme of a dataset from its naming's ET label and, for 2023+ naming, its label maps.

    ET 4 (2018-2021 naming) is ``brats2018``; the files are not read. ET 3 (2023+ naming) is ``brats2024`` when
    most label maps hold the value 4 (RC), else ``brats2023``: a few maps with a stray 4 in 2023 data are errors
    for validation to report, not a reason to read 4 as RC. Files are read until the majority is known (half of
    them or more; pass ``label_scheme`` to skip this). At most ``DETECTION_SAMPLE`` maps, evenly spread over the
    list, are read (0.4 s each for 240x240x155), so the start of a training on 1,251 cases stays quick.
    """
    scheme = scheme_for_et_label(et_label)
    if scheme.name == "brats2018":
        return scheme
    files = [str(p) for p in label_files if p]
    if len(files) > DETECTION_SAMPLE:
        files = [files[int(i)] for i in np.linspace(0, len(files) - 1, DETECTION_SAMPLE).round()]
    rc, with_rc, without_rc = SCHEMES["brats2024"].rc_label, 0, 0
    for path in files:
        try:
            values = label_values(path)
        except Exception:  # noqa: BLE001 - an unreadable map is the pre-flight's to report
            values = set()
        if rc in values:
            with_rc += 1
        else:
            without_rc += 1
        if 2 * with_rc > len(files):
            return SCHEMES["brats2024"]
        if 2 * without_rc >= len(files):
            return scheme
    return scheme


_MSD_LABEL_WORDS = {1: ("edema",), 2: ("non-enhancing", "non enhancing", "nonenhancing"), 3: ("enhancing",)}
_BRATS_LABEL_WORDS = {1: ("necro", "non-enhancing", "netc", "ncr"), 2: ("edema", "snfh")}


def scheme_from_label_names(label_names: Mapping | None) -> LabelScheme | None:
    """The scheme a decathlon ``dataset.json``'s ``"labels"`` map (``{"0": "background", "1": "edema", ...}``) names.

    ``msd`` when 1 is edema, 2 non-enhancing tumour and 3 enhancing tumour (Task01_BrainTumour); ``brats2023`` /
    ``brats2018`` when 1 is necrosis / non-enhancing core, 2 edema and 3 / 4 enhancing tumour (a BraTS tree described
    the decathlon way); None when the map is missing or names something else (the caller falls back to detection)."""
    if not isinstance(label_names, Mapping) or not label_names:
        return None
    try:
        names = {int(k): str(v).strip().lower() for k, v in label_names.items()}
    except (TypeError, ValueError):
        return None
    names.pop(0, None)

    def is_(value: int, words: tuple[str, ...], exclude: tuple[str, ...] = ()) -> bool:
        name = names.get(value, "")
        return any(w in name for w in words) and not any(w in name for w in exclude)

    negated = ("non-enhancing", "non enhancing", "nonenhancing")
    if set(names) == {1, 2, 3} and is_(1, _MSD_LABEL_WORDS[1]) and is_(2, _MSD_LABEL_WORDS[2]):
        if is_(3, _MSD_LABEL_WORDS[3], negated):
            return SCHEMES["msd"]
    for et in (3, 4):
        edema = is_(2, _BRATS_LABEL_WORDS[2]) or names.get(2) == "ed"
        if set(names) == {1, 2, et} and is_(1, _BRATS_LABEL_WORDS[1]) and edema:
            if is_(et, ("enhancing",), negated) or names[et] == "et":
                return scheme_for_et_label(et)
    return None


def resolve_label_scheme(datalist: Mapping, label_scheme: str | LabelScheme | None = None) -> LabelScheme:
    """The scheme to train / evaluate with: ``label_scheme`` if given, else the datalist's ``"label_scheme"``, else
    the one its decathlon ``"labels"`` map names (``scheme_from_label_names``: ``msd`` for Task01_BrainTumour), else
    detected (``detect_label_scheme``) from the datalist's ``"et_label"`` (its naming) and its label files."""
    if label_scheme not in (None, ""):
        return get_scheme(label_scheme)
    if datalist.get("label_scheme"):
        return get_scheme(datalist["label_scheme"])
    named = scheme_from_label_names(datalist.get("labels"))
    if named is not None:
        return named
    labels = [e.get("label") for e in datalist.get("training", []) if isinstance(e, Mapping)]
    return detect_label_scheme(labels, datalist.get("et_label", SCHEMES[DEFAULT_SCHEME].et_label))


def labels_to_regions(labels, label_scheme: str | LabelScheme | None = None, et_label: int | None = None):
    """Label map ``(H, W, D)`` or ``(1, H, W, D)`` -> boolean region masks ``(C, H, W, D)`` in channel order.

    Tensor in, bool tensor out (numpy in, numpy out). For ``brats2018`` / ``brats2023`` this equals MONAI's
    ``ConvertToMultiChannelBasedOnBratsClasses(et_label)`` (tested); ``brats2024`` adds RC as a fourth channel.
    """
    scheme = get_scheme(label_scheme, et_label)
    is_tensor = isinstance(labels, torch.Tensor)
    if labels.ndim == 4 and labels.shape[0] == 1:
        labels = labels[0]
    if is_tensor:
        masks = [
            torch.isin(labels, torch.tensor(v, device=labels.device, dtype=labels.dtype))
            for v in scheme.region_labels.values()
        ]
        return torch.stack(masks, dim=0)
    labels = np.asarray(labels)
    return np.stack([np.isin(labels, v) for v in scheme.region_labels.values()], axis=0)


def regions_to_labels(
    regions, label_scheme: str | LabelScheme | None = None, et_threshold: int = 0, et_label: int | None = None
):
    """Binary region masks ``(C, H, W, D)`` in channel order (TC, WT, ET[, RC]) -> one label map ``(H, W, D)`` uint8.

    The tumor regions are nested (ET in TC in WT): labels go from the outside in, WT -> the edema label (2; 1 in
    ``msd``), TC -> the core label (1; 2 in ``msd``), ET -> the scheme's ET label, and a voxel an independent sigmoid
    puts in an inner region but not in an outer one counts as in both. When the case's ET volume is below
    ``et_threshold`` voxels the ET voxels get the core label (the paper's post-processing). With RC (``brats2024``),
    RC voxels outside the whole tumor become label 4: the tumor wins where both are predicted.
    """
    scheme = get_scheme(label_scheme, et_label)
    is_tensor = isinstance(regions, torch.Tensor)
    masks = regions.bool() if is_tensor else np.asarray(regions).astype(bool)
    if masks.ndim != 4 or masks.shape[0] != scheme.out_channels:
        raise ValueError(
            f"label_scheme {scheme.name} expects ({scheme.out_channels}, H, W, D) masks in "
            f"{', '.join(r.upper() for r in scheme.regions)} order, got {tuple(masks.shape)}."
        )
    tc, wt, et = masks[0], masks[1], masks[2]
    wt = wt | tc | et
    tc = tc | et
    if is_tensor:
        labels = torch.zeros(wt.shape, dtype=torch.uint8, device=masks.device)
    else:
        labels = np.zeros(wt.shape, np.uint8)
    labels[wt] = scheme.edema_label
    labels[tc] = scheme.core_label
    if int(et.sum()) >= max(int(et_threshold), 1):
        labels[et] = scheme.et_label
    if scheme.rc_label is not None:
        labels[masks[3] & ~wt] = scheme.rc_label
    return labels


class LabelsToRegionsd(MapTransform):
    """Dictionary transform: a BraTS label map -> region masks ``(C, H, W, D)`` (TC, WT, ET[, RC]) of the scheme.

    The scheme-aware replacement of MONAI's ``ConvertToMultiChannelBasedOnBratsClassesd`` (identical output for
    ``brats2018`` / ``brats2023``). ``et_label`` overrides the scheme's ET value as in ``get_scheme``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_scheme: str | LabelScheme | None = None,
        et_label: int | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.scheme = get_scheme(label_scheme, et_label)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.scheme.to_regions(d[key])
        return d
