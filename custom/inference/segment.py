"""Segmenting a folder of cases: per-case input checks, quality flags, tumor volumes, a summary, many processes.

``segment_cases`` is what ``Segmenter.run`` does (the ``evaluator`` of inference.json, which evaluate.json builds
from inference.json). For every case it

1. reports a case that dataset discovery found incomplete, and checks the headers (shapes, finite affines);
2. skips it when its output already exists, reads whole and was written from the same inputs with the same settings
   (a fingerprint in the NIfTI header's ``descrip``, see ``_run_fingerprint`` and ``_case_fingerprint``:
   checkpoints, ensemble, flips, pre- and postprocessing settings, the files written, and each input file's size,
   modification time and header; ``overwrite`` redoes it), so a killed run is resumed by running it again, and a
   retrained model, a changed setting or a replaced input never keeps stale outputs;
3. loads it through ``preprocessing``, whose ``CheckSequencesd`` runs the pre-flight's data checks (NaN/Inf, blank or
   constant sequences, empty brain) on what was loaded; an error fails the case, a warning is carried along;
4. segments and writes it, then flags it (``QualityCheck``) when the prediction is empty although the brain is not,
   or when the whole tumor covers more than ``max_tumor_fraction`` of the brain; flagged cases are written;
5. records its tumor volumes in ``<output_dir>/volumes.csv`` (rewritten atomically after every case).

The run holds the lock of ``output_dir`` (``custom.core.lock.lock_output_dir``, rank 0 under torchrun) from before
the weights load to its end, so a second run into the same folder ends at once with ``OutputDirLocked`` and cannot
mix its results with the first's; taking the lock checks that the folder is writable and removes the temporary
files of killed saves. A ``volumes.csv`` that is not this bundle's (no ``case_id`` column, unreadable) is moved to
``volumes.csv.bak`` with one warning and started anew.

A failing case never stops the others. The run ends with a summary that lists written, skipped, failed and flagged
cases one line each, and a non-zero exit (``DataError``: no traceback) when a case failed.

Under torchrun (``torch.distributed`` initialised), the cases are split across ranks balanced by voxel count (each
case on exactly one rank), each rank writes its own outputs, and one ``all_gather_object`` at the end brings every
rank's results to rank 0, which prints the summary and writes ``volumes.csv``. Every rank reaches that gather
whatever happened to its cases (all errors are caught per case and around the loop), so no rank waits forever, and
every rank exits non-zero when any case failed.
"""

from __future__ import annotations

import contextlib
import csv
import enum
import hashlib
import json
import logging
import os
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
import torch
from custom.core.distributed import rank_and_world_size
from custom.core.errors import DataError
from custom.core.io import atomic_path
from custom.core.labels import LabelScheme, get_scheme
from custom.core.lock import is_locked_here, lock_output_dir, release_output_dir
from custom.core.naming import case_id_from_path
from custom.data.validation import check_headers, locate_read_error
from monai.bundle import ConfigParser
from monai.data import MetaTensor

__all__ = [
    "Segmenter",
    "QualityCheck",
    "segment_cases",
    "label_volumes",
    "split_by_size",
    "SegmentationSummary",
    "load_segmenter",
]

logger = logging.getLogger(__name__)
VOLUMES_CSV = "volumes.csv"


@dataclass
class QualityCheck:
    """Flags suspicious predictions (a warning, not a failure): empty although the brain is not, or a whole tumor
    larger than ``max_tumor_fraction`` of the brain (the largest gliomas of BraTS cover well under half of it).

    With ``brain_mask`` (voxels non-zero in any sequence, the label map's shape) the fraction counts only the tumor
    voxels inside the brain, so it is a fraction of the brain (at most 100%); without it, every tumor voxel."""

    max_tumor_fraction: float = 0.5
    flag_empty: bool = True

    def __call__(self, labels: np.ndarray, brain_voxels: int, brain_mask: np.ndarray | None = None) -> list[str]:
        labels = np.asarray(labels)
        if brain_mask is not None:
            brain_mask = np.asarray(brain_mask, dtype=bool).reshape(labels.shape)
            brain_voxels = int(np.count_nonzero(brain_mask))
            tumor = int(np.count_nonzero(labels[brain_mask]))
        else:
            tumor = int(np.count_nonzero(labels))
        flags = []
        if self.flag_empty and tumor == 0 and brain_voxels > 0:
            flags.append(f"empty prediction although the brain has {brain_voxels} voxels")
        if brain_voxels > 0 and tumor / brain_voxels > self.max_tumor_fraction:
            flags.append(
                f"whole tumor covers {tumor / brain_voxels:.0%} of the brain (more than max_tumor_fraction "
                f"{self.max_tumor_fraction:g})"
            )
        return flags


def label_volumes(
    labels: np.ndarray,
    spacing: Sequence[float],
    et_label: int = 4,
    rc_label: int | None = None,
    core_label: int = 1,
    edema_label: int = 2,
) -> dict:
    """Volumes in millilitres of each BraTS label and region of a label map with voxel ``spacing`` (mm).

    Labels: ``ncr`` ``core_label`` (necrosis / non-enhancing core: 1, 2 in ``msd``), ``ed`` ``edema_label`` (2, 1 in
    ``msd``), ``et`` ``et_label``, and ``rc`` (resection cavity, label 4 of BraTS 2024+ when ``rc_label`` is given);
    regions: ``tc`` = ncr + et, ``wt`` = ncr + ed + et (``LabelScheme.volume_labels`` gives a scheme's values).
    """
    labels = np.asarray(labels)
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    counts = np.bincount(labels.ravel().astype(np.int64), minlength=max(5, int(et_label) + 1))
    volumes = {"ncr_ml": counts[int(core_label)], "ed_ml": counts[int(edema_label)], "et_ml": counts[int(et_label)]}
    if rc_label is not None:
        volumes["rc_ml"] = counts[int(rc_label)]
    volumes["tc_ml"] = volumes["ncr_ml"] + volumes["et_ml"]
    volumes["wt_ml"] = volumes["tc_ml"] + volumes["ed_ml"]
    return {key: round(float(count) * voxel_ml, 4) for key, count in volumes.items()}


@dataclass
class CaseResult:
    case_id: str
    status: str  # "written", "skipped", "failed"
    detail: str = ""  # output path or reason
    flags: list[str] = field(default_factory=list)
    volumes: dict | None = None


@dataclass
class SegmentationSummary:
    results: list[CaseResult]

    def of(self, status: str) -> list[CaseResult]:
        return [r for r in self.results if r.status == status]

    @property
    def written(self) -> list[str]:
        return [r.detail for r in self.of("written")]

    @property
    def failed(self) -> list[CaseResult]:
        return self.of("failed")

    @property
    def flagged(self) -> list[CaseResult]:
        return [r for r in self.results if r.flags]

    def text(self) -> str:
        n = len(self.results)
        head = f"segmented {len(self.of('written'))} of {n} cases"
        if self.of("skipped"):
            head += f"; {len(self.of('skipped'))} already written (skipped; --overwrite true redoes them)"
        head += f"; {len(self.failed)} failed; {len(self.flagged)} flagged"
        lines = [head]
        for title, rows in (
            ("written", [f"{r.case_id}: {r.detail}" for r in self.of("written")]),
            ("skipped", [f"{r.case_id}: {r.detail}" for r in self.of("skipped")]),
            ("flagged (written; please look at them)", [f"{r.case_id}: {'; '.join(r.flags)}" for r in self.flagged]),
            ("failed (not written)", [f"{r.case_id}: {r.detail}" for r in self.failed]),
        ):
            if rows:
                lines.append(f"{title}:")
                lines += [f"  {row}" for row in rows]
        return "\n".join(lines)


def _first(image) -> str:
    return image if isinstance(image, (str, os.PathLike)) else image[0]


def _describe(error: BaseException) -> str:
    """The root cause of an error, without MONAI's "applying transform ..." wrappers."""
    while error.__cause__ is not None and str(error).startswith("applying transform"):
        error = error.__cause__
    return f"{type(error).__name__}: {error}"


def _voxels(item: Mapping) -> int:
    """Voxel count of a case from its first file's header (0 when unreadable: such a case fails quickly anyway)."""
    try:
        return int(np.prod(nib.load(_first(item["image"])).shape[:3]))
    except Exception:  # noqa: BLE001
        return 0


def split_by_size(sizes: Sequence[int], parts: int) -> list[list[int]]:
    """Indices of ``sizes`` dealt to ``parts`` groups of nearly equal total size: largest first, each to the group
    with the least so far (ties to the lowest group). Deterministic, so every rank computes the same split."""
    groups: list[list[int]] = [[] for _ in range(parts)]
    totals = [0] * parts
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        target = min(range(parts), key=lambda g: (totals[g], g))
        groups[target].append(index)
        totals[target] += sizes[index]
    return [sorted(group) for group in groups]


def _fingerprint(settings: Mapping | None) -> str:
    """Hash of the settings that shape an output; a path that exists counts with its size and modification time,
    so a retrained checkpoint of the same name changes it."""

    def expand(value):
        if isinstance(value, (list, tuple)):
            return [expand(v) for v in value]
        if isinstance(value, Mapping):
            return {str(k): expand(v) for k, v in sorted(value.items())}
        if isinstance(value, str) and os.path.exists(value):
            paths = (
                [value]
                if os.path.isfile(value)
                else sorted(os.path.join(value, name) for name in os.listdir(value) if name.endswith(".pt"))
            )
            return [(p, os.path.getsize(p), int(os.path.getmtime(p))) for p in paths]
        return value if isinstance(value, (int, float, bool, type(None))) else str(value)

    return hashlib.sha256(json.dumps(expand(dict(settings or {})), sort_keys=True).encode()).hexdigest()[:16]


_SIMPLE = (bool, int, float, str, type(None))
_NOT_SETTINGS = {"output_dir"}  # attributes of components that do not change what is written


def _component_settings(obj, depth: int = 0):
    """The settings of a pipeline component as plain values, the same in every process for the same config: the
    public attributes of MONAI's and this bundle's transforms, inferers and writers (nested ones too), plain values
    as they are, functions and other objects by their type name."""
    if isinstance(obj, enum.Enum):
        return str(obj.value)
    if isinstance(obj, _SIMPLE):
        return obj if not isinstance(obj, str) or " at 0x" not in obj else "<object>"
    if isinstance(obj, (list, tuple)):
        return [_component_settings(v, depth) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(str(_component_settings(v, depth)) for v in obj)
    if isinstance(obj, Mapping):
        return {str(k): _component_settings(v, depth) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', type(obj).__name__)}"
    if isinstance(obj, type):
        return f"{obj.__module__}.{obj.__qualname__}"
    if isinstance(obj, (torch.dtype, np.dtype, torch.device)):
        return str(obj)
    ours = kind.startswith(("monai.", "custom.")) and not isinstance(obj, torch.nn.Module)
    if not ours or depth > 4 or not hasattr(obj, "__dict__"):
        text = repr(obj)
        return text if " at 0x" not in text and len(text) < 200 else kind
    state = {
        name: _component_settings(value, depth + 1)
        for name, value in sorted(vars(obj).items())
        if not name.startswith("_") and name not in _NOT_SETTINGS
    }
    return {"type": kind, **state}


def _file_state(path: str) -> list:
    """Name, size and modification time (ns) of a file: a replaced or retrained file of the same name counts as new."""
    stat = os.stat(path)
    return [os.path.basename(path), stat.st_size, stat.st_mtime_ns]


def _network_settings(network) -> object:
    """The checkpoints an ensemble actually loaded (each file's size and time) and its plan of flips, or the type of
    any other network."""
    if getattr(network, "loaded", False) and getattr(network, "paths", None):
        return {
            "members": [_file_state(p) for p in network.paths],
            "flips": _component_settings(getattr(network, "member_flips", [])),
            "passes": int(getattr(network, "n_passes", 0)),
        }
    return f"{type(network).__module__}.{type(network).__qualname__}"


def _run_fingerprint(
    settings: Mapping | None,
    preprocessing=None,
    network=None,
    inferer=None,
    postprocessing=None,
    writer=None,
    amp: bool = False,
    device: torch.device | None = None,
) -> str:
    """Hash of everything of a run that shapes an output or the set of files written: ``settings`` (the config's
    checkpoints, ensemble, flips, thresholds, label scheme, network_def; see ``_fingerprint``), the checkpoints the
    network loaded, and the settings of preprocessing (``crop_margin`` ...), inferer, postprocessing and writer
    (``save_probabilities`` ...), and bfloat16 autocast on CUDA."""
    parts = {
        "settings": _fingerprint(settings),
        "network": _network_settings(network),
        "pipeline": [_component_settings(part) for part in (preprocessing, inferer, postprocessing, writer)],
        "amp": bool(amp and device is not None and torch.device(device).type == "cuda"),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _case_fingerprint(run_fingerprint: str, item: Mapping) -> str | None:
    """Hash of the run's fingerprint and the case's input files (each one's size, modification time and a hash of
    its NIfTI header); None when a file cannot be read (the case is then redone, and fails with the reason)."""
    images = item.get("image") or []
    images = [images] if isinstance(images, (str, os.PathLike)) else list(images)
    try:
        inputs = [
            _file_state(str(p)) + [hashlib.sha256(nib.load(str(p)).header.binaryblock).hexdigest()[:16]] for p in images
        ]
    except Exception:  # noqa: BLE001 - a missing or unreadable input: never keep an output for it
        return None
    return hashlib.sha256(json.dumps([run_fingerprint, inputs]).encode()).hexdigest()[:16]


PROVENANCE_PREFIX = "brats_cascaded_unet settings "  # + 16 hex digits: 45 of the 80 bytes of the NIfTI descrip


def _probabilities_path(writer, case_id: str) -> str | None:
    """The probabilities file the writer writes for ``case_id``, or None when it writes none."""
    if not getattr(writer, "save_probabilities", False):
        return None
    return os.path.join(_output_dir(writer), f"{case_id}_probabilities.nii.gz")


def _kept_output(path: str, fingerprint: str | None, also: Sequence[str | None] = ()) -> bool:
    """True when ``path`` exists, reads whole, and was written with the settings of ``fingerprint`` (recorded in
    its NIfTI header's ``descrip`` by the writer: the output carries its own provenance, atomically), and every
    file of ``also`` (the case's other outputs) exists."""
    if not fingerprint or not os.path.isfile(path) or not all(os.path.isfile(p) for p in also if p):
        return False
    try:
        image = nib.load(path)
        if image.header["descrip"].tobytes().rstrip(b"\0").decode(errors="replace") != PROVENANCE_PREFIX + fingerprint:
            return False
        np.asanyarray(image.dataobj)
        return True
    except Exception:  # noqa: BLE001 - unreadable: redo it
        return False


def _output_dir(writer) -> str:
    return str(getattr(writer, "output_dir", "") or "")


class _VolumesTable:
    """``volumes.csv``: one row per case, merged with the rows of earlier runs, rewritten atomically. A file that is
    not such a table (no ``case_id`` column, not text) is moved to ``volumes.csv.bak`` (``.bak.2`` ... when that
    exists) with one warning, and a new table is started."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.rows: dict[str, dict] = {}
        if path and os.path.isfile(path):
            try:
                with open(path, newline="") as f:
                    reader = csv.DictReader(f)
                    problem = None if "case_id" in (reader.fieldnames or []) else "has no case_id column"
                    if problem is None:
                        self.rows = {row["case_id"]: row for row in reader if row.get("case_id")}
            except (UnicodeDecodeError, csv.Error) as e:
                problem = f"cannot be read as a table ({type(e).__name__}: {e})"
            if problem:
                self.rows = {}
                backup = f"{path}.bak"
                number = 1
                while os.path.exists(backup):
                    number += 1
                    backup = f"{path}.bak.{number}"
                os.replace(path, backup)
                logger.warning(
                    f"{path} {problem}, so it is not a volumes table of this bundle: moved it to {backup} and "
                    "started a new one"
                )

    def update(self, results: Sequence[CaseResult]) -> None:
        if not self.path:
            return
        for r in results:
            if r.volumes is not None:
                self.rows[r.case_id] = {"case_id": r.case_id, **r.volumes, "qc": "; ".join(r.flags) or "ok"}
        if not self.rows:
            return
        columns = ["case_id"]
        for row in self.rows.values():
            columns += [k for k in row if k not in columns and k != "qc"]
        columns.append("qc")
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, restval="")
            writer.writeheader()
            for case_id in sorted(self.rows):
                writer.writerow(self.rows[case_id])


def _segment_one(
    item: Mapping,
    case_id: str,
    preprocessing,
    network,
    inferer,
    postprocessing,
    writer,
    device,
    amp,
    quality_check,
    volume_labels: Mapping[str, int | None],
    fingerprint: str | None,
) -> CaseResult:
    if item.get("error"):
        raise ValueError(item["error"])
    problems = check_headers(case_id, item["image"])
    if problems:
        raise ValueError("; ".join(f"{p.file}: {p.problem}" for p in problems))
    try:
        sample = preprocessing({**item, "source": item["image"]})
    except Exception as e:  # the loader's error may name no file (a truncated .nii.gz): name the one at fault
        unreadable = locate_read_error(case_id, item["image"])
        if unreadable:
            raise ValueError("; ".join(f"{p.file}: {p.problem}" for p in unreadable)) from e
        raise
    warnings = [w for w in str(sample.get("input_warnings", "")).splitlines() if w]
    image = sample["image"].unsqueeze(0).to(device)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if amp and device.type == "cuda" else contextlib.nullcontext()
    )
    with torch.inference_mode(), autocast:
        probabilities = inferer(image, network)[0].float().cpu()
    sample["pred"] = MetaTensor(probabilities, meta=sample["image"].meta)
    brain = _brain_mask(sample, preprocessing) if quality_check is not None else None
    sample = postprocessing(sample)
    provenance = PROVENANCE_PREFIX + fingerprint if fingerprint else None
    path = writer({**sample, "case_id": case_id, "provenance": provenance})
    labels = np.asarray(sample["pred"]).reshape(np.asarray(sample["pred"]).shape[-3:])
    brain_voxels = int(sample.get("brain_voxels", 0))
    if brain is not None and brain.size != labels.size:
        brain = None  # a pipeline whose inverse does not give the input's grid: count every tumor voxel
    flags = warnings + (quality_check(labels, brain_voxels, brain) if quality_check is not None else [])
    spacing = nib.load(_first(item["image"])).header.get_zooms()[:3]
    volumes = label_volumes(labels, spacing, **volume_labels)
    volumes["brain_ml"] = round(brain_voxels * float(np.prod(spacing)) / 1000.0, 4)
    return CaseResult(case_id, "written", path, flags, volumes)


def _brain_mask(sample: Mapping, preprocessing) -> np.ndarray | None:
    """The brain (non-zero in any sequence) of a preprocessed case, on the input's grid: the ``brain_mask`` of the
    sample when preprocessing made one, else the mask of the preprocessed image mapped back through the inverse of
    ``preprocessing``, as the postprocessing maps the prediction back (normalisation keeps the zeros outside the
    brain, ``nonzero``); None when the inverse is not possible."""
    from monai.transforms import Invertd

    given = sample.get("brain_mask")  # custom.data.transforms.BrainMaskd's, on the input's grid already
    if given is not None:
        given = np.asarray(given)
        return given.reshape(given.shape[-3:]) > 0
    image = sample["image"]
    try:
        mask = MetaTensor((image != 0).any(0, keepdim=True).float(), meta=image.meta)
        mask.applied_operations = list(image.applied_operations)
        inverted = Invertd("brain", preprocessing, orig_keys="image", nearest_interp=True)(
            {"brain": mask, "image": image}
        )["brain"]
        return np.asarray(inverted).reshape(np.asarray(inverted).shape[-3:]) > 0.5
    except Exception:  # noqa: BLE001 - the quality check then counts every tumor voxel
        return None


def _lock_for_run(output_dir: str) -> bool:
    """Takes the lock of ``output_dir`` for this run on rank 0 and returns whether this call took it (False when it
    was held already, e.g. by evaluate.json, or on other ranks). Under torchrun every rank learns rank 0's outcome,
    so when the folder is locked or not writable every rank ends with the same message instead of waiting."""
    if not output_dir:
        return False
    rank, world_size = rank_and_world_size()
    held = is_locked_here(output_dir)
    problem: DataError | None = None
    if rank == 0 and not held:
        try:
            lock_output_dir(output_dir, rank=0)
        except DataError as e:
            problem = e
    if world_size > 1:
        outcomes: list = [None] * world_size
        torch.distributed.all_gather_object(outcomes, str(problem) if problem else None)
        if rank != 0 and outcomes[0]:
            raise DataError(outcomes[0])
    if problem is not None:
        raise problem
    return rank == 0 and not held


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
    overwrite: bool = False,
    quality_check: QualityCheck | None = None,
    settings: Mapping | None = None,
    et_label: int = 4,
    rc_label: int | None = None,
    volumes_csv: str | None = "",
    label_scheme: str | LabelScheme | None = None,
) -> SegmentationSummary:
    """Segments every case of ``data`` and writes it (see the module docstring); returns the summary.

    ``settings`` (checkpoints, tta, thresholds, ...) decide whether an existing output may be kept: outputs are
    skipped only when they were written with the same settings and ``overwrite`` is false. ``volumes_csv``: ""
    writes ``<writer.output_dir>/volumes.csv``, None writes none. With ``raise_on_failure`` (inference) a failed
    case ends the run with a non-zero exit after all the others are written; without it (evaluation) failures
    are only reported, and evaluation then reports the cases it finds no prediction for. ``label_scheme`` (else
    ``et_label`` and ``rc_label`` with the BraTS core 1 and edema 2) gives the label values ``volumes.csv`` counts.
    """
    volume_labels = (
        get_scheme(label_scheme).volume_labels
        if label_scheme is not None
        else {"et_label": et_label, "rc_label": rc_label, "core_label": 1, "edema_label": 2}
    )
    if not data:
        raise DataError("no cases to segment: --dataset_dir is missing, empty or holds no BraTS case.")
    output_dir = _output_dir(writer)
    took_lock = _lock_for_run(output_dir)
    try:
        return _segment_cases(
            data, preprocessing, network, inferer, postprocessing, writer, torch.device(device), amp, progress,
            raise_on_failure, overwrite, quality_check, settings, volume_labels, volumes_csv, output_dir,
        )  # fmt: skip
    finally:
        if took_lock:
            release_output_dir(output_dir)


def _segment_cases(
    data, preprocessing, network, inferer, postprocessing, writer, device, amp, progress, raise_on_failure,
    overwrite, quality_check, settings, volume_labels, volumes_csv, output_dir,
) -> SegmentationSummary:  # fmt: skip
    from tqdm import tqdm

    rank, world_size = rank_and_world_size()
    if hasattr(network, "load"):  # an ensemble not loaded yet: its checkpoints are part of the fingerprint
        network.load()
    run_fingerprint = _run_fingerprint(settings, preprocessing, network, inferer, postprocessing, writer, amp, device)
    if volumes_csv == "":
        volumes_csv = os.path.join(output_dir, VOLUMES_CSV) if output_dir else None

    indices = list(range(len(data)))
    if world_size > 1:
        indices = split_by_size([_voxels(item) for item in data], world_size)[rank]
    results: list[CaseResult] = []
    table = _VolumesTable(volumes_csv if world_size == 1 else None)
    try:
        for i in tqdm(indices, desc="segmenting", unit="case", disable=not progress or rank != 0):
            item = data[i]
            case_id = str(item.get("case_id") or case_id_from_path(_first(item["image"])))
            existing = os.path.join(output_dir, f"{case_id}.nii.gz") if output_dir else ""
            fingerprint = _case_fingerprint(run_fingerprint, item)
            also = [_probabilities_path(writer, case_id)]
            if not overwrite and existing and _kept_output(existing, fingerprint, also):
                results.append(CaseResult(case_id, "skipped", existing))
                continue
            try:
                results.append(
                    _segment_one(
                        item,
                        case_id,
                        preprocessing,
                        network,
                        inferer,
                        postprocessing,
                        writer,
                        device,
                        amp,
                        quality_check,
                        volume_labels,
                        fingerprint,
                    )
                )
            except Exception as e:  # one bad case must not stop the others
                results.append(CaseResult(case_id, "failed", _describe(e)))
                logger.error(f"{case_id}: {results[-1].detail}")
            table.update(results[-1:])
            if results[-1].flags:
                logger.warning(f"{case_id}: " + "; ".join(results[-1].flags))
    except BaseException as e:  # noqa: BLE001 - whatever happens here, this rank must still reach the gather
        done = {r.case_id for r in results}
        for i in indices:
            case_id = str(data[i].get("case_id") or case_id_from_path(_first(data[i]["image"])))
            if case_id not in done:
                results.append(CaseResult(case_id, "failed", f"rank {rank} stopped: {_describe(e)}"))
        if world_size == 1:
            raise
    if world_size > 1:
        mine = ", ".join(r.case_id for r in results)
        print(f"rank {rank}/{world_size}: {len(results)} case(s): {mine}", flush=True)
        gathered: list = [None] * world_size
        torch.distributed.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
        if rank == 0:
            _VolumesTable(volumes_csv).update(results)
    summary = SegmentationSummary(sorted(results, key=lambda r: r.case_id))
    if rank == 0:
        print(summary.text(), flush=True)
    if summary.failed and raise_on_failure:
        raise DataError(
            f"{len(summary.failed)} of {len(results)} case(s) failed (the others were written):\n  "
            + "\n  ".join(f"{r.case_id}: {r.detail}" for r in summary.failed)
        )
    return summary


@dataclass
class Segmenter:
    """The inference pipeline as one component, inference.json's ``evaluator`` (MONAI's name for the inference engine
    of a bundle): the cases, the ensemble network, preprocessing, flip-TTA inferer, postprocessing, writer, quality
    check and the settings fingerprint of its outputs; ``run()`` loads the weights and segments the cases
    (``segment_cases``). evaluate.json builds the same component from inference.json (``load_segmenter``), so there
    is one definition of the pipeline."""

    data: Sequence[dict]
    network: torch.nn.Module
    preprocessing: Callable
    inferer: Callable
    postprocessing: Callable
    writer: Callable[[Mapping], str]
    labels: LabelScheme | str = "brats2018"
    device: str | torch.device = "cpu"
    amp: bool = False
    quality_check: QualityCheck | None = None
    settings: Mapping | None = None
    overwrite: bool = False
    raise_on_failure: bool = True

    @property
    def output_dir(self) -> str:
        return _output_dir(self.writer)

    def run(self) -> SegmentationSummary:
        """Takes the output folder's lock (before any weight is read), loads the weights, segments the cases."""
        took_lock = _lock_for_run(self.output_dir) if self.data else False  # no cases: segment_cases says so
        try:
            if hasattr(self.network, "load"):  # the ensemble's weights load when the run starts, not at parsing
                self.network.load()
            scheme = get_scheme(self.labels)
            return segment_cases(
                self.data, self.preprocessing, self.network, self.inferer, self.postprocessing, self.writer,
                self.device, amp=self.amp, raise_on_failure=self.raise_on_failure, overwrite=self.overwrite,
                quality_check=self.quality_check, settings=self.settings, label_scheme=scheme,
            )  # fmt: skip
        finally:
            if took_lock:
                release_output_dir(self.output_dir)


def load_segmenter(config_file: str, overrides: Mapping) -> Segmenter:
    """The ``evaluator`` (a ``Segmenter``) of ``config_file`` (inference.json) with ``overrides`` (already resolved values: keys of
    inference.json such as ``output_dir``, ``checkpoints``, ``tta``, ``label_scheme``, ``network_def``)."""
    parser = ConfigParser()
    parser.read_config(str(config_file))
    for key, value in overrides.items():
        parser[key] = value
    return parser.get_parsed_content("evaluator", instantiate=True)
