"""Pictures of a case: the four sequences and the segmentation overlays in three orthogonal slices.

One PNG per call, a grid with rows = axial, coronal and sagittal slices through the tumor's centre and
columns = T1, T1c, T2, FLAIR, the prediction over T1c and, when given, the reference over T1c. Volumes are
reoriented to RAS with nibabel (``as_closest_canonical``) and shown in the radiological convention used by
BraTS viewers: the patient's right on the left of the picture, anterior up in axial slices, superior up in
coronal and sagittal slices, anterior on the left in sagittal slices. Each sequence is windowed to the 1-99th
percentile of its brain (non-zero) voxels; pixel aspect follows the voxel spacing.

The BraTS facts come from ``custom.core``: file names and sequence order from ``custom.core.naming``, label values
and regions from the label schemes of ``custom.core.labels`` (necrosis / non-enhancing core = TC without ET, edema =
WT without TC, enhancing tumor = ET, and for ``brats2024`` the resection cavity RC, each in its own colour).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from custom.core.io import atomic_path
from custom.core.labels import SCHEMES, LabelScheme, distinct_values, get_scheme
from custom.core.naming import (
    SEQUENCE_NAMES,
    SEQUENCES,
    WRITTEN_SUFFIXES,
    case_id_from_path,
    nifti_stem,
    parse_stem,
    split_channels,
)

__all__ = ["visualize", "load_case", "COLOURS"]

_NAME_OF = dict(zip(SEQUENCES, SEQUENCE_NAMES))  # channel -> its name in titles ("t1c" -> "T1c")
_OVERLAY_BASE = _NAME_OF["t1c"]  # the segmentations are drawn over T1c
#: colour of each labelled structure (RGB, drawn at 50 % over the image); "rc" only for schemes with a resection cavity
COLOURS = {"core": (1.0, 0.1, 0.1), "edema": (0.1, 0.9, 0.1), "et": (1.0, 0.95, 0.0), "rc": (0.1, 0.3, 1.0)}
_LEGEND = {"core": "necrosis / non-enhancing core", "edema": "edema", "et": "enhancing tumor", "rc": "resection cavity"}
_ALPHA = 0.5
_VIEWS = ("axial", "coronal", "sagittal")


# ----------------------------------------------------------------------------------------------------------------
# loading


def _stem(path: str | os.PathLike) -> str:
    name = Path(path).name
    return nifti_stem(name) or name


def _load(path: str | os.PathLike) -> nib.Nifti1Image:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return nib.load(str(path))
    except Exception as err:  # not NIfTI, truncated ...
        raise ValueError(f"{path}: cannot read it as NIfTI ({err})") from err


def _canonical(image: nib.spatialimages.SpatialImage, path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Data in RAS voxel order (float32) and the voxel spacing of its first three axes."""
    image = nib.as_closest_canonical(image)
    data = np.asarray(image.dataobj, dtype=np.float32)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    return data, tuple(float(z) for z in image.header.get_zooms()[:3])


def _find_sequences(case_dir: Path) -> dict[str, Path]:
    """``{sequence name: file}`` of a BraTS case folder in any naming ``custom.core.naming`` knows."""
    found: dict[str, list[Path]] = {name: [] for name in SEQUENCE_NAMES}
    for path in sorted(case_dir.iterdir()):
        stem = nifti_stem(path.name)
        parsed = parse_stem(stem) if stem is not None else None
        if parsed is not None and parsed[1] in _NAME_OF:  # the segmentation ("label") is not drawn from here
            found[_NAME_OF[parsed[1]]].append(path)
    files = {}
    for sequence, name in _NAME_OF.items():
        paths = found[name]
        if not paths:
            named = " or ".join(f"<case>{sep}{suffixes[sequence]}.nii.gz" for sep, suffixes in WRITTEN_SUFFIXES.items())
            raise FileNotFoundError(
                f"{case_dir}: no {name} file (a NIfTI file named {named}); "
                f"found {[p.name for p in sorted(case_dir.iterdir())]}"
            )
        if len(paths) > 1:
            raise ValueError(f"{case_dir}: several {name} files: {[p.name for p in paths]}")
        files[name] = paths[0]
    return files


def load_case(case: str | os.PathLike | Sequence[str]) -> tuple[str, dict[str, np.ndarray], tuple[float, ...]]:
    """Loads the four sequences of ``case`` in RAS order.

    ``case`` is a BraTS case folder (any naming of ``custom.core.naming``: ``_t1``/``-t1n``, ``_t1ce``/``-t1c``,
    ``_t2``/``-t2w``, ``_flair``/``-t2f``; the segmentation is ignored), a comma-separated list (or a sequence) of 4
    files in T1, T1c, T2, FLAIR order, or one 4-channel NIfTI (channels last, as NIfTI stores them, or first).
    Returns ``(case id, {sequence: volume}, spacing)``.
    """
    if isinstance(case, (list, tuple)):
        paths = [Path(p) for p in case]
    elif "," in str(case):
        paths = [Path(p.strip()) for p in str(case).split(",") if p.strip()]
    else:
        paths = [Path(case)]

    if len(paths) == 1 and paths[0].is_dir():
        files = _find_sequences(paths[0])
        cid = paths[0].name
    elif len(paths) == 4:
        files = dict(zip(SEQUENCE_NAMES, paths))
        cid = case_id_from_path(str(paths[0]))
    elif len(paths) == 1:
        return _load_four_channel(paths[0])
    else:
        raise ValueError(
            f"case must be a BraTS case folder, 4 files (T1,T1c,T2,FLAIR) or one 4-channel NIfTI; got {len(paths)} "
            f"paths: {[str(p) for p in paths]}"
        )

    volumes, spacing, first = {}, None, None
    for name, path in files.items():
        data, zooms = _canonical(_load(path), path)
        if first is None:
            first, spacing = (path, data.shape), zooms
        elif data.shape != first[1]:
            raise ValueError(f"shape mismatch: {path} has shape {data.shape}, {first[0]} has {first[1]}")
        volumes[name] = data
    return cid, volumes, spacing


def _load_four_channel(path: Path) -> tuple[str, dict[str, np.ndarray], tuple[float, ...]]:
    image = _load(path)
    shape = image.shape
    squeezed = tuple(s for i, s in enumerate(shape) if not (i >= 3 and s == 1))
    channels = split_channels(np.asarray(image.dataobj, dtype=np.float32).reshape(squeezed))
    if channels is None:
        raise ValueError(
            f"{path}: a single case file must hold the 4 sequences ({','.join(SEQUENCE_NAMES)}) as 4 channels, shape "
            f"(X, Y, Z, 4) or (4, X, Y, Z); got shape {shape}. Pass a case folder or 4 comma-separated files instead."
        )
    volumes, spacing = {}, None
    for name, channel in zip(SEQUENCE_NAMES, channels):  # the affine maps the three spatial axes of each channel
        volumes[name], spacing = _canonical(nib.Nifti1Image(np.ascontiguousarray(channel), image.affine), path)
    return _stem(path), volumes, spacing


def _load_labels(path: str | os.PathLike, shape: tuple[int, ...], what: str, cid: str) -> tuple[np.ndarray, Path]:
    path = Path(path)
    if path.is_dir():  # a folder of predictions named <case_id>.nii.gz
        candidates = [path / f"{cid}.nii.gz", path / f"{cid}.nii"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise FileNotFoundError(f"{path}: no {what} for case {cid} ({cid}.nii.gz)")
        path = found[0]
    data, _ = _canonical(_load(path), path)
    if data.shape != shape:
        raise ValueError(f"shape mismatch: {what} {path} has shape {data.shape}, the case's sequences have {shape}")
    return np.rint(data).astype(np.int16), path


def _label_scheme(
    labels: np.ndarray, path: Path, label_scheme: str | LabelScheme | None, et_label: int | None
) -> LabelScheme:
    """The label scheme of one label map: ``label_scheme`` / ``et_label`` as ``custom.core.labels.get_scheme`` reads
    them, or, with neither, the first scheme of ``SCHEMES`` without a resection cavity that holds all of its values
    (4 alone is ET 4, ``brats2018``; 3 alone ``brats2023``), else ``brats2024`` (3 and 4: ET 3 and RC 4). A
    ``brats2024`` map without ET (only 4 besides 1 and 2) reads as ET 4: pass ``label_scheme brats2024`` for it."""
    values = {int(v) for v in distinct_values(labels)} - {0}
    if label_scheme not in (None, "") or et_label is not None:
        scheme = get_scheme(label_scheme, et_label)
    else:  # the scheme that fits best, RC-free schemes first
        ranked = sorted(SCHEMES.values(), key=lambda s: (len(values - set(s.labels)), s.rc_label is not None))
        scheme = ranked[0]
    unknown = values - set(scheme.labels)
    if unknown:
        known = "; ".join(f"{s.name}: {', '.join(map(str, s.allowed_labels))}" for s in SCHEMES.values())
        raise ValueError(
            f"{path}: label values {sorted(unknown)} are not labels of {scheme.name} "
            f"({', '.join(map(str, scheme.allowed_labels))}; BraTS label schemes: {known}): "
            "check et_label or label_scheme"
        )
    return scheme


def _structures(scheme: LabelScheme) -> list[tuple[str, tuple[int, ...]]]:
    """``(structure, label values)`` to colour, from the scheme's regions: necrosis / non-enhancing core = TC without
    ET, edema = WT without TC, enhancing tumor = ET, and the resection cavity where the scheme has one."""
    regions = {name: set(values) for name, values in scheme.region_labels.items()}
    parts = [("core", regions["tc"] - regions["et"]), ("edema", regions["wt"] - regions["tc"]), ("et", regions["et"])]
    if scheme.rc_label is not None:
        parts.append(("rc", {scheme.rc_label}))
    return [(name, tuple(sorted(values))) for name, values in parts]


# ----------------------------------------------------------------------------------------------------------------
# drawing


def _for_display(plane: np.ndarray) -> np.ndarray:
    """RAS plane (first axis left->right, second posterior->anterior or inferior->superior) -> picture rows/cols:
    second axis upwards, first axis right-to-left (radiological convention)."""
    return plane.T[::-1, ::-1]


def _slice(volume: np.ndarray, view: str, centre: Sequence[int]) -> np.ndarray:
    x, y, z = centre
    plane = {"axial": volume[:, :, z], "coronal": volume[:, y, :], "sagittal": volume[x, :, :]}[view]
    return _for_display(plane)


def _aspect(view: str, spacing: Sequence[float]) -> float:
    sx, sy, sz = spacing
    # rows / cols pixel size ratio
    return {"axial": sy / sx, "coronal": sz / sx, "sagittal": sz / sy}[view]


def _window(volume: np.ndarray) -> tuple[float, float]:
    values = volume[volume != 0]
    if values.size == 0:
        values = volume.ravel()
    lo, hi = np.percentile(values, [1, 99])
    return float(lo), float(hi if hi > lo else lo + 1)


def _overlay(labels: np.ndarray, scheme: LabelScheme) -> np.ndarray:
    """RGBA picture of a label map (or a slice of it): each structure of ``scheme`` in its colour, 0 transparent."""
    rgba = np.zeros(labels.shape + (4,), np.float32)
    for key, values in _structures(scheme):
        mask = np.isin(labels, values)
        rgba[mask, :3] = COLOURS[key]
        rgba[mask, 3] = _ALPHA
    return rgba


def _centre(masks: Sequence[np.ndarray | None], shape: Sequence[int]) -> tuple[int, int, int]:
    for mask in masks:
        if mask is not None and mask.any():
            idx = np.nonzero(mask)
            return tuple(int(round(float(np.mean(i)))) for i in idx)
    return tuple(s // 2 for s in shape)


def visualize(
    case: str | os.PathLike | Sequence[str],
    prediction: str | os.PathLike | None,
    output: str | os.PathLike,
    reference: str | os.PathLike | None = None,
    et_label: int | None = None,
    label_scheme: str | None = None,
) -> str:
    """Draws the case's four sequences and the prediction (and reference) overlays into the PNG ``output``.

    ``case``: a BraTS case folder, 4 comma-separated files (T1,T1c,T2,FLAIR) or one 4-channel NIfTI.
    ``prediction`` / ``reference``: label NIfTI files of a BraTS label scheme (``custom.core.labels``: 1 necrosis /
    non-enhancing core, 2 edema, enhancing tumor 4 in ``brats2018`` or 3 in ``brats2023`` and ``brats2024``, and
    in ``brats2024`` the resection cavity 4), or a folder holding ``<case_id>.nii.gz``. ``label_scheme`` and
    ``et_label`` None detect each file's scheme from its values (3 and 4 together: ``brats2024``; 4 alone is ET 4,
    so a 2024 map without enhancing tumor needs ``label_scheme="brats2024"``); ``et_label`` alone picks
    ``brats2018`` (4) or ``brats2023`` (3). The slices go through the centre of mass of the
    prediction's labelled voxels (tumor and cavity), else the reference's, else the volume's centre. Writes the
    PNG atomically and returns its path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    cid, volumes, spacing = load_case(case)
    shape = next(iter(volumes.values())).shape
    segs: list[tuple[str, np.ndarray, LabelScheme, Path]] = []
    for what, path in (("prediction", prediction), ("reference", reference)):
        if path is not None and str(path) != "":
            labels, path = _load_labels(path, shape, what, cid)
            segs.append((what, labels, _label_scheme(labels, path, label_scheme, et_label), path))
    centre = _centre([labels > 0 for _, labels, _, _ in segs], shape)

    columns = list(SEQUENCE_NAMES) + [what for what, *_ in segs]
    windows = {name: _window(v) for name, v in volumes.items()}
    panel = 2.6
    fig = Figure(figsize=(panel * len(columns), panel * len(_VIEWS) + 0.9), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(_VIEWS), len(columns), squeeze=False)
    for r, view in enumerate(_VIEWS):
        for c, column in enumerate(columns):
            ax = axes[r, c]
            base = column if column in volumes else _OVERLAY_BASE
            lo, hi = windows[base]
            ax.imshow(_slice(volumes[base], view, centre), cmap="gray", vmin=lo, vmax=hi,
                      aspect=_aspect(view, spacing), interpolation="nearest")  # fmt: skip
            if column not in volumes:
                _, labels, scheme, _ = segs[columns.index(column) - len(SEQUENCE_NAMES)]
                ax.imshow(_overlay(_slice(labels, view, centre), scheme), aspect=_aspect(view, spacing),
                          interpolation="nearest")  # fmt: skip
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(column if column in volumes else f"{column} on {_OVERLAY_BASE}", fontsize=11)
            if c == 0:
                index = {"axial": ("z", centre[2]), "coronal": ("y", centre[1]), "sagittal": ("x", centre[0])}[view]
                ax.set_ylabel(f"{view} ({index[0]}={index[1]})", fontsize=11)
                left, right = ("A", "P") if view == "sagittal" else ("R", "L")
                for x, letter in ((0.02, left), (0.98, right)):
                    ax.text(x, 0.5, letter, transform=ax.transAxes, color="white", fontsize=9, fontweight="bold",
                            ha="left" if x < 0.5 else "right", va="center")  # fmt: skip

    schemes = [scheme for _, _, scheme, _ in segs] or [get_scheme(label_scheme, et_label)]
    legend: dict[str, set[int]] = {}
    for scheme in schemes:
        for key, values in _structures(scheme):
            legend.setdefault(key, set()).update(values)
    handles = [
        Patch(color=COLOURS[key], label=f"{'/'.join(map(str, sorted(values)))} {_LEGEND[key]}")
        for key, values in sorted(legend.items(), key=lambda item: list(COLOURS).index(item[0]))
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=11)
    sources = ", ".join(f"{what}: {path.name} ({scheme.name})" for what, _, scheme, path in segs)
    fig.suptitle(f"{cid}" + (f"   ({sources})" if sources else ""), fontsize=13)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))

    with atomic_path(output) as tmp:
        fig.savefig(tmp, format="png")
    print(f"wrote {output}")  # what the command line shows
    return str(output)
