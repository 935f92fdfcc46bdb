"""Pictures of a case: the four sequences and the segmentation overlays in three orthogonal slices.

One PNG per call, a grid with rows = axial, coronal and sagittal slices through the tumor's centre and
columns = T1, T1c, T2, FLAIR, the prediction over T1c and, when given, the reference over T1c. Volumes are
reoriented to RAS with nibabel (``as_closest_canonical``) and shown in the radiological convention used by
BraTS viewers: the patient's right on the left of the picture, anterior up in axial slices, superior up in
coronal and sagittal slices, anterior on the left in sagittal slices. Each sequence is windowed to the 1-99th
percentile of its brain (non-zero) voxels; pixel aspect follows the voxel spacing.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from custom.core.io import atomic_path

__all__ = ["visualize", "load_case", "SEQUENCE_NAMES", "main"]

SEQUENCE_NAMES = ("T1", "T1c", "T2", "FLAIR")
#: file-name suffix (lower case, after the last "_" or "-") -> sequence, for every BraTS naming
_SUFFIXES = {
    "t1": "T1", "t1n": "T1",
    "t1ce": "T1c", "t1c": "T1c", "t1gd": "T1c",
    "t2": "T2", "t2w": "T2",
    "flair": "FLAIR", "t2f": "FLAIR",
}  # fmt: skip
_NIFTI = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)
_COLOURS = {"core": (1.0, 0.1, 0.1), "edema": (0.1, 0.9, 0.1), "et": (1.0, 0.95, 0.0)}
_ALPHA = 0.5
_VIEWS = ("axial", "coronal", "sagittal")


# ----------------------------------------------------------------------------------------------------------------
# loading


def _stem(path: str | os.PathLike) -> str:
    return _NIFTI.sub("", Path(path).name)


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
    found: dict[str, list[Path]] = {name: [] for name in SEQUENCE_NAMES}
    for path in sorted(case_dir.iterdir()):
        if not _NIFTI.search(path.name):
            continue
        suffix = re.split(r"[_-]", _stem(path))[-1].lower()
        if suffix in _SUFFIXES:
            found[_SUFFIXES[suffix]].append(path)
    files = {}
    for name, paths in found.items():
        accepted = "/".join(k for k, v in _SUFFIXES.items() if v == name)
        if not paths:
            raise FileNotFoundError(
                f"{case_dir}: no {name} file (a NIfTI file whose name ends in _{accepted} or -{accepted}); "
                f"found {[p.name for p in sorted(case_dir.iterdir())]}"
            )
        if len(paths) > 1:
            raise ValueError(f"{case_dir}: several {name} files: {[p.name for p in paths]}")
        files[name] = paths[0]
    return files


def load_case(case: str | os.PathLike | Sequence[str]) -> tuple[str, dict[str, np.ndarray], tuple[float, ...]]:
    """Loads the four sequences of ``case`` in RAS order.

    ``case`` is a BraTS case folder (any naming: ``t1/t1n``, ``t1ce/t1c``, ``t2/t2w``, ``flair/t2f``; the
    segmentation is ignored), a comma-separated list (or a sequence) of 4 files in T1, T1c, T2, FLAIR order, or
    one 4-channel NIfTI (channels last, as NIfTI stores them, or first). Returns ``(case id, {sequence: volume},
    spacing)``.
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
        cid = re.sub(r"[_-](t1n?|t1ce|t1c|t1gd)$", "", _stem(paths[0]), flags=re.IGNORECASE)
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
    if len(squeezed) == 4 and squeezed[3] == 4:
        data = np.asarray(image.dataobj, dtype=np.float32).reshape(squeezed)
        image = nib.Nifti1Image(data, image.affine, image.header)
    elif len(squeezed) == 4 and squeezed[0] == 4:
        data = np.moveaxis(np.asarray(image.dataobj, dtype=np.float32).reshape(squeezed), 0, -1)
        image = nib.Nifti1Image(data, image.affine)
        image.header.set_zooms(tuple(image.header.get_zooms()[:3]) + (1.0,))
    else:
        raise ValueError(
            f"{path}: a single case file must hold the 4 sequences (T1,T1c,T2,FLAIR) as 4 channels, shape "
            f"(X, Y, Z, 4) or (4, X, Y, Z); got shape {shape}. Pass a case folder or 4 comma-separated files instead."
        )
    image = nib.as_closest_canonical(image)
    data = np.asarray(image.dataobj, dtype=np.float32)
    volumes = {name: data[..., c] for c, name in enumerate(SEQUENCE_NAMES)}
    return _stem(path), volumes, tuple(float(z) for z in image.header.get_zooms()[:3])


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


def _et_value(labels: np.ndarray, path: Path, et_label: int | None) -> int:
    values = set(np.unique(labels).tolist()) - {0}
    if et_label is None:
        if {3, 4} <= values:
            raise ValueError(f"{path}: holds both 3 and 4; pass et_label to say which one is enhancing tumor")
        et_label = 3 if 3 in values else 4
    unknown = values - {1, 2, int(et_label)}
    if unknown:
        raise ValueError(
            f"{path}: label values {sorted(unknown)} are not in {{0, 1, 2, {et_label}}} "
            f"(BraTS 2018-2021 use 4 for enhancing tumor, BraTS 2023+ use 3): check et_label"
        )
    return int(et_label)


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


def _overlay(labels: np.ndarray, et_value: int) -> np.ndarray:
    rgba = np.zeros(labels.shape + (4,), np.float32)
    for value, key in ((1, "core"), (2, "edema"), (et_value, "et")):
        mask = labels == value
        rgba[mask, :3] = _COLOURS[key]
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
) -> str:
    """Draws the case's four sequences and the prediction (and reference) overlays into the PNG ``output``.

    ``case``: a BraTS case folder, 4 comma-separated files (T1,T1c,T2,FLAIR) or one 4-channel NIfTI.
    ``prediction`` / ``reference``: label NIfTI files (0 background, 1 necrosis / non-enhancing core, 2 edema,
    enhancing tumor ``et_label``), or a folder holding ``<case_id>.nii.gz``. ``et_label`` None detects 4 or 3
    from each file's values. The slices go through the centre of mass of the prediction's tumor, else the
    reference's, else the volume's centre. Writes the PNG atomically and returns its path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    cid, volumes, spacing = load_case(case)
    shape = next(iter(volumes.values())).shape
    segs: list[tuple[str, np.ndarray, int, Path]] = []
    for what, path in (("prediction", prediction), ("reference", reference)):
        if path is not None and str(path) != "":
            labels, path = _load_labels(path, shape, what, cid)
            segs.append((what, labels, _et_value(labels, path, et_label), path))
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
            base = column if column in volumes else "T1c"
            lo, hi = windows[base]
            ax.imshow(_slice(volumes[base], view, centre), cmap="gray", vmin=lo, vmax=hi,
                      aspect=_aspect(view, spacing), interpolation="nearest")  # fmt: skip
            if column not in volumes:
                _, labels, et_value, _ = segs[columns.index(column) - len(SEQUENCE_NAMES)]
                ax.imshow(_overlay(_slice(labels, view, centre), et_value), aspect=_aspect(view, spacing),
                          interpolation="nearest")  # fmt: skip
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(column if column in volumes else f"{column} on T1c", fontsize=11)
            if c == 0:
                index = {"axial": ("z", centre[2]), "coronal": ("y", centre[1]), "sagittal": ("x", centre[0])}[view]
                ax.set_ylabel(f"{view} ({index[0]}={index[1]})", fontsize=11)
                left, right = ("A", "P") if view == "sagittal" else ("R", "L")
                for x, letter in ((0.02, left), (0.98, right)):
                    ax.text(x, 0.5, letter, transform=ax.transAxes, color="white", fontsize=9, fontweight="bold",
                            ha="left" if x < 0.5 else "right", va="center")  # fmt: skip

    et_values = sorted({et for _, _, et, _ in segs}) or [et_label or 4]
    handles = [
        Patch(color=_COLOURS["core"], label="1 necrosis / non-enhancing core"),
        Patch(color=_COLOURS["edema"], label="2 edema"),
        Patch(color=_COLOURS["et"], label=f"{'/'.join(map(str, et_values))} enhancing tumor"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False, fontsize=11)
    sources = ", ".join(f"{what}: {path.name}" for what, _, _, path in segs)
    fig.suptitle(f"{cid}" + (f"   ({sources})" if sources else ""), fontsize=13)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))

    with atomic_path(output) as tmp:
        fig.savefig(tmp, format="png")
    return str(output)


# ----------------------------------------------------------------------------------------------------------------
# command line


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="python -m custom visualize", description="Draw a case's sequences and segmentation overlays (PNG)."
    )
    parser.add_argument("--case", required=True, help="BraTS case folder, 4 files T1,T1c,T2,FLAIR, or a 4-channel file")
    parser.add_argument("--prediction", default=None, help="label NIfTI (or a folder holding <case_id>.nii.gz)")
    parser.add_argument("--reference", default=None, help="reference label NIfTI to draw next to the prediction")
    parser.add_argument("--output", required=True, help="PNG file to write")
    parser.add_argument("--et_label", type=int, default=None, choices=(3, 4), help="ET label (default: detect)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(visualize(args.case, args.prediction, args.output, args.reference, args.et_label))
    return 0


if __name__ == "__main__":
    sys.exit(main())
