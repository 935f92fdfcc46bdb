"""BraTS file-naming and channel facts, in one place: sequence order, file-name suffixes of every BraTS release,
NIfTI stems, case ids from paths, the split of a 4-channel study and the channel order of a Medical Segmentation
Decathlon study (``dataset.json``'s ``"modality"`` map: ``{"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}``).

Every module that reads or names BraTS files asks this one; nothing else spells a suffix table.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from monai.transforms import MapTransform

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
    "spatial_shape",
    "channel_index_from_modality",
    "OrderSequencesd",
    "CHANNEL_INDEX_KEY",
    "NAMINGS_LOOKED_FOR",
    "WRITTEN_SUFFIXES",
]

SEQUENCES = ("t1", "t1c", "t2", "flair")  # channel order of the network input: T1, T1c (T1Gd), T2, FLAIR
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
    # the names of decathlon dataset.json "modality" maps and DICOM-style series names
    "t1w": "t1",
    "t1native": "t1",
    "t1wce": "t1c",
    "t1contrast": "t1c",
    "t1post": "t1c",
    "t2flair": "flair",
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
    """The channel (``t1``, ``t1c``, ``t2``, ``flair``) a sequence name or suffix stands for (case, spaces, ``-`` and
    ``_`` ignored: ``"T1-Gd"``, ``"t1gd"``, ``"T1w"``, ``"FLAIR"``), None when unknown."""
    key = str(key).lower()
    return _SEQUENCE_ALIASES.get(key) or _SEQUENCE_ALIASES.get(re.sub(r"[\s_\-]", "", key))


def is_four_channel(shape: tuple[int, ...]) -> bool:
    """A 4-D shape with the 4 sequences on its first or last axis, or NIfTI's vector layout ``(X, Y, Z, 1, 4)``."""
    shape = tuple(shape)
    if len(shape) == 5:
        return shape[3] == 1 and shape[4] == len(SEQUENCES)
    return len(shape) == 4 and (shape[-1] == len(SEQUENCES) or shape[0] == len(SEQUENCES))


def spatial_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The (X, Y, Z) of an input file's shape: a 3-D volume, a volume stored as (X, Y, Z, 1), or a 4-channel study
    (channels last, first, or ``(X, Y, Z, 1, 4)``): what a prediction for it must have."""
    shape = tuple(shape)
    if len(shape) == 4 and shape[0] == len(SEQUENCES) and shape[-1] != len(SEQUENCES):
        return shape[1:4]  # channels first
    return shape[:3]


def split_channels(data: np.ndarray) -> list[np.ndarray] | None:
    """The 4 sequence volumes of a 4-channel array (channels last, as NIfTI stores them, first, or ``(X, Y, Z, 1,
    4)``), in the file's channel order; None when ``data`` is not 4-channel."""
    shape = tuple(data.shape)
    if not is_four_channel(shape):
        return None
    if len(shape) == 5:  # (X, Y, Z, 1, 4)
        return [data[:, :, :, 0, i] for i in range(len(SEQUENCES))]
    if shape[-1] == len(SEQUENCES):
        return [data[..., i] for i in range(len(SEQUENCES))]  # views: no copy of the study
    return [data[i] for i in range(len(SEQUENCES))]


#: datalist entry key: for T1, T1c, T2, FLAIR, the index of that sequence in the entry's 4-channel file
CHANNEL_INDEX_KEY = "channel_index"


def channel_index_from_modality(modality: object, where: str = "dataset.json") -> tuple[int, ...]:
    """For T1, T1c, T2, FLAIR, the channel of a 4-channel file that holds it, from a decathlon ``"modality"`` map
    ``{"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}`` (Task01_BrainTumour: ``(1, 2, 3, 0)``).

    ``ValueError`` naming ``where`` when the map is not 4 channels 0-3 naming each of the four sequences once."""
    expected = "a 'modality' map of the 4 channels 0-3 to T1, T1c (T1Gd), T2 and FLAIR, e.g. " + (
        '{"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}'
    )
    if not isinstance(modality, dict):
        raise ValueError(f"{where}: 'modality' is {modality!r}; expected {expected}")
    by_sequence: dict[str, int] = {}
    for key, name in modality.items():
        try:
            channel = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: 'modality' key {key!r} is not a channel number; expected {expected}") from None
        sequence = sequence_name(name)
        if sequence is None:
            raise ValueError(f"{where}: 'modality' channel {key} is {name!r}, not one of T1, T1c, T2, FLAIR")
        if sequence in by_sequence:
            raise ValueError(f"{where}: 'modality' names {sequence} twice (channels {by_sequence[sequence]} and {key})")
        by_sequence[sequence] = channel
    if sorted(by_sequence.values()) != list(range(len(SEQUENCES))) or len(by_sequence) != len(SEQUENCES):
        raise ValueError(f"{where}: 'modality' is {modality!r}; expected {expected}")
    return tuple(by_sequence[s] for s in SEQUENCES)


class OrderSequencesd(MapTransform):
    """Dictionary transform after ``EnsureSequenceChannelsd``: puts the channels of ``image`` (4, X, Y, Z) in the
    order T1, T1c, T2, FLAIR using the entry's ``channel_index`` (``channel_index_from_modality``), then drops that
    key so that a second application changes nothing. Entries without it pass unchanged.

    A MONAI ``MapTransform`` (deterministic): MONAI's caches cache the transforms up to the first one that is random
    or not a MONAI transform, and the disk cache keys its files on them, so it must be one."""

    def __init__(self, keys: str = "image", index_key: str = CHANNEL_INDEX_KEY) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.key = self.keys[0]
        self.index_key = index_key

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        index = d.pop(self.index_key, None)
        if index is None or self.key not in d:
            return d
        index = [int(i) for i in np.asarray(index).ravel()]
        if sorted(index) != list(range(len(SEQUENCES))):
            raise ValueError(f"{self.index_key} {index} is not an order of the channels 0-3")
        if index != list(range(len(SEQUENCES))):
            image = d[self.key]
            meta = getattr(image, "meta", None)
            reordered = image[index]
            if meta is not None and hasattr(reordered, "meta"):
                reordered.meta = dict(meta)
            d[self.key] = reordered
        return d
