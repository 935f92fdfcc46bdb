"""Pictures of a case: the real BraTS case of BRATS_TEST_CASE and synthetic cases."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest
from custom.core.labels import SCHEMES
from custom.core.naming import SEQUENCE_NAMES
from custom.data.synthetic import synthesize
from custom.tools import visualize as vis


def _colour_fraction(png: np.ndarray, rgb, tol=0.12) -> float:
    """Fraction of pixels close to ``rgb`` blended at 50 % over any grey (overlay pixels)."""
    r, g, b = png[..., 0], png[..., 1], png[..., 2]
    if rgb == "red":
        mask = (r - g > 0.3) & (r - b > 0.3)
    elif rgb == "green":
        mask = (g - r > 0.3) & (g - b > 0.3)
    else:  # yellow
        mask = (r - b > 0.3) & (g - b > 0.3) & (np.abs(r - g) < tol)
    return float(mask.mean())


def _is_rc_colour(png: np.ndarray) -> np.ndarray:
    """Pixels of the resection cavity's colour (blue, drawn at 50 % over grey, or full in the legend)."""
    r, g, b = png[..., 0], png[..., 1], png[..., 2]
    return (b - r > 0.3) & (b - g > 0.25)


@pytest.fixture(scope="module")
def synthetic_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("vis")
    synthesize(root, 2, (32, 32, 32), seed=0)
    return root / "BraTS2021_00000"


def test_real_case_with_reference(labelled_case, other_convention_seg, tmp_path):
    # the case's segmentation as prediction and, as reference, the same one with ET in the other convention
    seg, reference = labelled_case.label, other_convention_seg.path
    out = vis.visualize(str(labelled_case.dir), str(seg), str(tmp_path / "pics" / "real.png"), reference=str(reference))
    assert out == str(tmp_path / "pics" / "real.png")
    png = mpimg.imread(out)
    assert png.ndim == 3 and png.shape[0] >= 600 and png.shape[1] >= 1200, png.shape  # 3 rows x 6 columns
    assert png.shape[1] > 1.4 * png.shape[0]
    # overlays (ET as 3 in one file and 4 in the other: both detected) and the legend are drawn
    for colour in ("red", "green", "yellow"):
        assert _colour_fraction(png, colour) > 1e-3, colour
    assert not list((tmp_path / "pics").glob(".*tmp")), "no temporary file left"


def test_real_case_four_files_and_explicit_et_label(labelled_case, tmp_path):
    files, seg, et = ",".join(map(str, labelled_case.images)), str(labelled_case.label), labelled_case.et_label
    out = vis.visualize(files, seg, str(tmp_path / "four.png"), et_label=et)
    png = mpimg.imread(out)
    assert png.shape[1] < 1400, "5 columns without a reference"
    if et not in np.unique(np.asanyarray(nib.load(seg).dataobj)):
        pytest.skip(f"{labelled_case.case_id} has no enhancing tumour (label {et}): the wrong-et_label check needs one")
    with pytest.raises(ValueError, match=rf"label values \[{et}\].*et_label"):
        vis.visualize(files, seg, str(tmp_path / "bad.png"), et_label=7 - et)
    assert not (tmp_path / "bad.png").exists()


def test_synthetic_case_folder_files_and_four_channel_file(synthetic_case, tmp_path):
    seg = synthetic_case / "BraTS2021_00000_seg.nii.gz"
    a = mpimg.imread(vis.visualize(synthetic_case, seg, tmp_path / "a.png"))
    assert a.shape[0] > 300 and a.shape[1] > 900
    assert _colour_fraction(a, "green") > 1e-3

    files = [synthetic_case / f"BraTS2021_00000_{s}.nii.gz" for s in ("t1", "t1ce", "t2", "flair")]
    cid, volumes, spacing = vis.load_case(",".join(map(str, files)))
    assert cid == "BraTS2021_00000" and spacing == (1.0, 1.0, 1.0)

    # the same case as one 4-channel NIfTI, channels last and channels first
    stack = np.stack([np.asarray(nib.load(str(f)).dataobj) for f in files], axis=-1)
    affine = nib.load(str(files[0])).affine
    for name, data in (("last.nii.gz", stack), ("first.nii.gz", np.moveaxis(stack, -1, 0))):
        nib.save(nib.Nifti1Image(data, affine), str(tmp_path / name))
        _, four, _ = vis.load_case(str(tmp_path / name))
        for seq in SEQUENCE_NAMES:
            assert np.array_equal(four[seq], volumes[seq]), (name, seq)
    # prediction given as a folder holding <case_id>.nii.gz
    preds = tmp_path / "preds"
    preds.mkdir()
    (preds / "last.nii.gz").write_bytes(seg.read_bytes())
    assert Path(vis.visualize(tmp_path / "last.nii.gz", preds, tmp_path / "b.png")).is_file()


def test_radiological_orientation(tmp_path):
    """A marker at the patient's right-anterior-superior ends up left/top in axial, left/top in coronal,
    and anterior (left)/top in sagittal, for a BraTS-like LPS file."""
    shape = (40, 40, 40)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # voxel i -> world x = -i: large i = patient's left
    vol = np.ones(shape, np.int16) * 100
    # world: right (x > 0 small i), anterior (y > 0 small j), superior (large k)
    vol[2:6, 2:6, 34:38] = 1000
    for s in ("t1", "t1ce", "t2", "flair"):
        nib.save(nib.Nifti1Image(vol, affine), str(tmp_path / f"case_{s}.nii.gz"))
    _, volumes, _ = vis.load_case(tmp_path)
    t1 = volumes["T1"]
    centre = tuple(int(np.mean(i)) for i in np.nonzero(t1 > 500))
    for view in ("axial", "coronal", "sagittal"):
        pic = vis._slice(t1, view, centre)
        rows, cols = np.nonzero(pic > 500)
        assert cols.mean() < pic.shape[1] / 2, f"{view}: patient's right (anterior in sagittal) must be on the left"
        assert rows.mean() < pic.shape[0] / 2, f"{view}: anterior (superior) must be at the top"


def test_clear_errors(synthetic_case, tmp_path):
    seg = synthetic_case / "BraTS2021_00000_seg.nii.gz"
    incomplete = tmp_path / "BraTS2021_99999"
    incomplete.mkdir()
    for s in ("t1", "t1ce", "t2"):
        source = synthetic_case / f"BraTS2021_00000_{s}.nii.gz"
        (incomplete / f"BraTS2021_99999_{s}.nii.gz").write_bytes(source.read_bytes())
    with pytest.raises(FileNotFoundError, match=r"BraTS2021_99999.*no FLAIR file"):
        vis.visualize(incomplete, seg, tmp_path / "x.png")

    small = tmp_path / "small_flair.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((16, 16, 16), np.int16), np.eye(4)), str(small))
    files = [synthetic_case / f"BraTS2021_00000_{s}.nii.gz" for s in ("t1", "t1ce", "t2")] + [small]
    with pytest.raises(ValueError, match=r"shape mismatch: .*small_flair\.nii\.gz"):
        vis.visualize(",".join(map(str, files)), seg, tmp_path / "x.png")

    with pytest.raises(ValueError, match=r"shape mismatch: prediction .*small_flair\.nii\.gz"):
        vis.visualize(synthetic_case, small, tmp_path / "x.png")
    with pytest.raises(FileNotFoundError, match="missing_seg.nii.gz"):
        vis.visualize(synthetic_case, tmp_path / "missing_seg.nii.gz", tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"4 channels, shape \(X, Y, Z, 4\)"):
        vis.visualize(small, None, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_command_line(synthetic_case, tmp_path, monkeypatch):
    """``python -m custom visualize``, the one command line (no argparse copy in the module)."""
    import custom.__main__

    assert not hasattr(vis, "main") and not hasattr(vis, "build_parser")
    out = tmp_path / "cli.png"
    monkeypatch.setattr("sys.argv", ["custom", "visualize", "--case", str(synthetic_case), "--prediction",
                                     str(synthetic_case / "BraTS2021_00000_seg.nii.gz"), "--output", str(out),
                                     "--label_scheme", "brats2018"])  # fmt: skip
    custom.__main__.main()
    assert out.is_file() and mpimg.imread(str(out)).shape[1] > 900


def test_brats2024_resection_cavity_in_its_own_colour(tmp_path):
    """A brats2024 map (ET 3, RC 4) is detected from its values, and RC is drawn in its own colour exactly where the
    map holds 4: against the same map with its RC voxels relabelled edema (same slices, same legend), every pixel
    that changed is RC-coloured in the first picture and edema-green in the second."""
    case = tmp_path / "data" / synthesize(tmp_path / "data", 1, (32, 32, 32), seed=0, naming="2024")[0]
    seg_path = next(case.glob("*-seg.nii.gz"))
    seg = nib.load(str(seg_path))
    labels = np.asarray(seg.dataobj)
    assert {3, 4} <= set(np.unique(labels).tolist()), "the case needs ET 3 and RC 4"
    no_rc = tmp_path / "relabelled" / seg_path.name  # the same file name: the same title
    no_rc.parent.mkdir()
    nib.save(nib.Nifti1Image(np.where(labels == 4, 2, labels).astype(np.uint8), seg.affine, seg.header), str(no_rc))

    with_rc = mpimg.imread(vis.visualize(case, seg_path, tmp_path / "rc.png"))[..., :3]
    relabelled = mpimg.imread(vis.visualize(case, no_rc, tmp_path / "edema.png", label_scheme="brats2024"))[..., :3]
    assert with_rc.shape == relabelled.shape
    changed = np.abs(with_rc - relabelled).max(axis=-1) > 1e-3
    assert changed.sum() > 200, "the cavity must show in the slices through the labelled voxels"
    rc_pixels = _is_rc_colour(with_rc)
    assert rc_pixels[changed].mean() > 0.97  # the cavity: RC blue where the map holds 4 ...
    r, g, b = relabelled[..., 0], relabelled[..., 1], relabelled[..., 2]
    assert ((g - r > 0.3) & (g - b > 0.3))[changed].mean() > 0.97  # ... drawn as edema once relabelled
    assert rc_pixels[~changed].sum() > 0  # the legend's "4 resection cavity" patch (in both pictures)
    for colour in ("red", "green", "yellow"):  # NETC 1, SNFH 2 and ET 3 still drawn
        assert _colour_fraction(with_rc, colour) > 1e-4, colour

    # the overlay itself: RC's colour on exactly the voxels labelled 4, ET's on those labelled 3
    rgba = vis._overlay(labels, SCHEMES["brats2024"])
    assert np.array_equal(np.all(np.isclose(rgba[..., :3], vis.COLOURS["rc"]), axis=-1), labels == 4)
    assert np.array_equal(np.all(np.isclose(rgba[..., :3], vis.COLOURS["et"]), axis=-1), labels == 3)
    assert np.array_equal(rgba[..., 3] > 0, labels > 0)
    # without the scheme's RC (brats2023 reading) a 4 is no label: a clear error, not a silent picture
    with pytest.raises(ValueError, match=r"label values \[4\] are not labels of brats2023.*label_scheme"):
        vis.visualize(case, seg_path, tmp_path / "bad.png", label_scheme="brats2023")
