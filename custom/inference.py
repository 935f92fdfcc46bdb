"""Inference as the paper did it: whole volume, 8-flip test-time augmentation, checkpoint ensembles, BraTS outputs."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import MapTransform

from custom.checkpoints import TRAINING_ONLY, load_state_dict, resolve_checkpoints
from custom.io import atomic_path
from custom.data import case_id_from_path, discover_cases, implied_et_label, load_datalist
from custom.transforms import regions_to_labels

__all__ = [
    "FLIP_DIMS",
    "FlipTTAInferer",
    "CheckpointEnsemble",
    "load_network",
    "inference_files",
    "RegionsToLabelsd",
    "BratsPredictionWriter",
    "segment_cases",
    "output_et_label",
]

logger = logging.getLogger(__name__)

# The 8 flip combinations of the 3 spatial axes, identity first; ``tta=k`` uses the first k.
FLIP_DIMS: tuple[tuple[int, ...], ...] = ((), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4))


class FlipTTAInferer(Inferer):
    """Mirror test-time augmentation: the mean of ``activation(network(flip(x)))`` flipped back, over ``num_flips``.

    Flipped copies run through the network ``chunk_size`` at a time as one batch (``None``: 4 on CUDA, 1 on CPU),
    and the flipped-back probabilities are summed in float32, so memory grows with the chunk, not with the number
    of flips. Returns probabilities (sigmoid by default), the quantity the paper averages over flips and models.
    ``base_inferer`` (e.g. ``SlidingWindowInferer``) replaces the whole-volume call for GPUs with little memory.
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

    def _chunk_size(self, inputs: torch.Tensor) -> int:
        if self.chunk_size:
            return max(1, int(self.chunk_size))
        return 4 if inputs.is_cuda else 1

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args, **kwargs) -> torch.Tensor:
        if isinstance(inputs, MetaTensor):
            inputs = inputs.as_tensor()
        n = inputs.shape[0]
        chunk = self._chunk_size(inputs)
        total: torch.Tensor | None = None
        for start in range(0, len(self.flips), chunk):
            flips = self.flips[start : start + chunk]
            batch = torch.cat([torch.flip(inputs, dims) if dims else inputs for dims in flips], dim=0)
            outputs = self.base_inferer(batch, network, *args, **kwargs) if self.base_inferer else network(batch, *args, **kwargs)
            if isinstance(outputs, MetaTensor):
                outputs = outputs.as_tensor()
            if self.activation is not None:
                outputs = self.activation(outputs.float())
            for i, dims in enumerate(flips):
                part = outputs[i * n : (i + 1) * n].float()
                part = torch.flip(part, dims) if dims else part
                total = part if total is None else total.add_(part)
        assert total is not None
        return total / len(self.flips)


class CheckpointEnsemble(torch.nn.Module):
    """Averages the sigmoid probabilities of several networks (snapshots, folds, trainings).

    Returns the logit of the mean probability, so it drops in wherever one network's logits are expected:
    ``sigmoid`` of the output is exactly the ensemble's mean probability (clamped to [1e-6, 1 - 1e-6]).
    """

    def __init__(self, members: Sequence[torch.nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("CheckpointEnsemble needs at least one network.")
        self.members = torch.nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean_probability = None
        for member in self.members:
            probability = torch.sigmoid(member(x).float())
            mean_probability = probability if mean_probability is None else mean_probability.add_(probability)
        assert mean_probability is not None
        return torch.logit(mean_probability / len(self.members), eps=1e-6)


def _load_weights(network: torch.nn.Module, path: str) -> None:
    """Strict loading, except for the training-only trilinear decoder, which is never used in eval mode: it may
    be absent from the file (``model.pt`` is saved without it) or from the network (inference.json builds none)."""
    hint = "was it trained with other `network_def` settings (init_filters, blocks_down, blocks_up)? Use the same ones here."
    try:
        result = network.load_state_dict(load_state_dict(path), strict=False)
    except RuntimeError as e:  # shape mismatches
        raise RuntimeError(f"checkpoint {path} does not fit `network_def` ({str(e).splitlines()[1].strip()}); {hint}") from e
    missing = [k for k in result.missing_keys if not k.startswith(TRAINING_ONLY)]
    unexpected = [k for k in result.unexpected_keys if not k.startswith(TRAINING_ONLY)]
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint {path} does not fit `network_def` ({len(missing)} missing weights, e.g. {missing[:2]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:2]}); {hint}"
        )


def load_network(
    network_def: torch.nn.Module,
    checkpoints: str | Sequence[str],
    device: str | torch.device = "cpu",
    compile: bool = False,
    base_dir: str | None = None,
) -> torch.nn.Module:
    """``network_def`` with the weights of ``checkpoints``, in eval mode on ``device``.

    One checkpoint gives the network itself; several give a ``CheckpointEnsemble`` of copies. Every file is
    loaded (``weights_only=True``) and checked here, before any case is processed; errors name the file.
    """
    import copy

    paths = resolve_checkpoints(checkpoints, base_dir)
    members = []
    for path in paths:
        member = copy.deepcopy(network_def) if len(paths) > 1 else network_def
        _load_weights(member, path)
        members.append(member)
    network = members[0] if len(members) == 1 else CheckpointEnsemble(members)
    network = network.to(device).eval()
    logger.info(f"loaded {len(paths)} checkpoint(s): {', '.join(paths)}")
    # static shapes: dynamic-shape compilation of strided 3-D convolutions fails in torch 2.13 inductor; every new
    # crop shape recompiles, so compile pays off for many cases of similar size, not for one case
    return torch.compile(network, dynamic=False) if compile else network


def inference_files(source: str) -> list[dict]:
    """Every case of ``source`` (a BraTS folder in any supported naming, a datalist JSON, a 4-channel NIfTI file or a
    folder of them), labelled or not, as ``{"case_id", "image"}`` entries.

    A case with missing sequences becomes an entry with an ``"error"`` that ``segment_cases`` reports, so one
    incomplete case neither stops the run nor disappears from its summary.
    """
    source = str(source)
    if not os.path.exists(source):
        return []  # lets the config be parsed and inspected without data; segment_cases reports it
    if os.path.isfile(source) and re.search(r"\.nii(\.gz)?$", source):
        return [{"case_id": case_id_from_path(source), "image": [source]}]
    if os.path.isdir(source):
        incomplete: dict[str, str] = {}
        cases = discover_cases(source, allow_incomplete=True, incomplete_cases=incomplete)
        entries = [{"case_id": c.case_id, "image": c.images} for c in cases]
        entries += [{"case_id": case_id, "image": [], "error": problem} for case_id, problem in incomplete.items()]
        return sorted(entries, key=lambda e: e["case_id"])
    datalist = load_datalist(source)
    entries = list(datalist.get("training", [])) + list(datalist.get("testing", []))
    return [{"case_id": e.get("case_id") or case_id_from_path(_first(e["image"])), "image": e["image"]} for e in entries]


def output_et_label(source: str) -> int:
    """The ET label to write: 3 when every input uses the BraTS 2023+ naming, else 4 (2018-2021, 4-channel files)."""
    entries = [e for e in inference_files(source) if e["image"]]
    return implied_et_label(entries) if entries else 4


def _first(image: str | Sequence[str]) -> str:
    return image if isinstance(image, (str, os.PathLike)) else image[0]


class RegionsToLabelsd(MapTransform):
    """Dictionary wrapper of ``regions_to_labels``: TC, WT, ET masks -> one BraTS label map ``(1, H, W, D)`` uint8."""

    def __init__(self, keys, et_label: int = 4, et_threshold: int = 0, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.et_label, self.et_threshold = int(et_label), int(et_threshold)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            regions = d[key]
            labels = regions_to_labels(regions, self.et_label, self.et_threshold)[None]
            if isinstance(regions, MetaTensor):
                labels = MetaTensor(labels, meta=regions.meta)
            d[key] = labels
        return d


def _atomic_nifti(image: nib.Nifti1Image, path: str) -> None:
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(image, tmp)


class BratsPredictionWriter:
    """Writes ``<output_dir>/<case_id>.nii.gz``: uint8 labels with the affine, shape and qform/sform codes of the
    case's first input file (BraTS submission format), atomically; optionally the averaged probabilities as
    ``<case_id>_probabilities.nii.gz`` (float32, channels last: TC, WT, ET)."""

    def __init__(self, output_dir: str, save_probabilities: bool = False, probabilities_key: str = "probabilities") -> None:
        self.output_dir, self.save_probabilities, self.probabilities_key = output_dir, save_probabilities, probabilities_key

    def __call__(self, data: Mapping) -> str:
        case_id = data["case_id"]
        source = _first(data["source"])
        reference = nib.load(source)
        spatial_shape = reference.shape[:3] if reference.ndim == 3 or reference.shape[-1] == 4 else reference.shape[1:4]
        labels = np.asarray(data["pred"]).astype(np.uint8).reshape(np.asarray(data["pred"]).shape[-3:])
        if labels.shape != tuple(spatial_shape):
            raise RuntimeError(f"{case_id}: prediction shape {labels.shape} differs from the input {source} {spatial_shape}.")
        path = os.path.join(self.output_dir, f"{case_id}.nii.gz")
        _atomic_nifti(self._like(labels, reference), path)
        if self.save_probabilities and self.probabilities_key in data:
            probabilities = np.moveaxis(np.asarray(data[self.probabilities_key], dtype=np.float32), 0, -1)
            _atomic_nifti(self._like(probabilities, reference), os.path.join(self.output_dir, f"{case_id}_probabilities.nii.gz"))
        return path

    @staticmethod
    def _like(array: np.ndarray, reference: nib.Nifti1Image) -> nib.Nifti1Image:
        image = nib.Nifti1Image(array, reference.affine)
        header = reference.header
        image.set_qform(reference.affine, code=int(header["qform_code"]) or 1)
        image.set_sform(reference.affine, code=int(header["sform_code"]) or 1)
        image.header.set_xyzt_units(*header.get_xyzt_units())
        return image


def _describe(error: BaseException) -> str:
    """The root cause of an error, without MONAI's "applying transform ..." wrappers."""
    while error.__cause__ is not None and str(error).startswith("applying transform"):
        error = error.__cause__
    return f"{type(error).__name__}: {error}"


def segment_cases(
    data: Sequence[dict],
    preprocessing: Callable,
    network: torch.nn.Module,
    inferer: Callable,
    postprocessing: Callable,
    writer: Callable[[Mapping], str],
    device: str | torch.device = "cpu",
    amp: bool = False,
    progress: bool = True,
    raise_on_failure: bool = True,
) -> list[str]:
    """Segments every case and writes it; a case that fails is reported and the others still run.

    Ends with a summary and raises ``RuntimeError`` (non-zero exit) listing the failed cases, after all the good
    ones are written; with ``raise_on_failure=False`` it only logs them (evaluation then reports the cases it
    finds no prediction for, after scoring the others).
    """
    from tqdm import tqdm

    device = torch.device(device)
    written, failures = [], []
    if not data:
        raise ValueError("no cases to segment: `dataset_dir` is missing, empty or holds no BraTS case.")
    for item in tqdm(data, desc="segmenting", unit="case", disable=not progress):
        case_id = item.get("case_id") or case_id_from_path(_first(item["image"]))
        try:
            if item.get("error"):
                raise ValueError(item["error"])
            sample = preprocessing({**item, "source": item["image"]})
            image = sample["image"].unsqueeze(0).to(device)
            autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp and device.type == "cuda" else contextlib.nullcontext()
            with torch.inference_mode(), autocast:
                probabilities = inferer(image, network)[0].float().cpu()
            sample["pred"] = MetaTensor(probabilities, meta=sample["image"].meta)
            sample = postprocessing(sample)
            written.append(writer({**sample, "case_id": case_id}))
        except Exception as e:  # one bad case must not stop the others
            failures.append(f"{case_id}: {_describe(e)}")
            logger.error(failures[-1])
    print(f"segmented {len(written)} of {len(data)} cases" + (f"; {len(failures)} failed" if failures else ""))
    if failures and raise_on_failure:
        raise RuntimeError("these cases failed (the others were written):\n  " + "\n  ".join(failures))
    return written
