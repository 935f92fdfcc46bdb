"""MONAI (decathlon-style) datalists of BraTS cases: made from a folder (``custom.data.discovery``) or read from a
JSON, with stratified cross-validation folds; the training/validation/testing entries of a fold.

Cases with a segmentation go to ``"training"`` with a fold number, cases without one to ``"testing"``.

Medical Segmentation Decathlon JSONs (Task01_BrainTumour's ``dataset.json``) are read as they are: ``"test"`` (a list
of paths) is the testing list, the ``"modality"`` map gives each 4-channel entry its ``channel_index`` (the channel
holding T1, T1c, T2, FLAIR; ``custom.core.naming.OrderSequencesd`` applies it after loading) and the ``"labels"``
map the label scheme (``msd``), unless the JSON sets ``"label_scheme"`` itself.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from custom.core.errors import DataError, DatasetNotFound, format_problems
from custom.core.io import atomic_path, check_case_ids
from custom.core.labels import ET_LABELS, get_scheme, resolve_label_scheme, scheme_from_label_names
from custom.core.naming import (
    CHANNEL_INDEX_KEY,
    SEQUENCES,
    case_id_from_path,
    channel_index_from_modality,
    nifti_stem,
    parse_stem,
    sequence_name,
)
from custom.data.discovery import discover_cases
from custom.data.validation import preflight

__all__ = [
    "make_datalist",
    "write_datalist",
    "load_datalist",
    "training_files",
    "validation_files",
    "testing_files",
    "resolve_et_label",
    "implied_et_label",
    "require_dataset",
]

logger = logging.getLogger(__name__)


def _check_et_label(et_label: Any) -> int:
    try:
        value = int(et_label)
    except (TypeError, ValueError):
        value = None
    if value not in ET_LABELS or isinstance(et_label, bool):
        raise DataError(f"et_label must be 4 (BraTS 2018-2021 labels) or 3 (BraTS 2023+ labels), got {et_label!r}")
    return value


def _assign_folds(entries: list[dict], folds: int, seed: int) -> None:
    """Write ``"fold"`` into ``entries``: balanced sizes, stratified by ``"group"``, deterministic for ``seed``.

    Cases of each group (sorted group order) are shuffled and dealt round-robin with one counter running over all
    groups, so the folds differ in size by at most one overall and within every group.
    """
    rng = np.random.default_rng(seed)
    by_group: dict[str, list[dict]] = {}
    for entry in entries:
        by_group.setdefault(str(entry.get("group") or ""), []).append(entry)
    counter = 0
    for group in sorted(by_group):
        members = sorted(by_group[group], key=lambda e: str(e.get("case_id", "")))
        for index in rng.permutation(len(members)):
            members[int(index)]["fold"] = counter % folds
            counter += 1


def _check_folds(folds: Any) -> int:
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise DataError(f"folds must be an integer >= 2, got {folds!r}")
    return int(folds)


def make_datalist(
    dataset_dir: str, folds: int = 5, seed: int = 0, et_label: int | None = None, allow_incomplete: bool = False
) -> dict:
    """Datalist (MONAI decathlon style) of the cases under ``dataset_dir`` with ``folds`` cross-validation folds.

    ``et_label`` overrides the value the file naming implies (4 for 2018-2021 naming, 3 for 2023+ naming).
    Paths are absolute.
    """
    folds = _check_folds(folds)
    incomplete: dict[str, str] = {}
    where: dict[str, str] = {}
    cases = discover_cases(
        dataset_dir, allow_incomplete=allow_incomplete, incomplete_cases=incomplete, incomplete_files=where
    )
    schemes = sorted({c.label_scheme for c in cases if c.label_scheme})
    if len(schemes) > 1:
        raise DataError(f"{dataset_dir} holds cases of label schemes {', '.join(schemes)}; keep one per dataset")
    if et_label is None:
        implied = sorted({c.et_label for c in cases}) or [4]
        if len(implied) > 1:
            raise DataError(
                f"{dataset_dir} mixes BraTS 2018-2021 file naming (ET label 4) and BraTS 2023+ naming (ET label 3); "
                "set et_label explicitly or keep one naming per dataset"
            )
        et_label = implied[0]
    et_label = _check_et_label(et_label)

    training: list[dict] = []
    testing: list[dict] = []
    for case in cases:
        entry: dict[str, Any] = {"case_id": case.case_id, "image": list(case.images)}
        if case.channel_index is not None:
            entry[CHANNEL_INDEX_KEY] = list(case.channel_index)
        if case.label is None:
            testing.append(entry)
            continue
        entry["label"] = case.label
        if case.group is not None:
            entry["group"] = case.group
        training.append(entry)
    _assign_folds(training, folds, seed)
    if 0 < len(training) < folds:
        logger.warning("only %d labeled case(s) for %d folds: some validation folds are empty", len(training), folds)
    datalist = {
        "name": Path(dataset_dir).expanduser().resolve().name,
        "et_label": et_label,
        "channel_order": list(SEQUENCES),
        "numFolds": folds,
        "seed": int(seed),
        "training": training,
        "testing": testing,
        # cases discovery found incomplete or unusable (allow_incomplete): the pre-flight reports them with the others
        "incomplete": [
            {
                "case_id": case_id,
                "error": problem,
                "folder": where.get(case_id, "-"),
                "fix": "complete the case (4 sequences, each once, readable), or remove it",
            }
            for case_id, problem in sorted(incomplete.items())
        ],
    }
    if schemes:  # declared by a decathlon dataset.json (msd)
        try:
            datalist["label_scheme"] = get_scheme(schemes[0], et_label=et_label).name
        except ValueError as e:
            raise DataError(f"{dataset_dir}: {e}") from e
    return datalist


def _relative_to(path: str, base: Path) -> str:
    return os.path.relpath(path, base)


def write_datalist(
    dataset_dir: str,
    output: str,
    folds: int = 5,
    seed: int = 0,
    et_label: int | None = None,
    allow_incomplete: bool = False,
    relative: bool = False,
    check: bool = False,
    num_workers: int = 0,
) -> str:
    """Discover ``dataset_dir``, write its datalist to ``output`` atomically and return the path written.

    With ``relative=True`` the paths are written relative to the JSON's folder (``load_datalist`` resolves them).
    Prints a one-line summary. ``check=True`` then runs training's pre-flight on every case (labelled, unlabelled and
    incomplete), in ``num_workers`` processes, prints its time and every problem, and exits non-zero on problems.
    """
    datalist = make_datalist(
        dataset_dir, folds=folds, seed=seed, et_label=et_label, allow_incomplete=allow_incomplete or check
    )
    out = Path(output).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    if relative:
        for entry in datalist["training"] + datalist["testing"]:
            entry["image"] = [_relative_to(p, out.parent) for p in entry["image"]]
            if "label" in entry:
                entry["label"] = _relative_to(entry["label"], out.parent)
    with atomic_path(out) as tmp, open(tmp, "w") as f:
        json.dump(datalist, f, indent=2)
        f.write("\n")
    sizes = [sum(e["fold"] == k for e in datalist["training"]) for k in range(datalist["numFolds"])]
    print(
        f"wrote {out}: {len(datalist['training'])} labeled cases in {datalist['numFolds']} folds "
        f"({'/'.join(map(str, sizes))}), {len(datalist['testing'])} unlabeled, et_label {datalist['et_label']}"
    )
    if check:
        _check_all(datalist, num_workers)
    return str(out)


def _check_all(datalist: dict, num_workers: int) -> None:
    """The pre-flight of every case of ``datalist``, timed; ``DataError`` listing the problems."""
    entries = datalist["training"] + datalist["testing"] + datalist.get("incomplete", [])
    scheme = resolve_label_scheme(datalist)
    start = time.perf_counter()
    reports = preflight(entries, int(num_workers or 0), et_label=scheme.et_label, label_scheme=scheme.name)
    seconds = time.perf_counter() - start
    problems = [p for r in sorted(reports, key=lambda r: r.case_id) for p in r.problems]
    n_files = sum(len(e.get("image", [])) + bool(e.get("label")) for e in entries)
    n_bad = sum(bool(r.errors) for r in reports)
    print(
        f"pre-flight: checked {len(entries)} cases ({n_files} files) in {seconds:.1f} s with "
        f"{max(1, int(num_workers or 0))} process(es): {len(problems)} problem(s) in {n_bad} case(s)"
    )
    if any(p.severity == "error" for p in problems):
        raise DataError(format_problems(problems), problems)
    if problems:
        print(format_problems(problems))


def _resolve(path: Any, base: Path, where: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise DataError(f"{where}: expected a file path, got {path!r}")
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _normalise_entry(item: Any, base: Path, where: str) -> dict:
    """Copy of one datalist entry with absolute paths; ``image`` always a list in ``SEQUENCES`` order."""
    if isinstance(item, (str, os.PathLike)):  # decathlon "testing": ["imagesTs/x.nii.gz", ...]
        item = {"image": item}
    if not isinstance(item, dict) or "image" not in item:
        raise DataError(f"{where}: each entry needs an 'image' (4 sequence paths or one 4-channel file), got {item!r}")
    entry = dict(item)
    image = entry["image"]
    if isinstance(image, dict):  # keyed by sequence name: {"t1": ..., "t1c": ..., "t2": ..., "flair": ...}
        keyed = {}
        for key, value in image.items():
            name = sequence_name(key)
            if name is None:
                raise DataError(f"{where}: unknown sequence name {key!r}; use {', '.join(SEQUENCES)}")
            keyed[name] = value
        missing = [s for s in SEQUENCES if s not in keyed]
        if missing:
            raise DataError(f"{where}: 'image' lacks {', '.join(missing)}; give all of {', '.join(SEQUENCES)}")
        image = [keyed[s] for s in SEQUENCES]
    elif not isinstance(image, (list, tuple)):
        image = [image]
    entry["image"] = [_resolve(p, base, where) for p in image]
    if entry.get("label") is not None:
        entry["label"] = _resolve(entry["label"], base, where)
    if not entry.get("case_id"):
        entry["case_id"] = case_id_from_path(entry["image"][0])
    return entry


def _apply_modality(raw: dict, entries: list[dict], path: Path) -> None:
    """A decathlon ``"modality"`` map: every 4-channel entry (one image file) without its own ``channel_index`` gets
    the map's (``custom.core.naming.channel_index_from_modality``); ``DataError`` naming the file when the map is not
    one of the four sequences."""
    if "modality" not in raw:
        return
    try:
        index = channel_index_from_modality(raw["modality"], f"datalist {path}")
    except ValueError as e:
        raise DataError(f"{e}; fix the map (the channel order of the 4-channel files)") from e
    if index == tuple(range(len(SEQUENCES))):
        return
    for entry in entries:
        if len(entry["image"]) == 1 and CHANNEL_INDEX_KEY not in entry:
            entry[CHANNEL_INDEX_KEY] = list(index)


def implied_et_label(entries: list[dict]) -> int:
    """3 when every image file uses the BraTS 2023+ dash naming, else 4."""
    stems = [nifti_stem(Path(p).name) or "" for e in entries for p in e["image"]]
    return 3 if stems and all((parse_stem(s) or (None, None, 4))[2] == 3 for s in stems) else 4


def require_dataset(source: str) -> str:
    """``source`` if it exists, else the error (``DataError``: a clean exit) that says what ``dataset_dir`` must be."""
    if not Path(str(source)).expanduser().exists():
        raise DataError(_missing_dataset(str(source)))
    return str(source)


def _missing_dataset(source: str) -> str:
    return f"dataset_dir {source!r} does not exist; set --dataset_dir to a folder of BraTS cases or a datalist JSON"


def load_datalist(
    source: str,
    folds: int = 5,
    seed: int = 0,
    et_label: int | None = None,
    allow_incomplete: bool = False,
    missing_ok: bool = False,
) -> dict:
    """Datalist from a dataset folder (discovered) or an existing datalist JSON.

    ``missing_ok``: a ``source`` that does not exist gives an empty datalist instead of an error, so that a config
    can be parsed and inspected (``check_properties``, MONAI Label) before a dataset is given; the workflow's run
    then calls ``require_dataset``.

    Relative paths in a JSON are resolved against the JSON's folder. Entries may give ``image`` as a list in
    ``SEQUENCES`` order, one 4-channel path, or a dict keyed by sequence name. Training entries without ``fold``
    get folds assigned with ``folds``/``seed``; ``et_label`` overrides the JSON's value (when the JSON has none: 3 for
    BraTS 2023+ file naming, else 4).
    """
    path = Path(str(source)).expanduser()
    if not path.exists() and missing_ok:
        return {
            "name": "empty",
            "et_label": et_label or 4,
            "channel_order": list(SEQUENCES),
            "numFolds": folds,
            "seed": seed,
            "training": [],
            "testing": [],
        }
    if not path.exists():
        raise DatasetNotFound(_missing_dataset(str(path)))
    if path.is_dir():
        return make_datalist(str(path), folds=folds, seed=seed, et_label=et_label, allow_incomplete=allow_incomplete)
    if path.suffix.lower() != ".json":
        raise DataError(
            f"dataset_dir {str(path)!r} is a file but not a datalist JSON; give the folder of BraTS cases or a .json "
            "datalist (write one with custom.data.datalist.write_datalist)"
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"datalist {path} is not valid JSON ({e}); fix it or write a new one") from e
    if isinstance(raw, dict) and "testing" not in raw and isinstance(raw.get("test"), list):
        raw = {**raw, "testing": raw["test"]}  # the Medical Segmentation Decathlon's name for it
    if (
        not isinstance(raw, dict)
        or not isinstance(raw.get("training", []), list)
        or not isinstance(raw.get("testing", []), list)
    ):
        raise DataError(f"datalist {path} must be a JSON object with 'training' and/or 'testing' (or 'test') lists")
    if not raw.get("training") and not raw.get("testing"):
        raise DataError(f"datalist {path} has no 'training' or 'testing' entries")

    base = path.resolve().parent
    datalist = dict(raw)
    datalist.pop("test", None)
    training = [_normalise_entry(e, base, f"{path} training[{i}]") for i, e in enumerate(raw.get("training", []))]
    testing = [_normalise_entry(e, base, f"{path} testing[{i}]") for i, e in enumerate(raw.get("testing", []))]
    _apply_modality(raw, training + testing, path)
    unlabeled = [e["case_id"] for e in training if e.get("label") is None]
    if unlabeled:
        raise DataError(
            f"datalist {path}: training entries without 'label': {', '.join(unlabeled)}; add labels or move them to "
            "'testing'"
        )
    if "numFolds" in raw:
        n_folds = _check_folds(raw["numFolds"])
    elif any("fold" in e for e in training):
        n_folds = max(int(e.get("fold", 0)) for e in training) + 1
    else:
        n_folds = _check_folds(folds)
    if training and not all("fold" in e for e in training):
        _assign_folds(training, n_folds, seed)
        datalist["seed"] = int(seed)
    for e in training:
        if not isinstance(e["fold"], (int, np.integer)) or isinstance(e["fold"], bool) or not 0 <= e["fold"] < n_folds:
            raise DataError(f"datalist {path}: case {e['case_id']} has fold {e['fold']!r}, expected 0..{n_folds - 1}")
    named = None if raw.get("label_scheme") else scheme_from_label_names(raw.get("labels"))
    if named is not None and named.name == "msd":  # the labels map names the decathlon's values
        datalist["label_scheme"] = named.name
    default_et = named.et_label if named is not None else implied_et_label(training + testing)
    datalist.update(
        {
            "et_label": _check_et_label(et_label if et_label is not None else raw.get("et_label", default_et)),
            "channel_order": raw.get("channel_order", list(SEQUENCES)),
            "numFolds": n_folds,
            "training": training,
            "testing": testing,
        }
    )
    if [str(c).lower() for c in datalist["channel_order"]] != list(SEQUENCES):
        raise DataError(
            f"datalist {path} declares channel_order {datalist['channel_order']}; this model expects "
            f"{list(SEQUENCES)} (T1, T1c, T2, FLAIR): re-order the 'image' lists"
        )
    datalist.setdefault("name", path.stem)
    try:  # ids name the output files
        check_case_ids({"training": training, "testing": testing}, f"datalist {path}")
    except DataError:
        raise
    except ValueError as e:  # a user's datalist: one clean line, not a traceback
        raise DataError(str(e)) from e
    return datalist


def _num_folds(datalist: dict) -> int:
    if "numFolds" in datalist:
        return int(datalist["numFolds"])
    return max((int(e.get("fold", 0)) for e in datalist.get("training", [])), default=0) + 1


def _check_fold(datalist: dict, fold: Any) -> int:
    n = _num_folds(datalist)
    if isinstance(fold, str) and fold.strip().isdigit():  # "--fold 0" passed through as text
        fold = int(fold)
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or not 0 <= fold < n:
        raise DataError(f"fold {fold!r} is out of range: this datalist has {n} folds, valid folds are 0..{n - 1}")
    return int(fold)


def _copy(entry: dict) -> dict:
    out = dict(entry)
    if isinstance(out.get("image"), list):
        out["image"] = list(out["image"])
    return out


def training_files(datalist: dict, fold: int) -> list[dict]:
    """Training entries of every fold except ``fold`` (copies)."""
    fold = _check_fold(datalist, fold)
    return [_copy(e) for e in datalist.get("training", []) if int(e["fold"]) != fold]


def validation_files(datalist: dict, fold: int) -> list[dict]:
    """Training entries of ``fold`` (copies); ``ValueError`` naming the valid range when ``fold`` is out of it."""
    fold = _check_fold(datalist, fold)
    return [_copy(e) for e in datalist.get("training", []) if int(e["fold"]) == fold]


def testing_files(datalist: dict) -> list[dict]:
    """Unlabeled entries (copies)."""
    return [_copy(e) for e in datalist.get("testing", [])]


def resolve_et_label(datalist: dict, et_label: int | None) -> int:
    """The ET label to use: an explicit ``et_label`` wins, else the datalist's (default 4)."""
    return _check_et_label(et_label if et_label is not None else datalist.get("et_label", 4))
