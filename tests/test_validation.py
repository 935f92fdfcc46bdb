"""Input validation (custom/data/validation.py): every kind of problem is caught, named by file, and reported together."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from custom.core.naming import SEQUENCES
from custom.data.validation import CaseProblem, check_datalist, format_problems, validate_entries

SHAPE = (12, 12, 10)


def save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> str:
    nib.Nifti1Image(data, np.eye(4) if affine is None else affine).to_filename(str(path))
    return str(path)


def brain(shape=SHAPE, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = np.zeros(shape, np.float32)
    data[2:-2, 2:-2, 2:-2] = rng.uniform(1, 100, size=tuple(s - 4 for s in shape))
    return data


def label_volume(values=(1, 2, 4), shape=SHAPE) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    for i, v in enumerate(values):
        lab[3 + i, 3:6, 3:6] = v
    return lab


def make_entry(folder: Path, case_id: str, label_values=(1, 2, 4)) -> dict:
    """A valid synthetic case; tests then break one thing at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    images = [save(folder / f"{case_id}_{s}.nii.gz", brain(seed=i)) for i, s in enumerate(SEQUENCES)]
    label = save(folder / f"{case_id}_seg.nii.gz", label_volume(label_values))
    return {"case_id": case_id, "image": images, "label": label}


def only(problems: list[CaseProblem], file: str) -> CaseProblem:
    assert len(problems) == 1, format_problems(problems)
    assert problems[0].file == file, format_problems(problems)
    return problems[0]


def test_valid_case_has_no_problem(tmp_path):
    entry = make_entry(tmp_path, "ok")
    assert validate_entries([entry], et_label=4) == []
    assert check_datalist([entry], et_label=4) == [entry]


def test_missing_sequence_file(tmp_path):
    entry = make_entry(tmp_path, "c1")
    Path(entry["image"][2]).unlink()
    p = only(validate_entries([entry], 4), entry["image"][2])
    assert p.case_id == "c1" and "not found" in p.problem
    entry["image"] = entry["image"][:3]
    p = only(validate_entries([entry], 4), ", ".join(entry["image"]))
    assert "3 image files" in p.problem and "T1, T1c, T2, FLAIR" in p.fix


def test_truncated_gzip(tmp_path):
    entry = make_entry(tmp_path, "c2")
    path = Path(entry["image"][1])
    raw = path.read_bytes()
    assert len(raw) > 1000  # random data: the gzip stream is long enough to cut
    path.write_bytes(raw[: len(raw) // 2])
    p = only(validate_entries([entry], 4), str(path))
    assert "not a readable NIfTI" in p.problem and "truncated" in p.fix


def test_garbage_file(tmp_path):
    entry = make_entry(tmp_path, "c2b")
    Path(entry["label"]).write_bytes(b"this is not a NIfTI file at all")
    p = only(validate_entries([entry], 4), entry["label"])
    assert "not a readable NIfTI" in p.problem
    assert validate_entries([entry], 4, check_labels=False) == []  # labels not looked at for inference


def test_mismatched_shape(tmp_path):
    entry = make_entry(tmp_path, "c3")
    save(Path(entry["image"][3]), brain(shape=(12, 12, 9)))
    p = only(validate_entries([entry], 4), entry["image"][3])
    assert "(12, 12, 9)" in p.problem and "(12, 12, 10)" in p.problem and entry["image"][0] in p.problem
    entry = make_entry(tmp_path / "l", "c3l")
    save(Path(entry["label"]), label_volume(shape=(12, 11, 10)))
    p = only(validate_entries([entry], 4), entry["label"])
    assert "(12, 11, 10)" in p.problem


def test_mismatched_affine(tmp_path):
    entry = make_entry(tmp_path, "c4")
    shifted = np.eye(4)
    shifted[0, 3] = 0.5
    save(Path(entry["image"][2]), brain(seed=2), shifted)
    p = only(validate_entries([entry], 4), entry["image"][2])
    assert "affine" in p.problem and "0.5" in p.problem
    tiny = np.eye(4)
    tiny[0, 3] = 1e-5  # MONAI's LoadImaged refuses this (np.allclose: 1e-8 + 1e-5 x |0|), so the check does too
    save(Path(entry["image"][2]), brain(seed=2), tiny)
    assert "affine" in only(validate_entries([entry], 4), entry["image"][2]).problem
    tiny = np.eye(4)
    tiny[0, 0] = 1 + 5e-6  # float rounding the loader accepts (within 1e-8 + 1e-5 x |1|) is tolerated
    save(Path(entry["image"][2]), brain(seed=2), tiny)
    assert validate_entries([entry], 4) == []


def test_foreign_label_values(tmp_path):
    entry = make_entry(tmp_path, "c5", label_values=(1, 2, 3, 7))
    p = only(validate_entries([entry], 4), entry["label"])
    assert "[3, 7]" in p.problem and "et_label=3" in p.fix
    entry = make_entry(tmp_path / "b", "c5b", label_values=(1, 2, 4))
    p = only(validate_entries([entry], 3), entry["label"])  # legacy labels read with the 2023 convention
    assert "[4]" in p.problem and "et_label=4" in p.fix


def test_nan_and_inf(tmp_path):
    entry = make_entry(tmp_path, "c6")
    data = brain(seed=0)
    data[5, 5, 5] = np.nan
    data[6, 6, 6] = np.inf
    save(Path(entry["image"][0]), data)
    p = only(validate_entries([entry], 4), entry["image"][0])
    assert "1 NaN voxel(s), 1 Inf voxel(s)" in p.problem


def test_empty_brain_and_blank_sequence(tmp_path):
    entry = make_entry(tmp_path, "c7")
    for path in entry["image"]:
        save(Path(path), np.zeros(SHAPE, np.float32))
    p = only(validate_entries([entry], 4), entry["image"][0])
    assert "empty brain" in p.problem
    entry = make_entry(tmp_path / "b", "c7b")
    save(Path(entry["image"][3]), np.zeros(SHAPE, np.float32))
    p = only(validate_entries([entry], 4), entry["image"][3])
    assert "flair is zero everywhere" in p.problem


def test_same_file_twice(tmp_path):
    entry = make_entry(tmp_path, "c8")
    entry["image"][2] = entry["image"][0]
    p = only(validate_entries([entry], 4), entry["image"][0])
    assert "t1 and t2" in p.problem


def test_four_channel_files(tmp_path):
    stack = np.stack([brain(seed=i) for i in range(4)], -1)
    label = save(tmp_path / "seg.nii.gz", label_volume())
    last = {"case_id": "last", "image": save(tmp_path / "last.nii.gz", stack), "label": label}
    first = {"case_id": "first", "image": [save(tmp_path / "first.nii.gz", np.moveaxis(stack, -1, 0))]}
    assert validate_entries([last, first], 4) == []
    three = {"case_id": "three", "image": [save(tmp_path / "three.nii.gz", stack[..., :3])]}
    p = only(validate_entries([three], 4), three["image"][0])
    assert "(12, 12, 10, 3)" in p.problem and "(X, Y, Z, 4) or (4, X, Y, Z)" in p.fix
    flat = {"case_id": "flat", "image": [save(tmp_path / "flat.nii.gz", brain())]}
    p = only(validate_entries([flat], 4), flat["image"][0])
    assert "4 sequence files" in p.fix
    stack[..., 1] = 0
    blank = {"case_id": "blank", "image": [save(tmp_path / "blank.nii.gz", stack)]}
    assert "t1c is zero everywhere" in only(validate_entries([blank], 4), blank["image"][0]).problem


def test_all_problems_reported_together(tmp_path):
    entry = make_entry(tmp_path, "many", label_values=(1, 2, 4, 9))
    data = brain(seed=0)
    data[4, 4, 4] = np.nan
    save(Path(entry["image"][0]), data)
    save(Path(entry["image"][3]), brain(shape=(12, 12, 9)))
    Path(entry["image"][1]).unlink()
    problems = validate_entries([entry], 4)
    assert {p.file for p in problems} == {entry["image"][0], entry["image"][1], entry["image"][3], entry["label"]}
    text = format_problems(problems)
    assert len(text.splitlines()) == 4
    assert f"many: {entry['image'][1]}: file not found -> " in text


def test_check_datalist_raises_or_skips(tmp_path, caplog):
    good = make_entry(tmp_path / "g", "good")
    bad1 = make_entry(tmp_path / "b1", "bad1", label_values=(1, 2, 4, 5))
    bad2 = make_entry(tmp_path / "b2", "bad2")
    Path(bad2["image"][0]).unlink()
    with pytest.raises(ValueError) as err:
        check_datalist([good, bad1, bad2], et_label=4)
    msg = str(err.value)
    assert "bad1" in msg and bad1["label"] in msg and "bad2" in msg and bad2["image"][0] in msg
    assert "2 of 3 case(s)" in msg and "skip_invalid=true" in msg
    with caplog.at_level(logging.WARNING, logger="custom.data.validation"):
        kept = check_datalist([good, bad1, bad2], et_label=4, skip_invalid=True)
    assert kept == [good]
    assert "bad1" in caplog.text and "bad2" in caplog.text
    with pytest.raises(ValueError, match="no usable case"):
        check_datalist([bad2], et_label=4, skip_invalid=True)


def test_et_label_never_present(tmp_path):
    entries = [make_entry(tmp_path / str(i), f"c{i}", label_values=(1, 2)) for i in range(2)]
    trap = "ET label 4 never occurs.*2023\\+ data uses 3, 2018-2021 uses 4; set et_label"
    with pytest.raises(ValueError, match=trap):
        check_datalist(entries, et_label=4)
    with pytest.raises(ValueError, match="ET label 4 never occurs"):
        check_datalist(entries, et_label=4, skip_invalid=True)
    assert check_datalist(entries, et_label=4, require_et=False) == entries
    assert check_datalist(entries, et_label=4, check_labels=False) == entries
    entries.append(make_entry(tmp_path / "et", "with_et"))  # one case with ET is enough
    assert check_datalist(entries, et_label=4) == entries
    unlabeled = [{"case_id": "u", "image": entries[0]["image"]}]
    assert check_datalist(unlabeled, et_label=4) == unlabeled  # inference: no label, no ET check


def test_real_case_labels_in_either_convention(labelled_case, other_convention_seg, tmp_path):
    images, seg, et = [str(p) for p in labelled_case.images], str(labelled_case.label), labelled_case.et_label
    other = other_convention_seg.et_label
    entry = {"case_id": labelled_case.case_id, "image": images, "label": seg}
    assert validate_entries([entry], et_label=et) == []
    # a real sequence truncated on the way: caught and named
    cut = tmp_path / "t1c.nii.gz"
    whole = Path(images[1]).read_bytes()
    cut.write_bytes(whole[: len(whole) // 2])
    broken = {"case_id": "cut", "image": [images[0], str(cut), *images[2:]]}
    p = only(validate_entries([broken], et_label=et), str(cut))
    assert "not a readable NIfTI" in p.problem
    if et not in np.unique(np.asanyarray(nib.load(seg).dataobj)):
        pytest.skip(f"{labelled_case.case_id} has no enhancing tumour (label {et}): the ET-label trap needs one")
    problems = validate_entries([entry], et_label=other)  # the 4-vs-3 trap on real data
    p = only(problems, seg)
    assert f"[{et}]" in p.problem and f"et_label={et}" in p.fix
    with pytest.raises(ValueError, match=f"ET label {other} never occurs.*label value {et} occurs in 1 case"):
        check_datalist([entry], et_label=other)
    relabelled = {"case_id": "relabelled", "image": images, "label": str(other_convention_seg.path)}
    assert check_datalist([relabelled], et_label=other) == [relabelled]
