"""Inputs as users have them: the channel-order plausibility check (custom/data/plausibility.py) on the real case's 24
orders and on synthetic cases, scans that were not prepared (not skull-stripped, not co-registered), and inputs that
used to vanish from every list or crash the loader (custom/data/discovery.py, custom/data/validation.py).

The real-case tests need ``BRATS_TEST_CASE`` (see tests/conftest.py; e.g.
``BRATS_TEST_CASE=/path/to/BraTS-GLI-00001-000 python -m pytest -q tests/test_plausibility.py``) and skip without it."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from custom.core.errors import DataError, DatasetNotFound
from custom.core.naming import SEQUENCE_NAMES, SEQUENCES
from custom.data.datalist import load_datalist, make_datalist
from custom.data.discovery import discover_cases
from custom.data.plausibility import check_channel_order
from custom.data.synthetic import synthesize, synthesize_case
from custom.data.transforms import EnsureSequenceChannelsd
from custom.data.validation import CheckSequencesd, check_datalist, check_headers, inspect_case, locate_read_error
from monai.transforms import LoadImaged

ORDERS = list(itertools.permutations(range(4)))


def _synthetic(seed: int, shape=48) -> list[np.ndarray]:
    images, _ = synthesize_case(np.random.default_rng(seed), (shape,) * 3)
    return [images[s] for s in SEQUENCES]


@pytest.fixture(scope="module")
def real_volumes(real_case) -> list[np.ndarray]:
    return [np.asanyarray(nib.load(str(p)).dataobj) for p in real_case.images]


# ---- channel order ------------------------------------------------------------------------------------------------


def test_real_case_all_24_orders(real_volumes):
    flagged = {}
    for order in ORDERS:
        verdict = check_channel_order([real_volumes[i] for i in order])
        assert verdict is not None
        flagged[order] = not verdict.plausible
        # the likely order names, for each slot, the sequence it really holds
        assert verdict.likely == tuple(SEQUENCE_NAMES[i] for i in order), (order, verdict.details)
    assert not flagged[(0, 1, 2, 3)]
    assert sum(flagged.values()) == 23


@pytest.mark.parametrize("seed", range(12))
def test_no_false_alarm_on_synthetic_cases(seed):
    verdict = check_channel_order(_synthetic(seed))
    assert verdict is not None and verdict.plausible, verdict.details


def test_synthetic_swaps_are_flagged_where_decided():
    """On synthetic cases with enhancement every wrong order is flagged; without it only T1 <-> T1c stays
    undecided (and unflagged), never a false alarm."""
    for seed in (0, 2, 4):  # cases with enhancing tumour
        volumes = _synthetic(seed)
        wrong = [o for o in ORDERS if o != (0, 1, 2, 3)]
        assert all(not check_channel_order([volumes[i] for i in o]).plausible for o in wrong), seed
    t2_first = check_channel_order([_synthetic(0)[i] for i in (2, 1, 0, 3)])
    assert not t2_first.plausible and t2_first.likely == ("T2", "T1c", "T1", "FLAIR")
    assert "T2, T1c, T1, FLAIR instead of T1, T1c, T2, FLAIR" in t2_first.message


def test_order_check_in_the_preflight(tmp_path):
    ids = synthesize(tmp_path / "data", 3, shape=40, seed=5, naming="2021")
    datalist = make_datalist(str(tmp_path / "data"), folds=3)
    entries = datalist["training"]
    problems = [p for e in entries for p in inspect_case(e).problems]
    assert problems == []  # right order: no warning
    swapped = [{**e, "image": [e["image"][i] for i in (0, 1, 3, 2)]} for e in entries]  # T2 <-> FLAIR
    reports = [inspect_case(e) for e in swapped]
    for case_id, report in zip(ids, reports):
        (p,) = report.problems
        assert (p.kind, p.severity, p.case_id) == ("channel_order", "warning", case_id)
        assert "T1, T1c, FLAIR, T2 instead of" in p.problem
    assert len(check_datalist(swapped, 4)) == 3  # a warning: the cases are used
    with pytest.raises(DataError, match="channel"):
        check_datalist(swapped, 4, strict=True)
    with pytest.raises(DataError, match="no usable case left"):  # strict + skip_invalid: all three are skipped
        check_datalist(swapped, 4, strict=True, skip_invalid=True)


def test_order_check_in_inference_transform():
    volumes = _synthetic(0, 40)
    image = np.stack([volumes[i] for i in (2, 1, 0, 3)])  # T2 first
    out = CheckSequencesd("image")({"image": image, "case_id": "c"})
    assert "look like T2, " in out["input_warnings"] and "instead of T1, T1c, T2, FLAIR" in out["input_warnings"]
    with pytest.raises(ValueError, match="instead of T1, T1c, T2, FLAIR"):
        CheckSequencesd("image", strict=True)({"image": image, "case_id": "c"})
    assert CheckSequencesd("image")({"image": np.stack(volumes), "case_id": "c"})["input_warnings"] == ""
    # a decathlon channel_index is applied before the check (FLAIR, T1, T1c, T2 in the file)
    msd = np.stack([volumes[i] for i in (3, 0, 1, 2)])
    out = CheckSequencesd("image")({"image": msd, "channel_index": [1, 2, 3, 0]})
    assert out["input_warnings"] == "" and np.array_equal(np.asarray(out["image"]), np.stack(volumes))


# ---- unprepared scans -----------------------------------------------------------------------------------------


def _case_files(folder: Path, volumes, affines=None) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (name, v) in enumerate(zip(SEQUENCES, volumes)):
        p = folder / f"c_{name}.nii.gz"
        nib.Nifti1Image(np.asarray(v, np.float32), np.eye(4) if affines is None else affines[i]).to_filename(str(p))
        paths.append(str(p))
    return {"case_id": "c", "image": paths}


def test_not_skull_stripped_is_an_error(tmp_path):
    volumes = _synthetic(1, 40)
    rng = np.random.default_rng(0)
    noisy = [np.where(v > 0, v, rng.uniform(1, 20, v.shape)) for v in volumes]  # background of low noise
    report = inspect_case(_case_files(tmp_path, noisy))
    (p,) = report.errors
    assert p.kind == "unprepared" and "not skull-stripped" in p.problem and "brainles-preprocessing" in p.fix
    with pytest.raises(ValueError, match="not skull-stripped"):
        CheckSequencesd("image")({"image": np.stack(noisy)})
    assert inspect_case(_case_files(tmp_path / "ok", volumes)).problems == []


def test_unregistered_sequences_are_an_error(tmp_path):
    volumes = _synthetic(1, 40)
    moved = list(volumes)
    moved[3] = np.roll(volumes[3], 6, axis=0)  # FLAIR shifted by 6 voxels: masks disagree
    report = inspect_case(_case_files(tmp_path, moved))
    (p,) = report.errors
    assert p.kind == "unprepared" and "not co-registered" in p.problem and "FLAIR" in p.problem
    assert "co-register" in p.fix
    with pytest.raises(DataError, match="not co-registered"):
        check_datalist([_case_files(tmp_path, moved)], 4, require_et=False)
    good = _case_files(tmp_path / "good", volumes)
    assert check_datalist([_case_files(tmp_path, moved), good], 4, require_et=False, skip_invalid=True) == [good]


# ---- inputs that vanished or crashed ---------------------------------------------------------------------------


def _save(path: Path, data, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.Nifti1Image(np.asarray(data, np.float32), np.eye(4) if affine is None else affine).to_filename(str(path))


def test_every_case_found_ends_up_in_one_list(tmp_path):
    vol = np.stack(_synthetic(2, 32), -1)
    _save(tmp_path / "imagesTr" / "good.nii.gz", vol)
    _save(tmp_path / "imagesTr" / "three.nii.gz", vol[..., :3])  # 3 channels
    _save(tmp_path / "imagesTr" / "vector.nii.gz", vol[:, :, :, None, :])  # (X, Y, Z, 1, 4): NIfTI's vector layout
    case = tmp_path / "BraTS2021_00001"
    for name, suffix in zip(SEQUENCES, ("t1", "t1ce", "t2", "flair")):
        _save(case / f"BraTS2021_00001_{suffix}.nii.gz", vol[..., SEQUENCES.index(name)])
    _save(case / "BraTS2021_00001_t1gd.nii.gz", vol[..., 1])  # a second T1c
    (tmp_path / "imagesTr" / "broken.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(DataError) as error:
        discover_cases(str(tmp_path))
    assert {p.case_id for p in error.value.problems} == {"three", "BraTS2021_00001", "broken"}
    incomplete, where = {}, {}
    cases = discover_cases(str(tmp_path), allow_incomplete=True, incomplete_cases=incomplete, incomplete_files=where)
    assert [c.case_id for c in cases] == ["good", "vector"]
    assert "(32, 32, 32, 3)" in incomplete["three"] and where["three"].endswith("three.nii.gz")
    assert "t1c is both" in incomplete["BraTS2021_00001"] and "t1gd" in incomplete["BraTS2021_00001"]
    assert "not a readable NIfTI" in incomplete["broken"] and where["broken"].endswith("broken.nii.gz")
    # the datalist keeps them for the pre-flight, which reports each with its file
    datalist = make_datalist(str(tmp_path), folds=2, allow_incomplete=True)
    reported = {e["case_id"]: e for e in datalist["incomplete"]}
    assert set(reported) == {"three", "BraTS2021_00001", "broken"}
    assert reported["three"]["folder"].endswith("three.nii.gz")
    # the (X, Y, Z, 1, 4) file passes the pre-flight and loads
    vector = next(c for c in cases if c.case_id == "vector")
    assert inspect_case({"case_id": "vector", "image": vector.images}).errors == []
    loaded = EnsureSequenceChannelsd("image")(LoadImaged("image", image_only=True)({"image": vector.images}))
    assert tuple(loaded["image"].shape) == (4, 32, 32, 32)


def test_mixed_singleton_axis_fails_the_preflight_not_the_loader(tmp_path):
    volumes = _synthetic(3, 32)
    entry = _case_files(tmp_path, volumes)
    _save(Path(entry["image"][2]), volumes[2][..., None])  # T2 as (X, Y, Z, 1), the others 3-D
    with pytest.raises(ValueError):  # what the loader does with it
        LoadImaged("image", image_only=True)({"image": entry["image"]})
    for problems in (inspect_case(entry).errors, check_headers("c", entry["image"])):
        (p,) = problems
        assert p.file == entry["image"][2] and "(X, Y, Z, 1)" in p.problem and "3-D" in p.fix


@pytest.mark.parametrize("element", [(0, 1), (0, 3)])
def test_affine_tolerance_is_the_loaders(tmp_path, element):
    volumes = _synthetic(3, 32)
    affine = np.eye(4)
    affine[element] = 0.0009
    entry = _case_files(tmp_path, volumes, [np.eye(4)] * 3 + [affine])
    with pytest.raises(RuntimeError, match="affine matrix of all images should be the same"):
        LoadImaged("image", image_only=True)({"image": entry["image"]})  # MONAI refuses it ...
    for problems in (inspect_case(entry).errors, check_headers("c", entry["image"])):  # ... and so do we
        (p,) = problems
        assert p.file == entry["image"][3] and "affine differs" in p.problem and "0.0009" in p.problem
    rounding = np.eye(4)
    rounding[0, 0] = 1 + 5e-6  # float rounding the loader accepts
    entry = _case_files(tmp_path / "ok", volumes, [np.eye(4)] * 3 + [rounding])
    LoadImaged("image", image_only=True)({"image": entry["image"]})
    assert inspect_case(entry).problems == [] and check_headers("c", entry["image"]) == []


def test_truncated_file_is_named(tmp_path):
    volumes = _synthetic(3, 32)
    entry = _case_files(tmp_path, volumes)
    data = Path(entry["image"][1]).read_bytes()
    Path(entry["image"][1]).write_bytes(data[: len(data) // 2])
    assert nib.load(entry["image"][1]).shape == (32, 32, 32)  # the header still reads: only the voxel data is cut
    (p,) = locate_read_error("c", entry["image"])
    assert p.file == entry["image"][1] and "truncated" in p.fix
    (p,) = inspect_case(entry).errors
    assert p.file == entry["image"][1]


def test_nothing_recognisable_is_one_clean_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFound, match="no .nii.gz/.nii file.*dcm2niix"):
        discover_cases(str(tmp_path / "empty"))
    (tmp_path / "dicom" / "series").mkdir(parents=True)
    (tmp_path / "dicom" / "series" / "IM0001.dcm").write_bytes(b"\0" * 132 + b"DICM")
    with pytest.raises(DatasetNotFound, match="dcm2niix"):
        discover_cases(str(tmp_path / "dicom"))
    _save(tmp_path / "clinical" / "patient1" / "T1_MPRAGE.nii.gz", np.ones((8, 8, 8)))
    _save(tmp_path / "clinical" / "patient1" / "FLAIR_axial.nii.gz", np.ones((8, 8, 8)))
    with pytest.raises(DatasetNotFound, match="2 NIfTI file.*match no supported naming"):
        discover_cases(str(tmp_path / "clinical"))
    _save(tmp_path / "bad" / "x.nii.gz", np.ones((8, 8, 8, 3)))  # only an unusable study
    with pytest.raises(DataError, match="incomplete or unusable"):
        discover_cases(str(tmp_path / "bad"))
    assert discover_cases(str(tmp_path / "bad"), allow_incomplete=True, incomplete_cases={}) == []
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"testing": [{"case_id": "../escape", "image": str(tmp_path / "x.nii.gz")}]}))
    with pytest.raises(DataError, match=r"invalid case_id.*\.\./escape") as error:
        load_datalist(str(datalist))
    assert "\n" not in str(error.value)
