"""Synthetic BraTS-like cases: real BraTS layout and headers, determinism, contrasts, idempotent demo data."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from custom.data import synthetic
from custom.data.synthetic import case_files, case_id, ensure_demo_data, synthesize, synthesize_case
from scipy import ndimage

SHAPE = (32, 32, 32)


def _read(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def _case_arrays(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: _read(p) for p in sorted(folder.glob("*/*.nii.gz"))}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """3 cases in each naming, written once for the layout tests."""
    root = tmp_path_factory.mktemp("synthetic")
    ids = {naming: synthesize(root / naming, 3, SHAPE, seed=0, naming=naming) for naming in ("2021", "2023")}
    return root, ids


@pytest.mark.parametrize(
    "naming, folder, names, labels",
    [
        ("2021", "BraTS2021_{:05d}", ["_t1", "_t1ce", "_t2", "_flair", "_seg"], {0, 1, 2, 4}),
        ("2023", "BraTS-GLI-{:05d}-000", ["-t1n", "-t1c", "-t2w", "-t2f", "-seg"], {0, 1, 2, 3}),
    ],
)
def test_layout_dtypes_orientation_labels(written, naming, folder, names, labels):
    root, ids = written
    assert ids[naming] == [folder.format(i) for i in range(3)]
    assert sorted(p.name for p in (root / naming).iterdir() if not p.name.startswith(".")) == ids[naming]
    for cid in ids[naming]:
        case = root / naming / cid
        assert sorted(p.name for p in case.iterdir()) == sorted(f"{cid}{n}.nii.gz" for n in names)
        affines = []
        for n in names:
            image = nib.load(str(case / f"{cid}{n}.nii.gz"))
            assert image.shape == SHAPE
            assert image.get_data_dtype() == (np.uint8 if n.endswith("seg") else np.int16), n
            assert np.sign(np.diag(image.affine)[:3]).tolist() == [-1, -1, 1]
            assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
            affines.append(image.affine)
        assert all(np.array_equal(a, affines[0]) for a in affines), "all files of a case share one affine"
        seg = _read(case / f"{cid}{names[-1]}.nii.gz")
        assert set(np.unique(seg).tolist()) <= labels
        assert (seg == 2).any() and (seg == 1).any(), "every case has edema and a core"
        t1 = _read(case / f"{cid}{names[0]}.nii.gz")
        assert t1.min() == 0 and (t1[seg > 0] > 0).all(), "zero background, positive brain"


def test_2023_uses_label_3_where_2021_uses_4(written):
    root, ids = written
    seg21 = _read(root / "2021" / ids["2021"][0] / f"{ids['2021'][0]}_seg.nii.gz")
    seg23 = _read(root / "2023" / ids["2023"][0] / f"{ids['2023'][0]}-seg.nii.gz")
    assert np.array_equal(np.where(seg21 == 4, 3, seg21), seg23), "same seed, same case, only the ET label differs"


def test_spacing_goes_into_the_affine(tmp_path):
    synthesize(tmp_path, 1, (16, 20, 24), seed=0, spacing=(1.0, 1.5, 2.0))
    image = nib.load(str(tmp_path / "BraTS2021_00000" / "BraTS2021_00000_flair.nii.gz"))
    assert image.shape == (16, 20, 24)
    assert np.allclose(np.diag(image.affine)[:3], (-1.0, -1.5, 2.0))
    assert np.allclose(image.header.get_zooms(), (1.0, 1.5, 2.0))


def test_deterministic_for_a_seed_and_different_for_another(tmp_path):
    a = _case_arrays(Path(ensure_demo_data(tmp_path / "a", 2, SHAPE, seed=3)))
    synthesize(tmp_path / "b", 2, SHAPE, seed=3)
    synthesize(tmp_path / "c", 2, SHAPE, seed=4)
    b, c = _case_arrays(tmp_path / "b"), _case_arrays(tmp_path / "c")
    assert a.keys() == b.keys() == c.keys() and len(a) == 10
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].tobytes() == b[name].tobytes(), name
    assert all(a[name].tobytes() != c[name].tobytes() for name in a)


def test_case_i_does_not_depend_on_num_cases():
    first = synthesize_case(np.random.default_rng(np.random.SeedSequence(7).spawn(2)[1]), SHAPE)
    again = synthesize_case(np.random.default_rng(np.random.SeedSequence(7).spawn(9)[1]), SHAPE)
    assert all(np.array_equal(first[0][k], again[0][k]) for k in first[0]) and np.array_equal(first[1], again[1])


@pytest.fixture(scope="module")
def cases():
    return [synthesize_case(np.random.default_rng(s), (48, 48, 48)) for s in np.random.SeedSequence(0).spawn(12)]


def test_some_cases_have_no_enhancing_tumor(cases):
    has_et = [bool((labels == 4).any()) for _, labels in cases]
    assert any(has_et) and not all(has_et), has_et
    for images, labels in cases:
        assert set(images) == {"t1", "t1c", "t2", "flair"}
        assert labels.dtype == np.uint8 and set(np.unique(labels).tolist()) <= {0, 1, 2, 4}
        assert all(v.dtype == np.float32 and v.shape == (48, 48, 48) for v in images.values())


def test_contrasts_follow_brats(cases):
    """Per case, relative to that case's normal brain: the orderings a radiologist reads off the sequences."""
    checked = 0
    for images, labels in cases:
        brain = images["t1"] > 0
        normal = brain & (labels == 0)
        regions = {"edema": labels == 2, "core1": labels == 1, "et": labels == 4}

        def mean(seq, region):
            return float(images[seq][regions[region]].mean() / images[seq][normal].mean())

        assert mean("flair", "edema") > 1.3, "edema bright on FLAIR"
        assert mean("t2", "edema") > 1.2, "edema bright on T2"
        assert mean("t1", "edema") < 0.97, "edema slightly dark on T1"
        if regions["et"].sum() >= 50:
            assert mean("t1c", "et") > 1.25 and mean("t1c", "et") > 1.3 * mean("t1c", "edema"), "ET bright on T1c"
            checked += 1
            if regions["core1"].sum() >= 50:
                assert mean("t1c", "core1") < 0.9, "necrosis dark on T1c"
                assert mean("t1c", "et") > 1.5 * mean("t1c", "core1"), "enhancing rim brighter than necrosis"
                assert mean("t1", "core1") < 0.8, "necrosis dark on T1"
                assert mean("t2", "core1") > 1.3, "necrosis bright on T2"
        else:  # non-enhancing core: darker than edema on FLAIR and T2, not enhancing
            assert mean("flair", "core1") < mean("flair", "edema") and mean("t2", "core1") < mean("t2", "edema")
            assert mean("t1c", "core1") < 0.9
    assert checked >= 5


def test_sequences_are_not_a_single_threshold(cases):
    """The best global FLAIR threshold (z-scored per case) must not already give near-perfect whole tumor."""

    def z(a):
        m = a > 0
        return np.where(m, (a - a[m].mean()) / a[m].std(), -9)

    best = max(
        np.mean([2 * ((z(im["flair"]) > t) & (lab > 0)).sum() / ((z(im["flair"]) > t).sum() + (lab > 0).sum())
                 for im, lab in cases])  # fmt: skip
        for t in np.linspace(0.5, 3, 11)
    )
    assert 0.4 < best < 0.9, best


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_ensure_demo_data_is_idempotent_and_completes_a_partial_folder(tmp_path):
    out = tmp_path / "demo"
    assert ensure_demo_data(str(out), 3, SHAPE, seed=1) == str(out)
    before, arrays = _mtimes(out), _case_arrays(out)
    assert len(before) == 16 and synthetic.MARKER in before  # 3 x 5 files and the marker
    assert [p.name for p in tmp_path.iterdir()] == ["demo"], "no temporary sibling left behind"

    assert ensure_demo_data(str(out), 3, SHAPE, seed=1) == str(out)
    assert _mtimes(out) == before, "second call must not rewrite anything"

    # interrupted / damaged: a missing file and a truncated file in case 1, case 2 missing altogether
    c1, c2 = out / case_id(1), out / case_id(2)
    (c1 / f"{case_id(1)}_t2.nii.gz").unlink()
    (c1 / f"{case_id(1)}_flair.nii.gz").write_bytes(b"\x1f\x8b garbage")
    shutil.rmtree(c2)
    ensure_demo_data(str(out), 3, SHAPE, seed=1)
    after = _mtimes(out)
    assert after.keys() == before.keys()
    assert all(after[k] == before[k] for k in before if k.startswith(case_id(0))), "complete case 0 untouched"
    completed = _case_arrays(out)
    assert all(completed[k].tobytes() == arrays[k].tobytes() for k in arrays), "completed cases equal the originals"
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]

    # asking for more cases adds them, keeping the existing ones
    ensure_demo_data(str(out), 4, SHAPE, seed=1)
    assert (out / case_id(3)).is_dir() and _mtimes(out)[f"{case_id(0)}/{case_id(0)}_t1.nii.gz"] == after[
        f"{case_id(0)}/{case_id(0)}_t1.nii.gz"
    ]
    # other parameters rebuild the whole (own) data set
    ensure_demo_data(str(out), 2, (24, 24, 24), seed=1)
    assert nib.load(str(out / case_id(0) / f"{case_id(0)}_t1.nii.gz")).shape == (24, 24, 24)


def test_an_interrupted_ensure_demo_data_leaves_no_half_data_set(tmp_path, monkeypatch):
    real_write, calls = synthetic._write_case, []

    def write_then_die(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        calls.append(args[0])
        return real_write(*args, **kwargs)

    monkeypatch.setattr(synthetic, "_write_case", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        ensure_demo_data(str(tmp_path / "demo"), 4, SHAPE)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == [], "neither the target nor a temporary folder is left"
    monkeypatch.setattr(synthetic, "_write_case", real_write)
    ensure_demo_data(str(tmp_path / "demo"), 4, SHAPE)
    assert len(list((tmp_path / "demo").glob("*/*.nii.gz"))) == 20


def test_ensure_demo_data_never_touches_a_foreign_folder(tmp_path):
    out = tmp_path / "mine"
    (out / "BraTS2021_00000").mkdir(parents=True)
    (out / "notes.txt").write_text("user data")
    with pytest.raises(RuntimeError, match="not written by custom.data.synthetic"):
        ensure_demo_data(str(out), 2, SHAPE)
    assert sorted(p.name for p in out.iterdir()) == ["BraTS2021_00000", "notes.txt"]
    # an existing empty folder is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    ensure_demo_data(str(empty), 1, SHAPE)
    assert (empty / case_id(0) / f"{case_id(0)}_seg.nii.gz").is_file()


def test_command_line(tmp_path, capsys, monkeypatch):
    """``python -m custom synthesize``, the one command line (python-fire turns 16,16,20 into a tuple)."""
    import custom.__main__

    assert not hasattr(synthetic, "main") and not hasattr(synthetic, "build_parser")  # no second, argparse CLI
    monkeypatch.setattr("sys.argv", ["custom", "synthesize", "--output_dir", str(tmp_path), "--num_cases", "1",
                                     "--shape", "16,16,20", "--naming", "2023", "--seed", "5"])  # fmt: skip
    custom.__main__.main()
    assert "synthesized 1" in capsys.readouterr().out
    image = nib.load(str(tmp_path / "BraTS-GLI-00000-000" / "BraTS-GLI-00000-000-t2f.nii.gz"))
    assert image.shape == (16, 16, 20)
    with pytest.raises(ValueError, match="naming"):
        synthesize(tmp_path, 1, SHAPE, naming="2019")


def test_generation_is_fast():
    import time

    start = time.perf_counter()
    for s in np.random.SeedSequence(0).spawn(3):
        synthesize_case(np.random.default_rng(s), (64, 64, 64))
    per_case = (time.perf_counter() - start) / 3
    assert per_case < 0.75, f"{per_case:.2f} s per 64^3 case (40 cases must take well under a minute)"


def test_2024_naming_adds_a_csf_like_resection_cavity_next_to_the_tumor(tmp_path):
    """Naming "2024" (label scheme brats2024): 2023 file names, labels 0-4 with RC 4 in every case, a dark hole on
    T1/FLAIR and bright on T2 (CSF contrasts) touching the tumor; the tumor itself is still there."""
    from custom.core.labels import detect_label_scheme

    ids = synthesize(tmp_path, 3, SHAPE, seed=0, naming="2024")
    assert ids == [f"BraTS-GLI-{i:05d}-100" for i in range(3)]
    segs = []
    for cid in ids:
        files = case_files(tmp_path / cid, "2024")
        assert files["seg"].name == f"{cid}-seg.nii.gz" and files["t2"].name == f"{cid}-t2w.nii.gz"
        seg = _read(files["seg"])
        segs.append(str(files["seg"]))
        assert set(np.unique(seg)) <= {0, 1, 2, 3, 4} and (seg == 4).sum() > 0 and np.isin(seg, (1, 2, 3)).sum() > 0
        cavity, tumor = seg == 4, np.isin(seg, (1, 2, 3))
        assert (ndimage.binary_dilation(cavity) & tumor).any(), "the cavity touches the tumor"
        brain = _read(files["t1"]) > 0
        normal = brain & (seg == 0)
        for name, darker in (("t1", True), ("t2", False), ("flair", True)):
            image = _read(files[name]).astype(np.float64)
            ratio = image[cavity].mean() / np.median(image[normal])
            assert (ratio < 0.8) if darker else (ratio > 1.3), (cid, name, ratio)
    assert detect_label_scheme(segs, 3).name == "brats2024"
