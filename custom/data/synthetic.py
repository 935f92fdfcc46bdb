"""BraTS-like synthetic cases for the demo and for learning-curve tests.

Each case is a skull-stripped ellipsoidal "brain" in a zero background with white/grey-matter-like intensity
variation, ventricles and a thin outer rim of cerebrospinal fluid (dark on T1, bright on T2, dark on FLAIR),
and one lumpy glioma: edema (label 2) as the outer shell, an enhancing rim (label 4, or 3 in BraTS 2023 naming)
inside it and a necrotic core (label 1). About 20 % of the cases have no enhancing tumor; their core is
non-enhancing tumor (label 1). The ``"2024"`` naming (label scheme ``brats2024``) adds a resection cavity
(label 4) to every case: a hole of CSF intensities next to the tumor, cut out of it where they overlap. The
contrasts follow the BraTS sequences:

==============  =====  =====  =====  =====
region           T1    T1c    T2     FLAIR
==============  =====  =====  =====  =====
white matter     1.00  1.00   0.62   0.75
grey matter      0.80  0.80   0.85   0.95
CSF              0.30  0.30   1.60   0.30
edema            0.62  0.72   1.30   1.40
necrosis         0.42  0.38   1.50   0.95
non-enh. tumor   0.58  0.58   1.05   1.10
enhancing rim    0.82  1.55   1.00   1.15
==============  =====  =====  =====  =====

Every value is jittered per case, mixed with smooth texture, blurred by a little partial-volume smoothing,
multiplied by a smooth bias field per sequence, corrupted with Rician noise (4-6 % of white matter, i.e.
5-10 % of the contrasts between neighbouring regions) and scaled to a random scanner range in int16. Small
bright "vessels" on T1c and small white-matter hyperintensities on FLAIR/T2 outside the tumor keep enhancing
and whole tumor from being a single threshold (the best global threshold reaches a Dice of about 0.75).

The files use the real BraTS folder layout, file names, dtypes (int16 images, uint8 labels) and orientation
(affine diagonal ``(-sx, -sy, sz)``), so the same data discovery, loading and inference code runs on them.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from custom.core.io import atomic_path
from custom.core.labels import SCHEMES
from custom.core.naming import SEQUENCES, WRITTEN_SUFFIXES
from scipy import ndimage

__all__ = [
    "NAMINGS",
    "RC_LABELS",
    "LABEL_SCHEMES",
    "SEQUENCES",
    "case_id",
    "case_files",
    "synthesize_case",
    "synthesize",
    "ensure_demo_data",
]

#: naming -> (case id pattern, separator, file suffix per sequence (+ "seg"), label scheme of its labels)
#: ("2024" is the 2023+ file naming with a resection cavity: label scheme brats2024); the suffixes and label values
#: come from custom.core (naming.WRITTEN_SUFFIXES, labels.SCHEMES)
NAMINGS: dict[str, tuple[str, str, dict[str, str], str]] = {
    "2020": ("BraTS20_Training_{i:03d}", "_", WRITTEN_SUFFIXES["_"], "brats2018"),
    "2021": ("BraTS2021_{i:05d}", "_", WRITTEN_SUFFIXES["_"], "brats2018"),
    "2023": ("BraTS-GLI-{i:05d}-000", "-", WRITTEN_SUFFIXES["-"], "brats2023"),
    "2024": ("BraTS-GLI-{i:05d}-100", "-", WRITTEN_SUFFIXES["-"], "brats2024"),
}
#: naming -> the label scheme of its labels (custom.core.labels)
LABEL_SCHEMES = {naming: scheme for naming, (_, _, _, scheme) in NAMINGS.items()}
#: namings whose cases have a resection cavity, and its label
RC_LABELS = {naming: SCHEMES[s].rc_label for naming, s in LABEL_SCHEMES.items() if SCHEMES[s].rc_label is not None}

#: hidden file recording that a folder holds data written by this module, and with which parameters
MARKER = ".synthetic_brats.json"
GENERATOR_VERSION = 1

# tissue -> mean intensity on (T1, T1c, T2, FLAIR), relative to white matter on T1
_TISSUE = {
    "wm": (1.00, 1.00, 0.62, 0.75),
    "gm": (0.80, 0.80, 0.85, 0.95),
    "csf": (0.30, 0.30, 1.60, 0.30),
    "edema": (0.62, 0.72, 1.30, 1.40),
    "necrosis": (0.42, 0.38, 1.50, 0.95),
    "net": (0.58, 0.58, 1.05, 1.10),
    "et": (0.82, 1.55, 1.00, 1.15),
    "vessel": (0.85, 1.50, 0.70, 0.80),
    "lesion": (0.85, 0.85, 1.20, 1.35),
}
_NO_ET_FRACTION = 0.2


# ----------------------------------------------------------------------------------------------------------------
# helpers


def _as_triple(value, name: str, cast=int) -> tuple:
    """Accepts ``64``, ``(64, 64, 64)``, ``[64, 64, 64]`` or ``"64,64,64"`` (from a command line)."""
    if isinstance(value, str):
        value = [v for v in value.replace("x", ",").split(",") if v.strip()]
    if np.isscalar(value):
        value = (value,) * 3
    value = tuple(cast(v) for v in value)
    if len(value) != 3:
        raise ValueError(f"{name} must have 3 values (x, y, z), got {value!r}")
    return value


def _upsampler(n: int, cells: int) -> np.ndarray:
    """(n, cells) matrix of row-normalised Gaussian weights from ``cells`` control points to ``n`` voxels."""
    x = (np.arange(n, dtype=np.float64) + 0.5) / n
    g = (np.arange(cells, dtype=np.float64) + 0.5) / cells
    w = np.exp(-0.5 * ((x[:, None] - g[None, :]) * cells / 1.1) ** 2)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], cells: int) -> np.ndarray:
    """Zero-mean, unit-std smooth random field: normal noise on a ``cells``^3 grid, Gaussian-interpolated.

    The interpolation is separable (three small matrix products), about 2 ms for 64^3.
    """
    coarse = tuple(max(2, min(int(cells), int(s))) for s in shape)
    field = rng.standard_normal(coarse, dtype=np.float32)
    mx, my, mz = (_upsampler(int(s), c) for s, c in zip(shape, coarse))
    field = np.einsum("ia,abc->ibc", mx, field)
    field = np.einsum("jb,ibc->ijc", my, field)
    field = np.einsum("ibc,kc->ibk", field, mz)
    field -= field.mean()
    std = field.std()
    return np.ascontiguousarray(field / std if std > 0 else field, dtype=np.float32)


def _grid(shape: Sequence[int]) -> list[np.ndarray]:
    """Open grid of voxel centres in normalised coordinates (-1, 1) per axis, broadcastable to ``shape``."""
    axes = [((np.arange(n, dtype=np.float32) + 0.5) / n) * 2 - 1 for n in shape]
    return [a.reshape([-1 if d == i else 1 for d in range(3)]) for i, a in enumerate(axes)]


def _ellipsoid_distance(u: list[np.ndarray], centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    """Normalised distance, < 1 inside the axis-aligned ellipsoid."""
    return np.sqrt(sum(((ui - c) / r) ** 2 for ui, c, r in zip(u, centre, radii))).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# one case


def synthesize_case(
    rng: np.random.Generator, shape: Sequence[int] = (64, 64, 64), et_label: int = 4, rc_label: int | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Draws one synthetic case.

    Returns ``({"t1", "t1c", "t2", "flair"}: float32 volumes, labels)``: the images are non-negative, zero
    outside the brain, already in a scanner-like range (hundreds to a few thousands) so that rounding to int16
    loses nothing; ``labels`` is uint8 with 0 background, 1 necrosis / non-enhancing core, 2 edema and
    ``et_label`` (4 by default, 3 for BraTS 2023) enhancing tumor, and with ``rc_label`` (4, BraTS 2024) a
    resection cavity next to the tumor. Without ``rc_label`` the draws are those of the cases without a cavity.
    """
    if rc_label is not None and rc_label in (0, 1, 2, et_label):
        raise ValueError(f"rc_label must differ from 0, 1, 2 and et_label {et_label}, got {rc_label}")
    shape = _as_triple(shape, "shape")
    u = _grid(shape)

    # brain: jittered ellipsoid with a slightly wavy surface
    brain_c = rng.uniform(-0.05, 0.05, 3)
    brain_r = rng.uniform(0.72, 0.88, 3)
    d_brain = _ellipsoid_distance(u, brain_c, brain_r)
    brain = d_brain < 1.0 + 0.04 * _smooth_field(rng, shape, 6)
    depth = 1.0 - d_brain  # 0 on the surface, 1 at the centre

    # grey/white matter: a wavy cortex-like shell of grey matter around white matter
    wm = 1.0 / (1.0 + np.exp(-(depth - 0.25 + 0.10 * _smooth_field(rng, shape, 10)) / 0.04))
    # CSF: two lateral-ventricle-like ellipsoids and a thin rim of sulcal CSF
    p = [(ui - c) / r for ui, c, r in zip(u, brain_c, brain_r)]  # brain-normalised coordinates
    vscale = rng.uniform(0.7, 1.3)
    vent_r = (0.08 * vscale, 0.30 * vscale, 0.12 * vscale)
    csf = (_ellipsoid_distance(p, (0.15, 0.0, 0.1), vent_r) < 1) | (
        _ellipsoid_distance(p, (-0.15, 0.0, 0.1), vent_r) < 1
    )
    csf |= depth < 0.035 + 0.02 * _smooth_field(rng, shape, 8)
    # a few small bright "vessels" on T1c (elongated blobs) so that ET is not one threshold on T1c
    vessels = np.zeros(shape, bool)
    for _ in range(int(rng.integers(5, 11))):
        vc = rng.uniform(-0.6, 0.6, 3) * brain_r + brain_c
        vr = rng.uniform(0.025, 0.05, 3)
        vr[rng.integers(3)] *= rng.uniform(2.0, 4.0)
        vessels |= _ellipsoid_distance(u, vc, vr) < 1
    # small white-matter hyperintensities: bright on FLAIR and T2 but not tumor (so WT is not one FLAIR threshold)
    lesions = np.zeros(shape, bool)
    for _ in range(int(rng.integers(3, 9))):
        lc = rng.uniform(-0.55, 0.55, 3) * brain_r + brain_c
        lesions |= _ellipsoid_distance(u, lc, rng.uniform(0.03, 0.07, 3)) < 1

    # tumor: union of 1-3 ellipsoidal lobes, perturbed by smooth noise; nested shells edema > rim > core
    while True:  # centre well inside the brain
        tp = rng.uniform(-0.5, 0.5, 3)
        if np.sqrt((tp**2).sum()) < 0.5:
            break
    t_centre = tp * brain_r + brain_c
    radius = rng.uniform(0.22, 0.40)
    t_dist = _ellipsoid_distance(u, t_centre, radius * rng.uniform(0.85, 1.15, 3))
    for _ in range(int(rng.integers(0, 3))):
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        lobe_c = t_centre + direction * radius * rng.uniform(0.3, 0.7)
        lobe_r = radius * rng.uniform(0.5, 0.85) * rng.uniform(0.85, 1.15, 3)
        t_dist = np.minimum(t_dist, _ellipsoid_distance(u, lobe_c, lobe_r))
    whole = (t_dist * (1.0 + 0.18 * _smooth_field(rng, shape, 8)) < 1.0) & brain
    core_dist = t_dist * (1.0 + 0.12 * _smooth_field(rng, shape, 8))
    k_core = rng.uniform(0.50, 0.72)
    core = (core_dist < k_core) & whole
    has_et = rng.random() >= _NO_ET_FRACTION
    rim = rng.uniform(0.07, 0.11) / radius  # enhancing rim about 2-3.5 voxels thick at 64^3
    necrosis = (core_dist < k_core - rim) & core if has_et else core

    labels = np.zeros(shape, np.uint8)
    labels[whole] = 2
    labels[core] = et_label if has_et else 1
    labels[necrosis] = 1
    cavity = None
    if rc_label is not None:
        # a resection cavity: an ellipsoid centred near the tumor's edge, cut out of the tumor where they overlap
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        cavity_c = t_centre + direction * radius * rng.uniform(0.8, 1.0)
        cavity_r = radius * rng.uniform(0.45, 0.65) * rng.uniform(0.85, 1.15, 3)
        cavity = (_ellipsoid_distance(u, cavity_c, cavity_r) < 1.0) & brain
        labels[cavity] = rc_label

    # per-case tissue means, then one image per sequence
    texture = _smooth_field(rng, shape, 16)
    heterogeneity = _smooth_field(rng, shape, 12)
    tissue_masks = [
        ("csf", csf & ~whole),
        ("vessel", vessels & ~whole & ~csf),
        ("lesion", lesions & ~whole & ~csf & ~vessels),
        ("edema", labels == 2),
        ("et", labels == et_label) if has_et else ("et", np.zeros(shape, bool)),
        ("necrosis" if has_et else "net", labels == 1),
    ]
    if cavity is not None:
        tissue_masks.append(("csf", cavity))  # fluid-filled: the CSF contrasts
    images: dict[str, np.ndarray] = {}
    for s, name in enumerate(SEQUENCES):
        jitter = {t: rng.uniform(0.93, 1.07) for t in _TISSUE}
        v = lambda t: _TISSUE[t][s] * jitter[t]  # noqa: E731
        clean = (wm * v("wm") + (1 - wm) * v("gm")) * (1 + 0.04 * texture)
        for tissue, mask in tissue_masks:
            clean = np.where(mask, v(tissue) * (1 + 0.05 * heterogeneity), clean)
        clean = np.where(brain, clean, 0).astype(np.float32)
        clean = ndimage.gaussian_filter(clean, 0.6)  # partial volume
        clean *= np.exp(0.18 * _smooth_field(rng, shape, 3))  # bias field
        sigma = rng.uniform(0.04, 0.06)
        noisy = np.sqrt(
            (clean + sigma * rng.standard_normal(shape, np.float32)) ** 2
            + (sigma * rng.standard_normal(shape, np.float32)) ** 2
        )  # Rician
        scale = rng.uniform(300.0, 1200.0)
        images[name] = np.where(brain, np.maximum(noisy * scale, 1.0), 0.0).astype(np.float32)
    return images, labels


# ----------------------------------------------------------------------------------------------------------------
# files


def case_id(index: int, naming: str = "2021") -> str:
    """The BraTS case id of synthetic case ``index`` in ``naming`` ("2020", "2021", "2023" or "2024")."""
    return _naming(naming)[0].format(i=index)


def case_files(case_dir: str | os.PathLike, naming: str = "2021") -> dict[str, Path]:
    """``{"t1", "t1c", "t2", "flair", "seg"}`` -> path of that file in BraTS case folder ``case_dir``."""
    _, sep, suffixes, _ = _naming(naming)
    case_dir = Path(case_dir)
    return {k: case_dir / f"{case_dir.name}{sep}{suffix}.nii.gz" for k, suffix in suffixes.items()}


def _naming(naming: str) -> tuple[str, str, dict[str, str], str]:
    naming = str(naming)
    if naming not in NAMINGS:
        raise ValueError(f"naming must be one of {sorted(NAMINGS)}, got {naming!r}")
    return NAMINGS[naming]


def _affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """BraTS-like affine: diagonal (-sx, -sy, sz) (LPS voxel axes), origin like the real BraTS headers."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = (0.0, (shape[1] - 1) * spacing[1], 0.0)
    return affine


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))


def _write_case(folder: Path, rng: np.random.Generator, shape, spacing, naming: str) -> None:
    """Draws one case and writes its five files into ``folder`` (created; its name is the case id)."""
    et_label = SCHEMES[_naming(naming)[3]].et_label
    images, labels = synthesize_case(rng, shape, et_label=et_label, rc_label=RC_LABELS.get(str(naming)))
    folder.mkdir(parents=True, exist_ok=True)
    affine = _affine(shape, spacing)
    files = case_files(folder, naming)
    for name in SEQUENCES:
        _save(np.round(np.clip(images[name], 0, np.iinfo(np.int16).max)).astype(np.int16), affine, files[name])
    _save(labels.astype(np.uint8), affine, files["seg"])


def _case_rngs(seed: int, indices: Sequence[int]) -> dict[int, np.random.Generator]:
    """Case ``i`` always gets child ``i`` of ``SeedSequence(seed)``: the same case whatever ``num_cases`` is."""
    n = max(indices) + 1 if indices else 0
    children = np.random.SeedSequence(int(seed)).spawn(n)
    return {i: np.random.default_rng(children[i]) for i in indices}


def _params(shape, spacing, seed, naming) -> dict:
    return {
        "generator": "custom.data.synthetic",
        "version": GENERATOR_VERSION,
        "naming": str(naming),
        "shape": list(shape),
        "spacing": [float(s) for s in spacing],
        "seed": int(seed),
    }


def _write_marker(folder: Path, params: dict, num_cases: int) -> None:
    with atomic_path(folder / MARKER) as tmp:
        Path(tmp).write_text(json.dumps({**params, "num_cases": int(num_cases)}, indent=1))


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _generate(folder: Path, indices: Sequence[int], shape, spacing, seed: int, naming: str) -> None:
    """Writes cases ``indices`` into ``folder``; each case is built in a hidden folder and renamed into place."""
    folder.mkdir(parents=True, exist_ok=True)
    rngs = _case_rngs(seed, list(indices))
    for i in indices:
        cid = case_id(i, naming)
        tmp = folder / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{cid}"
        try:
            _write_case(tmp / cid, rngs[i], shape, spacing, naming)
            _move_case_into_place(tmp / cid, folder / cid)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _move_case_into_place(src: Path, dst: Path) -> None:
    """Renames the case folder ``src`` to ``dst``, replacing an existing ``dst`` (moved aside, then deleted)."""
    trash = None
    if dst.exists():
        trash = dst.parent / f".trash-{os.getpid()}-{uuid.uuid4().hex[:8]}-{dst.name}"
        try:
            os.rename(dst, trash)
        except FileNotFoundError:  # another process removed it meanwhile
            trash = None
    try:
        os.rename(src, dst)
    except OSError:
        # another process put a case there first (both draw the same case from the same seed): keep theirs
        if not dst.is_dir():
            raise
    finally:
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


def synthesize(
    output_dir: str | os.PathLike,
    num_cases: int = 40,
    shape: Sequence[int] | int | str = (64, 64, 64),
    seed: int = 0,
    naming: str = "2021",
    spacing: Sequence[float] | float | str = (1.0, 1.0, 1.0),
) -> list[str]:
    """Writes ``num_cases`` synthetic BraTS cases into ``output_dir`` and returns their case ids.

    ``naming`` picks the folder and file names and the enhancing-tumor label: ``"2021"`` writes
    ``BraTS2021_XXXXX/BraTS2021_XXXXX_{t1,t1ce,t2,flair,seg}.nii.gz`` with labels 0/1/2/4, ``"2023"`` writes
    ``BraTS-GLI-XXXXX-000/BraTS-GLI-XXXXX-000-{t1n,t1c,t2w,t2f,seg}.nii.gz`` with labels 0/1/2/3 (``"2020"``:
    ``BraTS20_Training_XXX``, labels 0/1/2/4; ``"2024"``: ``BraTS-GLI-XXXXX-100``, the 2023 file names, labels
    0/1/2/3 and the resection cavity 4, label scheme ``brats2024``). Case ``i`` depends only on ``seed`` and ``i``.
    Existing cases of the same ids are replaced; every case folder appears complete or not at all.
    """
    start = time.perf_counter()
    shape, spacing = _as_triple(shape, "shape"), _as_triple(spacing, "spacing", float)
    num_cases = int(num_cases)
    if num_cases < 1:
        raise ValueError(f"num_cases must be >= 1, got {num_cases}")
    if min(shape) < 16:
        raise ValueError(f"shape must be at least 16 voxels per axis, got {shape}")
    _naming(naming)
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    _write_marker(folder, _params(shape, spacing, seed, naming), max(num_cases, _marker_cases(folder)))
    _generate(folder, range(num_cases), shape, spacing, seed, naming)
    ids = [case_id(i, naming) for i in range(num_cases)]
    print(
        f"synthesized {num_cases} BraTS {naming}-style cases of {'x'.join(map(str, shape))} voxels "
        f"(seed {seed}) in {folder} in {time.perf_counter() - start:.1f} s"
    )
    return ids


def _marker_cases(folder: Path) -> int:
    marker = _read_marker(folder)
    return int(marker.get("num_cases", 0)) if marker else 0


def _case_complete(folder: Path, naming: str, shape: Sequence[int]) -> bool:
    """True when all five files of the case exist and their headers have ``shape`` (header read only)."""
    for path in case_files(folder, naming).values():
        try:
            if tuple(nib.load(str(path)).shape) != tuple(shape):
                return False
        except Exception:  # missing, empty or not NIfTI
            return False
    return True


def ensure_demo_data(
    output_dir: str | os.PathLike,
    num_cases: int = 40,
    shape: Sequence[int] | int | str = (64, 64, 64),
    seed: int = 0,
    naming: str = "2021",
    spacing: Sequence[float] | float | str = (1.0, 1.0, 1.0),
) -> str:
    """Makes sure ``output_dir`` holds the synthetic demo data set and returns ``output_dir`` (as a string).

    Idempotent: when the folder already holds ``num_cases`` complete cases of ``shape`` nothing is written.
    A missing folder is built in a hidden sibling folder and renamed into place, so an interrupted run never
    leaves a half data set; a partially written folder (written by this module) is completed case by case,
    each case renamed into place whole. A folder written with other parameters (seed, shape, naming, spacing)
    is rebuilt. A non-empty folder that this module did not write is never modified: that is an error.
    Safe to call from several processes at once (e.g. every rank of a torchrun job).
    """
    shape, spacing = _as_triple(shape, "shape"), _as_triple(spacing, "spacing", float)
    num_cases = int(num_cases)
    folder = Path(output_dir)
    params = _params(shape, spacing, seed, naming)
    marker = _read_marker(folder)
    same_params = marker is not None and {k: marker.get(k) for k in params} == params
    missing = [i for i in range(num_cases) if not _case_complete(folder / case_id(i, naming), naming, shape)]
    if not missing and (marker is None or same_params):
        return str(folder)

    if folder.exists() and any(folder.iterdir()) and marker is None:
        raise RuntimeError(
            f"{folder} is not empty and was not written by custom.data.synthetic (no {MARKER}); it lacks "
            f"{len(missing)} of the {num_cases} synthetic cases. Not touching it: pass another output_dir "
            "or delete the folder."
        )

    if folder.exists() and any(folder.iterdir()) and same_params:
        # complete a partial data set in place, one whole case at a time (a broken case is replaced by a rename)
        _write_marker(folder, params, max(num_cases, _marker_cases(folder)))
        _generate(folder, missing, shape, spacing, seed, naming)
        print(f"completed synthetic demo data in {folder}: wrote {len(missing)} of {num_cases} cases")
        return str(folder)

    # build the whole data set next to the target, then rename it into place
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    trash = folder.parent / f".{folder.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        synthesize(tmp, num_cases, shape, seed, naming, spacing)
        if folder.exists() and not (marker is None or same_params):
            os.rename(folder, trash)  # our own data with other parameters: replace it
        try:
            os.rename(tmp, folder)  # also replaces an empty folder
        except OSError:
            # another process finished first: use its data set when it is complete
            if any(not _case_complete(folder / case_id(i, naming), naming, shape) for i in range(num_cases)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(trash, ignore_errors=True)
    return str(folder)
