import nibabel as nib
import numpy as np
import pytest
import torch
from custom.core.labels import regions_to_labels
from custom.data.transforms import BrainMaskd, CanonicalGeometryd, EnsureSequenceChannelsd
from monai.data import MetaTensor
from monai.transforms import ConvertToMultiChannelBasedOnBratsClasses, LoadImaged


@pytest.mark.parametrize("et_label", [4, 3])
def test_label_conversion_for_et_label(et_label):
    labels = torch.tensor([0, 1, 2, et_label]).reshape(1, 4, 1, 1)
    tc, wt, et = ConvertToMultiChannelBasedOnBratsClasses(et_label=et_label)(labels)
    assert tc.flatten().tolist() == [False, True, False, True]
    assert wt.flatten().tolist() == [False, True, True, True]
    assert et.flatten().tolist() == [False, False, False, True]


@pytest.mark.parametrize("et_label", [4, 3])
def test_regions_to_labels_and_et_threshold(et_label):
    regions = np.zeros((3, 4, 4, 4), bool)
    regions[1, :2] = True  # WT
    regions[0, 0, :2] = True  # TC
    regions[2, 0, 0, :2] = True  # ET: 2 voxels inside TC
    regions[2, 3, 3, 3] = True  # ET outside WT: kept, the union restores nesting
    labels = regions_to_labels(regions, et_label=et_label)
    assert labels.dtype == np.uint8
    # WT = 32 + 1 voxels, TC = 8 + 1, ET = 3: labels 2, 1 and ET count the differences
    assert (labels == et_label).sum() == 3 and labels[3, 3, 3] == et_label
    assert (labels == 1).sum() == 6 and (labels == 2).sum() == 24
    assert set(np.unique(labels)) == {0, 1, 2, et_label}
    # below the threshold the ET voxels become necrosis (label 1), others unchanged
    small = regions_to_labels(regions, et_label=et_label, et_threshold=4)
    assert (small == et_label).sum() == 0 and (small == 1).sum() == 9
    assert np.array_equal(regions_to_labels(regions, et_label=et_label, et_threshold=3), labels)
    assert np.array_equal(small == 2, labels == 2)
    # tensors in, tensors out
    assert torch.equal(regions_to_labels(torch.from_numpy(regions), et_label=et_label), torch.from_numpy(labels))


def _save(path, array):
    nib.save(nib.Nifti1Image(array, np.diag([-1.0, -1.0, 1.0, 1.0])), str(path))
    return str(path)


def test_sequence_channels_from_files_and_4d_layouts(tmp_path):
    volumes = [np.full((8, 6, 5), i + 1, np.float32) for i in range(4)]
    files = [_save(tmp_path / f"s{i}.nii.gz", v) for i, v in enumerate(volumes)]
    last = _save(tmp_path / "last.nii.gz", np.stack(volumes, -1))
    first = _save(tmp_path / "first.nii.gz", np.stack(volumes, 0))
    loader, ensure = LoadImaged("image"), EnsureSequenceChannelsd("image")
    for source in (files, last, first):
        image = ensure(loader({"image": source}))["image"]
        assert image.shape == (4, 8, 6, 5), source
        assert [float(image[c].mean()) for c in range(4)] == [1, 2, 3, 4]
    three = _save(tmp_path / "three.nii.gz", np.stack(volumes[:3], -1))
    with pytest.raises(ValueError, match=r"three.nii.gz.*\(H, W, D, 4\)"):
        ensure(loader({"image": three}))
    with pytest.raises(ValueError, match="expected 4 sequences"):
        ensure(loader({"image": files[:3]}))


def _image(array, affine):
    return MetaTensor(torch.as_tensor(array, dtype=torch.float32), affine=torch.as_tensor(affine, dtype=torch.float64))


def test_canonical_geometry_skips_a_case_already_on_the_grid_and_inverts_what_it_did():
    torch.manual_seed(0)
    volume = torch.rand(2, 6, 5, 4) + 1
    brats = np.diag([-1.0, -1.0, 1.0, 1.0])
    geometry = CanonicalGeometryd("image")  # LPS, 1 mm, tolerance 0.01 mm
    for affine in (brats, np.diag([-1.004, -0.996, 1.0, 1.0])):  # within the tolerance: not resampled
        image = _image(volume, affine)
        out = geometry({"image": image})["image"]
        assert torch.equal(out.as_tensor(), volume) and np.allclose(out.affine, affine)
        assert out.applied_operations[-1]["extra_info"]["applied"] == ["orientation"]
        assert "SpatialResample" not in [op["class"] for op in out.applied_operations]
    # another orientation and voxel size: reoriented exactly, then resampled; the inverse gives back the grid
    ras = np.diag([2.0, 1.0, 1.0, 1.0])
    out = geometry({"image": _image(volume, ras)})["image"]
    assert out.applied_operations[-1]["extra_info"] == {
        "applied": ["orientation", "spacing"],
        "stored_spacing": [2, 1, 1],
    }
    assert nib.aff2axcodes(out.affine.numpy()) == ("L", "P", "S") and np.allclose(out.pixdim, 1)
    assert out.shape[1:] == (11, 5, 4) and out.is_contiguous()
    back = geometry.inverse({"image": out})["image"]
    assert back.shape == volume.shape and np.allclose(back.affine, ras) and not back.applied_operations
    # null keys keep the stored geometry: nothing happens
    keep = CanonicalGeometryd("image", orientation=None, pixdim=None)({"image": _image(volume, ras)})["image"]
    assert torch.equal(keep.as_tensor(), volume) and keep.applied_operations[-1]["extra_info"]["applied"] == []
    # an interpolated image keeps an exact zero background: the brain mask is resampled nearest
    blob = torch.zeros(1, 8, 8, 8)
    blob[0, 2:6, 2:6, 2:6] = 100.0
    fine = CanonicalGeometryd("image", pixdim=0.5)({"image": _image(blob, brats)})["image"]
    assert (fine == 0).sum() == fine.numel() - 8**3 and fine.max() == 100
    with pytest.raises(ValueError, match="target_spacing"):
        CanonicalGeometryd("image", pixdim=[1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="orientation"):
        CanonicalGeometryd("image", orientation="RA")
    with pytest.raises(TypeError, match="MetaTensor"):
        geometry({"image": volume})


def test_brain_mask_is_the_union_of_the_non_zero_voxels_of_the_sequences():
    image = torch.zeros(4, 3, 3, 3)
    image[0, 0, 0, 0], image[3, 2, 2, 2], image[1, 1, 1, 1] = 5.0, -1.0, 0.5
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    mask = BrainMaskd("image")({"image": _image(image, affine)})["brain_mask"]
    assert mask.shape == (1, 3, 3, 3) and mask.dtype == torch.bool and np.allclose(mask.affine, affine)
    assert mask.sum() == 3 and mask[0, 0, 0, 0] and mask[0, 2, 2, 2] and mask[0, 1, 1, 1]
