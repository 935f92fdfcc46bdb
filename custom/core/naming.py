"""BraTS file-naming and channel facts, in one place: sequence order, file-name suffixes of every BraTS release,
NIfTI stems, case ids from paths and the split of a 4-channel study.

Every module that reads or names BraTS files asks this one; nothing else spells a suffix table.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

__all__ = [
    "SEQUENCES",
    "SEQUENCE_NAMES",
    "REGION_NAMES",
    "NIFTI_SUFFIXES",
    "nifti_stem",
    "parse_stem",
    "case_id_from_path",
    "sequence_name",
    "is_four_channel",
    "split_channels",
    "NAMINGS_LOOKED_FOR",
    "WRITTEN_SUFFIXES",
]

SEQUENCES = ("t1", "t1c", "t2", "flair")
"""Channel order of the network input: T1, T1c (T1Gd), T2, FLAIR."""
SEQUENCE_NAMES = ("T1", "T1c", "T2", "FLAIR")  # for people: figure titles, messages
REGION_NAMES = ("tc", "wt", "et")  # network output channel order (MONAI's BraTS conversion order)
NIFTI_SUFFIXES = (".nii.gz", ".nii")

# file-name suffix -> sequence name (or "label"): 2018-2021 underscore naming (ET 4) and 2023+ dash naming (ET 3)
_UNDERSCORE_SUFFIXES = {
    "t1": "t1",
    "t1ce": "t1c",
    "t1c": "t1c",
    "t1gd": "t1c",
    "t2": "t2",
    "flair": "flair",
    "seg": "label",
}
_DASH_SUFFIXES = {"t1n": "t1", "t1c": "t1c", "t2w": "t2", "t2f": "flair", "seg": "label"}
_NAMINGS = (  # (pattern, suffix table, ET label the naming implies)
    (re.compile(r"^(?P<case>.+)-(?P<suffix>t1n|t1c|t2w|t2f|seg)$", re.IGNORECASE), _DASH_SUFFIXES, 3),
    (re.compile(r"^(?P<case>.+)_(?P<suffix>t1|t1ce|t1c|t1gd|t2|flair|seg)$", re.IGNORECASE), _UNDERSCORE_SUFFIXES, 4),
)
# every name a sequence goes by (datalists keyed by sequence, file suffixes) -> its channel
_SEQUENCE_ALIASES = {
    **{k: v for k, v in _UNDERSCORE_SUFFIXES.items() if v != "label"},
    "t1n": "t1",
    "t2w": "t2",
    "t2f": "flair",
}
# the suffixes BraTS itself writes, per separator: "_" (2018-2021) and "-" (2023+)
WRITTEN_SUFFIXES = {
    "_": {"t1": "t1", "t1c": "t1ce", "t2": "t2", "flair": "flair", "seg": "seg"},
    "-": {"t1": "t1n", "t1c": "t1c", "t2": "t2w", "flair": "t2f", "seg": "seg"},
}
NAMINGS_LOOKED_FOR = (
    "<case>/<case>_{t1,t1ce,t2,flair}.nii.gz with optional <case>_seg.nii.gz (BraTS 2018-2021 naming, "
    "HGG/LGG folders optional), <case>/<case>-{t1n,t1c,t2w,t2f}.nii.gz with optional <case>-seg.nii.gz "
    "(BraTS 2023+ naming), or single 4-channel files <case>.nii.gz (T1, T1c, T2, FLAIR); .nii also accepted"
)


def nifti_stem(name: str) -> str | None:
    """File name without ``.nii.gz``/``.nii`` (any case), or None for anything else."""
    lower = name.lower()
    for suffix in NIFTI_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return None


def parse_stem(stem: str) -> tuple[str, str, int] | None:
    """``(case id, sequence name or "label", implied ET label)`` of a BraTS file stem, None when it is not one."""
    for pattern, suffixes, et_label in _NAMINGS:
        m = pattern.match(stem)
        if m:
            return m["case"], suffixes[m["suffix"].lower()], et_label
    return None


def case_id_from_path(path: str) -> str:
    """The case id of a BraTS file (``.../BraTS2021_00000_flair.nii.gz`` -> ``BraTS2021_00000``); the stem of any
    other file."""
    stem = nifti_stem(Path(path).name) or Path(path).stem
    parsed = parse_stem(stem)
    return parsed[0] if parsed else stem


def sequence_name(key: str) -> str | None:
    """The channel (``t1``, ``t1c``, ``t2``, ``flair``) a sequence name or suffix stands for, None when unknown."""
    return _SEQUENCE_ALIASES.get(str(key).lower())


def is_four_channel(shape: tuple[int, ...]) -> bool:
    """A 4-D shape with the 4 sequences on its first or last axis."""
    return len(shape) == 4 and (shape[-1] == len(SEQUENCES) or shape[0] == len(SEQUENCES))


def split_channels(data: np.ndarray) -> list[np.ndarray] | None:
    """The 4 sequence volumes of a 4-channel array (channels last, as NIfTI stores them, or first); None when
    ``data`` is not 4-channel."""
    shape = tuple(data.shape)
    if not is_four_channel(shape):
        return None
    if shape[-1] == len(SEQUENCES):
        return [data[..., i] for i in range(len(SEQUENCES))]  # views: no copy of the study
    return [data[i] for i in range(len(SEQUENCES))]
