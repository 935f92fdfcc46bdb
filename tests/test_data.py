"""Discovery of BraTS layouts, datalists and folds (custom/data/discovery.py, custom/data/datalist.py), on tiny
synthetic NIfTI and the real case."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from custom.core.naming import SEQUENCES
from custom.data.datalist import load_datalist, make_datalist, resolve_et_label
from custom.data.datalist import testing_files as unlabeled_files  # not collected as a test
from custom.data.datalist import training_files, validation_files, write_datalist
from custom.data.discovery import discover_cases

UNDERSCORE = ("t1", "t1ce", "t2", "flair")  # 2018-2021 suffixes in SEQUENCES order
DASH = ("t1n", "t1c", "t2w", "t2f")  # 2023+ suffixes in SEQUENCES order


@pytest.fixture(scope="module")
def nifti_bytes(tmp_path_factory) -> dict[str, bytes]:
    """Bytes of tiny 3-D and 4-D NIfTI files (.nii.gz and .nii), written once and copied into the trees."""
    d = tmp_path_factory.mktemp("templates")
    out = {}
    vol = np.arange(8**3, dtype=np.int16).reshape(8, 8, 8)
    for name, data in {
        "3d": vol,
        "4d_last": np.stack([vol] * 4, -1),
        "4d_first": np.stack([vol] * 4, 0),
        "4d_three": np.stack([vol] * 3, -1),
    }.items():
        for ext in (".nii.gz", ".nii"):
            p = d / f"{name}{ext}"
            nib.Nifti1Image(data, np.eye(4)).to_filename(str(p))
            out[name + ext] = p.read_bytes()
    return out


def make_case(folder: Path, case_id: str, suffixes, sep: str, data: bytes, seg: bool = True, ext=".nii.gz"):
    folder.mkdir(parents=True, exist_ok=True)
    names = list(suffixes) + (["seg"] if seg else [])
    for s in names:
        (folder / f"{case_id}{sep}{s}{ext}").write_bytes(data)


def check_order(case, case_id: str, suffixes, sep: str, ext=".nii.gz") -> None:
    assert len(case.images) == 4
    for path, s in zip(case.images, suffixes):
        assert Path(path).name == f"{case_id}{sep}{s}{ext}"
        assert Path(path).is_absolute()


def test_brats2019_hgg_lgg(tmp_path, nifti_bytes):
    ids = {"HGG": ["BraTS19_CBICA_AAB_1", "BraTS19_TCIA02_117_1"], "LGG": ["BraTS19_2013_0_1"]}
    for group, cases in ids.items():
        for c in cases:
            folder = tmp_path / "MICCAI_BraTS_2019_Data_Training" / group / c
            make_case(folder, c, UNDERSCORE, "_", nifti_bytes["3d.nii.gz"])
    cases = discover_cases(str(tmp_path))
    assert [c.case_id for c in cases] == sorted(ids["HGG"] + ids["LGG"])
    for c in cases:
        check_order(c, c.case_id, UNDERSCORE, "_")
        assert Path(c.label).name == f"{c.case_id}_seg.nii.gz"
        assert c.et_label == 4
        assert c.group == ("LGG" if c.case_id in ids["LGG"] else "HGG")
    dl = make_datalist(str(tmp_path))
    assert dl["et_label"] == 4 and dl["channel_order"] == list(SEQUENCES) and dl["numFolds"] == 5
    assert len(dl["training"]) == 3 and dl["testing"] == []
    assert {e["group"] for e in dl["training"]} == {"HGG", "LGG"}


def test_brats2020_training_and_validation(tmp_path, nifti_bytes):
    for i in (1, 2):
        c = f"BraTS20_Training_{i:03d}"
        make_case(tmp_path / "train" / c, c, UNDERSCORE, "_", nifti_bytes["3d.nii.gz"])
    v = "BraTS20_Validation_001"
    make_case(tmp_path / "val" / v, v, UNDERSCORE, "_", nifti_bytes["3d.nii.gz"], seg=False)
    cases = discover_cases(str(tmp_path))
    assert [c.case_id for c in cases] == ["BraTS20_Training_001", "BraTS20_Training_002", v]
    for c in cases:
        check_order(c, c.case_id, UNDERSCORE, "_")
        assert c.group is None and c.et_label == 4
    assert cases[2].label is None
    dl = make_datalist(str(tmp_path))
    assert [e["case_id"] for e in dl["training"]] == ["BraTS20_Training_001", "BraTS20_Training_002"]
    assert unlabeled_files(dl) == [{"case_id": v, "image": cases[2].images}]
    assert "label" not in dl["testing"][0]


def test_brats2021(tmp_path, nifti_bytes):
    for c in ("BraTS2021_00000", "BraTS2021_00002"):
        make_case(tmp_path / c, c, UNDERSCORE, "_", nifti_bytes["3d.nii.gz"])
    cases = discover_cases(str(tmp_path))
    assert [c.case_id for c in cases] == ["BraTS2021_00000", "BraTS2021_00002"]
    for c in cases:
        check_order(c, c.case_id, UNDERSCORE, "_")
        assert Path(c.label).name == f"{c.case_id}_seg.nii.gz" and c.et_label == 4


def test_brats2023_collections(tmp_path, nifti_bytes):
    ids = ["BraTS-GLI-00000-000", "BraTS-GLI-00002-001", "BraTS-PED-00010-000", "BraTS-SSA-00002-000"]
    for c in ids:
        make_case(tmp_path / c, c, DASH, "-", nifti_bytes["3d.nii.gz"])
    cases = discover_cases(str(tmp_path))
    assert [c.case_id for c in cases] == ids
    for c in cases:
        check_order(c, c.case_id, DASH, "-")
        assert Path(c.label).name == f"{c.case_id}-seg.nii.gz"
        assert c.et_label == 3 and c.group is None
    assert make_datalist(str(tmp_path))["et_label"] == 3
    assert make_datalist(str(tmp_path), et_label=4)["et_label"] == 4  # explicit override wins


def test_uncompressed_nii(tmp_path, nifti_bytes):
    make_case(tmp_path / "BraTS2021_00001", "BraTS2021_00001", UNDERSCORE, "_", nifti_bytes["3d.nii"], ext=".nii")
    make_case(tmp_path / "BraTS-MEN-00004-000", "BraTS-MEN-00004-000", DASH, "-", nifti_bytes["3d.nii"], ext=".nii")
    a, b = discover_cases(str(tmp_path))
    check_order(b, "BraTS2021_00001", UNDERSCORE, "_", ext=".nii")
    check_order(a, "BraTS-MEN-00004-000", DASH, "-", ext=".nii")
    assert Path(a.label).name == "BraTS-MEN-00004-000-seg.nii" and a.et_label == 3 and b.et_label == 4


def test_flat_four_channel_folder(tmp_path, nifti_bytes, caplog):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    (tmp_path / "imagesTr" / "caseA.nii.gz").write_bytes(nifti_bytes["4d_last.nii.gz"])
    (tmp_path / "labelsTr" / "caseA.nii.gz").write_bytes(nifti_bytes["3d.nii.gz"])
    (tmp_path / "imagesTr" / "caseB.nii.gz").write_bytes(nifti_bytes["4d_first.nii.gz"])
    (tmp_path / "imagesTr" / "caseB_seg.nii.gz").write_bytes(nifti_bytes["3d.nii.gz"])
    (tmp_path / "imagesTr" / "caseC.nii").write_bytes(nifti_bytes["4d_last.nii"])  # unlabeled
    (tmp_path / "imagesTr" / "probs.nii.gz").write_bytes(nifti_bytes["4d_three.nii.gz"])  # not 4 channels
    (tmp_path / "imagesTr" / "._caseA.nii.gz").write_bytes(b"macOS resource fork")  # hidden: ignored
    (tmp_path / "labelsTr" / "other.nii.gz").write_bytes(nifti_bytes["3d.nii.gz"])  # no image: ignored
    with pytest.raises(ValueError, match=r"probs: probs.nii.gz has shape \(8, 8, 8, 3\): not 4 channels"):
        discover_cases(str(tmp_path))  # reported, not skipped
    incomplete: dict[str, str] = {}
    cases = discover_cases(str(tmp_path), allow_incomplete=True, incomplete_cases=incomplete)
    assert [c.case_id for c in cases] == ["caseA", "caseB", "caseC"]
    assert list(incomplete) == ["probs"]
    assert [len(c.images) for c in cases] == [1, 1, 1]
    assert Path(cases[0].images[0]) == tmp_path / "imagesTr" / "caseA.nii.gz"
    assert Path(cases[0].label) == tmp_path / "labelsTr" / "caseA.nii.gz"
    assert Path(cases[1].label) == tmp_path / "imagesTr" / "caseB_seg.nii.gz"
    assert cases[2].label is None
    dl = make_datalist(str(tmp_path), allow_incomplete=True)
    assert [e["case_id"] for e in dl["training"]] == ["caseA", "caseB"]
    assert [e["case_id"] for e in dl["testing"]] == ["caseC"]
    assert [(e["case_id"], Path(e["folder"]).name) for e in dl["incomplete"]] == [("probs", "probs.nii.gz")]


def test_validation_set_without_labels(tmp_path, nifti_bytes):
    for c in ("BraTS19_CBICA_AAM_1", "BraTS19_TCIA10_195_1"):
        make_case(tmp_path / c, c, UNDERSCORE, "_", nifti_bytes["3d.nii.gz"], seg=False)
    cases = discover_cases(str(tmp_path))
    assert all(c.label is None for c in cases) and len(cases) == 2
    dl = make_datalist(str(tmp_path))
    assert dl["training"] == [] and len(unlabeled_files(dl)) == 2


def test_incomplete_case_is_reported_not_dropped(tmp_path, nifti_bytes, caplog):
    make_case(tmp_path / "BraTS2021_00000", "BraTS2021_00000", UNDERSCORE, "_", nifti_bytes["3d.nii.gz"])
    make_case(tmp_path / "BraTS2021_00003", "BraTS2021_00003", ("t1", "t2"), "_", nifti_bytes["3d.nii.gz"])
    make_case(tmp_path / "BraTS-GLI-00009-000", "BraTS-GLI-00009-000", ("t1n", "t1c", "t2w"), "-", b"", seg=False)
    with pytest.raises(ValueError) as err:
        discover_cases(str(tmp_path))
    msg = str(err.value)
    assert "BraTS2021_00003: missing t1c, flair in " + str(tmp_path / "BraTS2021_00003") in msg
    assert "BraTS-GLI-00009-000: missing flair" in msg
    assert "allow_incomplete" in msg
    with caplog.at_level(logging.WARNING, logger="custom.data.datalist"):
        cases = discover_cases(str(tmp_path), allow_incomplete=True)
    assert [c.case_id for c in cases] == ["BraTS2021_00000"]
    assert "BraTS2021_00003" in caplog.text and "BraTS-GLI-00009-000" in caplog.text


def test_empty_missing_and_mixed_datasets(tmp_path, nifti_bytes):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    with pytest.raises(ValueError, match="no BraTS cases found under .*empty.*t1ce.*t1n.*4-channel"):
        discover_cases(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        discover_cases(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere.*datalist JSON"):
        load_datalist(str(tmp_path / "nowhere"))
    mixed = tmp_path / "mixed"
    make_case(mixed / "BraTS2021_00000", "BraTS2021_00000", UNDERSCORE, "_", nifti_bytes["3d.nii.gz"])
    make_case(mixed / "BraTS-GLI-00000-000", "BraTS-GLI-00000-000", DASH, "-", nifti_bytes["3d.nii.gz"])
    with pytest.raises(ValueError, match="mixes .* set et_label"):
        make_datalist(str(mixed))
    assert make_datalist(str(mixed), et_label=3)["et_label"] == 3
    dup = tmp_path / "dup"
    make_case(dup / "a" / "BraTS2021_00000", "BraTS2021_00000", UNDERSCORE, "_", nifti_bytes["3d.nii.gz"])
    make_case(dup / "b" / "BraTS2021_00000", "BraTS2021_00000", UNDERSCORE, "_", nifti_bytes["3d.nii.gz"])
    with pytest.raises(ValueError, match="more than once"):
        discover_cases(str(dup))


@pytest.fixture(scope="module")
def hgg_lgg_tree(tmp_path_factory, nifti_bytes) -> Path:
    root = tmp_path_factory.mktemp("brats19")
    for group, n in (("HGG", 13), ("LGG", 9)):
        for i in range(n):
            c = f"BraTS19_{group}_{i:03d}_1"
            make_case(root / group / c, c, UNDERSCORE, "_", nifti_bytes["3d.nii.gz"])
    c = "BraTS19_Val_001_1"
    make_case(root / "Validation" / c, c, UNDERSCORE, "_", nifti_bytes["3d.nii.gz"], seg=False)
    return root


def test_folds_balanced_stratified_deterministic(hgg_lgg_tree):
    dl = make_datalist(str(hgg_lgg_tree), folds=5, seed=0)
    train = dl["training"]
    assert len(train) == 22 and len(dl["testing"]) == 1
    sizes = np.bincount([e["fold"] for e in train], minlength=5)
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == 22
    for group, n in (("HGG", 13), ("LGG", 9)):
        per = np.bincount([e["fold"] for e in train if e["group"] == group], minlength=5)
        assert per.sum() == n and per.max() - per.min() <= 1, (group, per)
    folds_of = lambda d: {e["case_id"]: e["fold"] for e in d["training"]}  # noqa: E731
    assert folds_of(make_datalist(str(hgg_lgg_tree), folds=5, seed=0)) == folds_of(dl)
    other = make_datalist(str(hgg_lgg_tree), folds=5, seed=1)
    assert folds_of(other) != folds_of(dl) and other["seed"] == 1
    three = make_datalist(str(hgg_lgg_tree), folds=3, seed=0)
    assert sorted(set(folds_of(three).values())) == [0, 1, 2]
    with pytest.raises(ValueError, match="folds must be"):
        make_datalist(str(hgg_lgg_tree), folds=1)


def test_training_and_validation_files_partition(hgg_lgg_tree):
    dl = make_datalist(str(hgg_lgg_tree), folds=5, seed=3)
    every = sorted(e["case_id"] for e in dl["training"])
    seen_val = []
    for k in range(5):
        tr = [e["case_id"] for e in training_files(dl, k)]
        va = [e["case_id"] for e in validation_files(dl, k)]
        assert not set(tr) & set(va) and sorted(tr + va) == every
        assert all(e["fold"] == k for e in validation_files(dl, k)) and va
        seen_val += va
    assert sorted(seen_val) == every  # every case validated exactly once
    assert validation_files(dl, "1") == validation_files(dl, 1)
    for bad in (5, -1, "one"):
        with pytest.raises(ValueError, match=r"valid folds are 0\.\.4"):
            validation_files(dl, bad)
        with pytest.raises(ValueError, match=r"0\.\.4"):
            training_files(dl, bad)
    # the returned entries are copies: editing them does not change the datalist
    training_files(dl, 0)[0]["image"].append("x")
    assert all(len(e["image"]) == 4 for e in dl["training"])


def test_write_and_load_datalist_roundtrip_relative(hgg_lgg_tree, tmp_path, capsys):
    out = tmp_path / "lists" / "datalist.json"
    written = write_datalist(str(hgg_lgg_tree), str(out), folds=5, seed=2, relative=True)
    assert written == str(out.resolve())
    assert sorted(os.listdir(out.parent)) == ["datalist.json"]  # no temporary file left behind
    line = capsys.readouterr().out.strip()
    assert str(out) in line and "22 labeled" in line and "1 unlabeled" in line and "et_label 4" in line
    raw = json.loads(out.read_text())
    assert not Path(raw["training"][0]["image"][0]).is_absolute()  # paths relative to the JSON's folder
    loaded = load_datalist(str(out))
    fresh = make_datalist(str(hgg_lgg_tree), folds=5, seed=2)
    assert loaded["training"] == fresh["training"] and loaded["testing"] == fresh["testing"]
    assert loaded["et_label"] == 4 and loaded["numFolds"] == 5
    assert all(Path(p).exists() for e in loaded["training"] for p in [*e["image"], e["label"]])
    assert load_datalist(str(out), et_label=3)["et_label"] == 3
    # a dataset folder is accepted in place of the JSON
    assert load_datalist(str(hgg_lgg_tree), seed=2)["training"] == fresh["training"]


def test_load_handwritten_datalist(tmp_path):
    (tmp_path / "data").mkdir()
    seq = {s: f"data/a_{s}.nii.gz" for s in ("flair", "t1", "t2", "t1ce")}  # keyed by name, any order
    doc = {
        "training": [
            {"image": seq, "label": "data/a_seg.nii.gz"},
            {"case_id": "b", "image": [f"data/b_{s}.nii.gz" for s in UNDERSCORE], "label": "data/b_seg.nii.gz"},
            {"case_id": "c", "image": "data/c.nii.gz", "label": "data/c_label.nii.gz"},
        ],
        "testing": ["data/d.nii.gz"],  # decathlon style: plain paths
    }
    path = tmp_path / "my.json"
    path.write_text(json.dumps(doc))
    dl = load_datalist(str(path), folds=3, seed=0)
    a = dl["training"][0]
    assert a["case_id"] == "a"
    assert a["image"] == [str(tmp_path / "data" / f"a_{s}.nii.gz") for s in UNDERSCORE]  # re-ordered by name
    assert dl["training"][2]["image"] == [str(tmp_path / "data" / "c.nii.gz")]
    assert sorted(e["fold"] for e in dl["training"]) == [0, 1, 2] and dl["numFolds"] == 3
    assert dl["testing"] == [{"image": [str(tmp_path / "data" / "d.nii.gz")], "case_id": "d"}]
    assert dl["et_label"] == 4 and resolve_et_label(dl, None) == 4 and resolve_et_label(dl, 3) == 3
    with pytest.raises(ValueError, match="et_label must be 4"):
        resolve_et_label(dl, 5)

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        load_datalist(str(bad))
    bad.write_text(json.dumps({**doc, "channel_order": ["flair", "t1", "t1c", "t2"]}))
    with pytest.raises(ValueError, match="channel_order"):
        load_datalist(str(bad))
    bad.write_text(json.dumps({"training": [{"image": {"t1": "x", "t2": "y"}, "label": "z"}]}))
    with pytest.raises(ValueError, match="lacks t1c, flair"):
        load_datalist(str(bad))
    bad.write_text(json.dumps({"training": [{"case_id": "x", "image": "x.nii.gz"}]}))
    with pytest.raises(ValueError, match="without 'label': x"):
        load_datalist(str(bad))
    nii = tmp_path / "img.nii.gz"
    nii.write_bytes(b"")
    with pytest.raises(ValueError, match="not a datalist JSON"):
        load_datalist(str(nii))


# ---- the real BraTS case (BRATS_TEST_CASE) under 2019, 2021 and 2023 names ----------------------------------------


def link_real(folder: Path, case_id: str, suffixes, sep: str, images, seg: Path | None) -> dict[str, Path]:
    folder.mkdir(parents=True)
    expected = {}
    for s, suffix, target in zip(SEQUENCES, suffixes, images):
        (folder / f"{case_id}{sep}{suffix}.nii.gz").symlink_to(target)
        expected[s] = target
    if seg is not None:
        (folder / f"{case_id}{sep}seg.nii.gz").symlink_to(seg)
    return expected


@pytest.mark.parametrize(
    "layout, case_id, suffixes, sep, et_label, group",
    [
        ("HGG", "BraTS19_TCIA_001_1", UNDERSCORE, "_", 4, "HGG"),
        ("", "BraTS2021_00001", UNDERSCORE, "_", 4, None),
        ("", "BraTS-GLI-00001-000", DASH, "-", 3, None),
    ],
)
def test_real_case_under_each_naming(
    labelled_case, other_convention_seg, tmp_path, layout, case_id, suffixes, sep, et_label, group
):
    # the case's own segmentation, or the same one relabelled, so that its ET value matches the naming
    seg = labelled_case.label if et_label == labelled_case.et_label else other_convention_seg.path
    expected = link_real(tmp_path / layout / case_id, case_id, suffixes, sep, labelled_case.images, seg)
    (case,) = discover_cases(str(tmp_path))
    assert case.case_id == case_id and case.et_label == et_label and case.group == group
    for path, s in zip(case.images, SEQUENCES):  # each position resolves to the right real sequence
        assert os.path.realpath(path) == os.path.realpath(expected[s]), s
    assert os.path.realpath(case.label) == os.path.realpath(seg)
    dl = make_datalist(str(tmp_path))
    assert dl["et_label"] == et_label and len(dl["training"]) == 1 and validation_files(dl, 0)
    img, source = nib.load(case.images[0]), nib.load(labelled_case.images[0])  # the real header, untouched
    assert img.shape == source.shape and np.array_equal(img.affine, source.affine)


# suffix of each sequence (SEQUENCES order) in either naming; the case's files are checked by name, independently of
# the discovery the fixture itself went through
_NAMED = {3: [("t1n",), ("t1c",), ("t2w",), ("t2f",)], 4: [("t1",), ("t1ce", "t1c", "t1gd"), ("t2",), ("flair",)]}


def test_real_case_in_place(real_case, tmp_path):
    sep = "-" if real_case.et_label == 3 else "_"
    for path, suffixes in zip(real_case.images, _NAMED[real_case.et_label]):
        stem = path.name.split(".nii")[0].lower()
        assert any(stem == f"{real_case.case_id}{sep}{x}".lower() for x in suffixes), (path, suffixes)
    # the case folder in a dataset folder, with another algorithm's segmentations beside it when there are some (a
    # 3-D file whose name is no BraTS sequence): still one case, in place
    (tmp_path / real_case.case_id).symlink_to(real_case.dir, target_is_directory=True)
    beside = real_case.dir.parent / "algorithm_segmentations"
    if beside.is_dir():
        (tmp_path / beside.name).symlink_to(beside, target_is_directory=True)
    (case,) = discover_cases(str(tmp_path))
    assert case.case_id == real_case.case_id and case.et_label == real_case.et_label
    assert [os.path.realpath(p) for p in case.images] == [os.path.realpath(p) for p in real_case.images]
    assert (case.label and os.path.realpath(case.label)) == (real_case.label and os.path.realpath(real_case.label))
