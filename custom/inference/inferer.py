"""Inference as the paper did it: whole volume, 8-flip test-time augmentation, checkpoint ensembles, BraTS outputs."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence

import nibabel as nib
import numpy as np
import torch
from custom.core.errors import DataError
from custom.core.io import atomic_path, safe_case_id
from custom.core.labels import DEFAULT_SCHEME, get_scheme, resolve_label_scheme
from custom.core.naming import CHANNEL_INDEX_KEY, case_id_from_path, nifti_stem, spatial_shape
from custom.data.datalist import implied_et_label, load_datalist
from custom.data.discovery import discover_cases
from custom.inference.ensemble import FLIP_DIMS, SnapshotFlipEnsemble, sum_flipped_probabilities
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import MapTransform

__all__ = [
    "FLIP_DIMS",
    "FlipTTAInferer",
    "inference_files",
    "RegionsToLabelsd",
    "RestrictToBraind",
    "BratsPredictionWriter",
    "dataset_label_scheme",
]

logger = logging.getLogger(__name__)


class FlipTTAInferer(Inferer):
    """Mirror test-time augmentation: the mean of ``activation(network(flip(x)))`` flipped back, over ``num_flips``.

    Flipped copies run through the network ``chunk_size`` at a time as one batch (``None``: 4 on CUDA, 1 on CPU),
    and the flipped-back probabilities are summed in float32, so memory grows with the chunk, not with the number
    of flips. Returns probabilities (sigmoid by default), the quantity the paper averages over flips and models.
    ``base_inferer`` (e.g. ``SlidingWindowInferer``) replaces the whole-volume call for GPUs with little memory.

    Given a ``custom.inference.ensemble.SnapshotFlipEnsemble`` (inference.json's and evaluate.json's ``network``), it runs the
    flips that the ensemble planned for each of its networks (e.g. the paper's snapshot ``i`` on flip ``i``) instead
    of ``num_flips`` flips of the whole ensemble; any other network (MONAI Label's, a plain module) gets
    ``num_flips`` flips.
    """

    def __init__(
        self,
        num_flips: int = 8,
        chunk_size: int | None = None,
        activation: Callable[[torch.Tensor], torch.Tensor] | None = torch.sigmoid,
        base_inferer: Inferer | None = None,
    ) -> None:
        if not 1 <= int(num_flips) <= len(FLIP_DIMS):
            raise ValueError(f"tta (num_flips) must be between 1 and {len(FLIP_DIMS)}, got {num_flips}.")
        self.flips = FLIP_DIMS[: int(num_flips)]
        self.chunk_size = chunk_size
        self.activation = activation
        self.base_inferer = base_inferer

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args, **kwargs) -> torch.Tensor:
        if isinstance(network, SnapshotFlipEnsemble):
            return network.probabilities(inputs, self.chunk_size, self.base_inferer, self.activation)
        base = (lambda batch, net: self.base_inferer(batch, net, *args, **kwargs)) if self.base_inferer else None
        model = (lambda batch: network(batch, *args, **kwargs)) if args or kwargs else network
        total = sum_flipped_probabilities(inputs, model, self.flips, self.chunk_size, self.activation, base)
        return total / len(self.flips)


def inference_files(source: str) -> list[dict]:
    """Every case of ``source`` (a BraTS folder in any supported naming, a decathlon tree, a datalist JSON, a
    4-channel NIfTI file or a folder of them), labelled or not, as ``{"case_id", "image"}`` entries; a 4-channel file
    whose ``dataset.json`` names its channels also carries ``channel_index`` (``CheckSequencesd`` re-orders them).

    A case with missing sequences becomes an entry with an ``"error"`` that ``segment_cases`` reports, so one
    incomplete case neither stops the run nor disappears from its summary. A folder with no recognisable case, or a
    datalist with an unusable case id, raises ``DataError`` (one line through ``custom.entry.inference_files``).
    """
    source = str(source)
    if not os.path.exists(source):
        return []  # lets the config be parsed and inspected without data; segment_cases reports it
    if os.path.isfile(source) and nifti_stem(os.path.basename(source)) is not None:
        return [{"case_id": case_id_from_path(source), "image": [source]}]
    if os.path.isdir(source):
        incomplete: dict[str, str] = {}
        cases = discover_cases(source, allow_incomplete=True, incomplete_cases=incomplete)
        entries = [_entry(c.case_id, c.images, c.channel_index) for c in cases]
        entries += [{"case_id": case_id, "image": [], "error": problem} for case_id, problem in incomplete.items()]
        return sorted(entries, key=lambda e: e["case_id"])
    datalist = load_datalist(source)
    entries = list(datalist.get("training", [])) + list(datalist.get("testing", []))
    return [
        _entry(e.get("case_id") or case_id_from_path(_first(e["image"])), e["image"], e.get(CHANNEL_INDEX_KEY))
        for e in entries
    ]


def _entry(case_id: str, images, channel_index=None) -> dict:
    entry = {"case_id": case_id, "image": images}
    if channel_index is not None:
        entry[CHANNEL_INDEX_KEY] = list(channel_index)
    return entry


def dataset_label_scheme(source: str) -> str:
    """The label scheme to write for the cases of ``source``: the one its ``dataset.json`` names (a decathlon tree:
    ``msd``), else the one its labels or file naming show (BraTS 2023+ naming: ``brats2023``, or ``brats2024`` when
    most label maps hold RC 4; 2018-2021 naming and 4-channel files: ``brats2018``); ``brats2018`` when ``source``
    does not exist yet. ``--label_scheme`` overrides it."""
    try:
        if os.path.isdir(source):  # one discovery gives the images and the label maps
            cases = discover_cases(source, allow_incomplete=True, incomplete_cases={})
            named = {c.label_scheme for c in cases}
            if len(named) == 1 and None not in named:
                return named.pop()
            entries = [{"image": c.images} for c in cases]
            labelled = [{"label": c.label} for c in cases if c.label]  # RC 4 tells brats2024 from brats2023
        elif os.path.isfile(source) and source.endswith(".json"):
            datalist = load_datalist(source)
            entries = [e for e in inference_files(source) if e["image"]]
            if entries and (datalist.get("label_scheme") or datalist.get("labels")):
                return resolve_label_scheme(datalist).name
            labelled = []
        else:
            entries, labelled = [e for e in inference_files(source) if e["image"]], []
    except DataError:  # no recognisable case: the run reports it, in one message
        entries = []
    if not entries:
        return DEFAULT_SCHEME
    return resolve_label_scheme({"et_label": implied_et_label(entries), "training": labelled}).name


def _first(image: str | Sequence[str]) -> str:
    return image if isinstance(image, (str, os.PathLike)) else image[0]


class RegionsToLabelsd(MapTransform):
    """Dictionary wrapper of ``custom.core.labels.regions_to_labels``: TC, WT, ET (, RC) masks -> one BraTS label map
    ``(1, H, W, D)`` uint8 of ``label_scheme`` (None: the scheme of ``et_label``, default ET 4; ``et_label`` overrides the
    scheme's ET value as in ``custom.core.labels.get_scheme``). With ``brats2024``, RC outside the tumor is written 4.
    inference.json runs it on the network's grid, before ``Invertd``: ``et_threshold`` counts voxels of the training
    grid (``target_spacing``; 500 voxels are 0.5 ml at 1 mm), whatever the voxel size of the input files.
    """

    def __init__(
        self, keys, et_label: int | None = None, et_threshold: int = 0, allow_missing_keys: bool = False,
        label_scheme: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__(keys, allow_missing_keys)
        self.scheme = get_scheme(label_scheme, et_label)
        self.et_label, self.et_threshold = self.scheme.et_label, int(et_threshold)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            regions = d[key]
            labels = self.scheme.to_labels(regions, self.et_threshold)[None]
            if isinstance(regions, MetaTensor):
                labels = MetaTensor(labels, meta=regions.meta)
            d[key] = labels
        return d


class RestrictToBraind(MapTransform):
    """Writes no label outside the brain: sets ``keys`` (labels, probabilities) to 0 wherever the brain mask of
    ``mask_key`` is 0. The mask is the union of the non-zero voxels of the input sequences on the input's own grid
    (``custom.data.transforms.BrainMaskd`` right after loading), so this runs last, once ``Invertd`` has brought the
    prediction back to that grid."""

    def __init__(self, keys, mask_key: str = "brain_mask", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        if self.mask_key not in d:
            raise KeyError(
                f"RestrictToBraind: no `{self.mask_key}` in the case: the preprocessing must store the brain mask "
                "with custom.data.transforms.BrainMaskd right after loading (inference.json's preprocessing does)."
            )
        mask = torch.as_tensor(d[self.mask_key]).bool()
        for key in self.key_iterator(d):
            value = d[key]
            if tuple(value.shape[-3:]) != tuple(mask.shape[-3:]):
                raise ValueError(
                    f"RestrictToBraind: `{key}` has the spatial shape {tuple(value.shape[-3:])}, the input's brain mask "
                    f"{tuple(mask.shape[-3:])}: bring `{key}` back to the input grid (Invertd) before this transform."
                )
            d[key] = value.masked_fill(~mask.to(value.device), 0)
        return d


def _atomic_nifti(image: nib.Nifti1Image, path: str) -> None:
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(image, tmp)


class BratsPredictionWriter:
    """Writes ``<output_dir>/<case_id>.nii.gz``: uint8 labels with the affine, shape and qform/sform codes of the
    case's first input file (BraTS submission format), atomically; optionally the averaged probabilities as
    ``<case_id>_probabilities.nii.gz`` (float32, channels last: TC, WT, ET).

    A prediction whose shape, or (for a MetaTensor) whose affine, is not the input's is refused: it was not brought
    back to the input grid, and writing it with the input's header would misplace it."""

    def __init__(
        self, output_dir: str, save_probabilities: bool = False, probabilities_key: str = "probabilities"
    ) -> None:
        self.output_dir, self.save_probabilities, self.probabilities_key = (
            output_dir,
            save_probabilities,
            probabilities_key,
        )

    def __call__(self, data: Mapping) -> str:
        case_id = safe_case_id(data["case_id"])  # never a path outside output_dir
        source = _first(data["source"])
        reference = nib.load(source)
        expected_shape = spatial_shape(reference.shape)
        labels = np.asarray(data["pred"]).astype(np.uint8).reshape(np.asarray(data["pred"]).shape[-3:])
        if labels.shape != expected_shape:
            raise RuntimeError(
                f"{case_id}: prediction shape {labels.shape} differs from the input {source} {expected_shape}."
            )
        self._check_affine(case_id, source, data["pred"], reference.affine)
        path = os.path.join(self.output_dir, f"{case_id}.nii.gz")
        image = self._like(labels, reference)
        if data.get("provenance"):  # the settings that made it, so a rerun can tell whether to keep it
            image.header["descrip"] = str(data["provenance"]).encode()[:79]
        _atomic_nifti(image, path)
        if self.save_probabilities and self.probabilities_key in data:
            probabilities = np.moveaxis(np.asarray(data[self.probabilities_key], dtype=np.float32), 0, -1)
            _atomic_nifti(
                self._like(probabilities, reference), os.path.join(self.output_dir, f"{case_id}_probabilities.nii.gz")
            )
        return path

    @staticmethod
    def _check_affine(case_id: str, source: str, prediction, affine: np.ndarray) -> None:
        if not isinstance(prediction, MetaTensor):
            return
        predicted = np.asarray(prediction.affine, dtype=np.float64)
        if predicted.shape != (4, 4) or not np.allclose(predicted, affine, rtol=0.0, atol=1e-3):
            raise RuntimeError(
                f"{case_id}: the prediction's affine {predicted.round(4).tolist()} is not the input's "
                f"{np.round(affine, 4).tolist()} ({source}): the postprocessing must invert the preprocessing's "
                "geometry (Invertd with the preprocessing) before the writer."
            )

    @staticmethod
    def _like(array: np.ndarray, reference: nib.Nifti1Image) -> nib.Nifti1Image:
        image = nib.Nifti1Image(array, reference.affine)
        header = reference.header
        image.set_qform(reference.affine, code=int(header["qform_code"]) or 1)
        image.set_sform(reference.affine, code=int(header["sform_code"]) or 1)
        image.header.set_xyzt_units(*header.get_xyzt_units())
        return image
