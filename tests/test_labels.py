"""Tests of custom.core.labels: the three BraTS label schemes, detection, and the label <-> region conversions."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from custom.core.labels import (
    SCHEMES,
    LabelsToRegionsd,
    allowed_labels,
    detect_label_scheme,
    get_scheme,
    regions_to_labels,
    resolve_label_scheme,
)
from monai.data import MetaTensor
from monai.transforms import ConvertToMultiChannelBasedOnBratsClassesd


def test_the_three_schemes():
    s18, s23, s24 = SCHEMES["brats2018"], SCHEMES["brats2023"], SCHEMES["brats2024"]
    assert (s18.allowed_labels, s18.et_label, s18.regions, s18.out_channels) == ((0, 1, 2, 4), 4, ("tc", "wt", "et"), 3)
    assert (s23.allowed_labels, s23.et_label, s23.regions, s23.out_channels) == ((0, 1, 2, 3), 3, ("tc", "wt", "et"), 3)
    assert (s24.allowed_labels, s24.et_label, s24.rc_label) == ((0, 1, 2, 3, 4), 3, 4)
    assert s24.regions == ("tc", "wt", "et", "rc") and s24.out_channels == 4
    # RC is not tumor: in no tumor region (as in brats-evaluation's glioma config)
    assert s24.region_labels == {"tc": (1, 3), "wt": (1, 2, 3), "et": (3,), "rc": (4,)}
    assert get_scheme().name == "brats2018"  # the paper's setting stays the default


def test_et_label_keeps_working_and_contradictions_are_errors():
    assert get_scheme(None, et_label=3).name == "brats2023"
    assert get_scheme("brats2018", et_label=3).name == "brats2023"
    assert get_scheme("brats2023", et_label=4).name == "brats2018"
    assert get_scheme("BraTS2024", et_label=3).name == "brats2024"
    assert allowed_labels(et_label=4) == (0, 1, 2, 4)
    with pytest.raises(ValueError, match="contradicts label_scheme brats2024"):
        get_scheme("brats2024", et_label=4)
    with pytest.raises(ValueError, match="brats2018, brats2023, brats2024"):
        get_scheme("brats2019")


@pytest.mark.parametrize("name", ["brats2018", "brats2023"])
def test_labels_to_regions_equals_monai_for_the_schemes_without_rc(name):
    scheme = SCHEMES[name]
    rng = np.random.default_rng(0)
    labels = rng.choice(scheme.allowed_labels, size=(1, 9, 8, 7)).astype(np.float32)
    data = {"label": MetaTensor(torch.from_numpy(labels), meta={"filename_or_obj": "x.nii.gz"})}
    ours = LabelsToRegionsd("label", label_scheme=name)(dict(data))["label"]
    monai = ConvertToMultiChannelBasedOnBratsClassesd("label", et_label=scheme.et_label)(dict(data))["label"]
    assert ours.shape == monai.shape == (3, 9, 8, 7)
    assert ours.dtype == monai.dtype == torch.bool and torch.equal(ours, monai)
    assert isinstance(ours, MetaTensor) and ours.meta["filename_or_obj"] == "x.nii.gz"


def test_brats2024_regions_by_hand():
    labels = torch.tensor([0, 1, 2, 3, 4]).reshape(1, 5, 1, 1)
    regions = LabelsToRegionsd("label", label_scheme="brats2024")({"label": labels})["label"][:, :, 0, 0]
    #                                  0  1  2  3  4
    assert regions.int().tolist() == [[0, 1, 0, 1, 0],  # TC
                                      [0, 1, 1, 1, 0],  # WT
                                      [0, 0, 0, 1, 0],  # ET
                                      [0, 0, 0, 0, 1]]  # RC  # fmt: skip


@pytest.mark.parametrize("name", ["brats2018", "brats2023", "brats2024"])
@pytest.mark.parametrize("as_tensor", [True, False])
def test_regions_to_labels_inverts_labels_to_regions(name, as_tensor):
    scheme = SCHEMES[name]
    labels = np.random.default_rng(1).choice(scheme.allowed_labels, size=(6, 5, 4)).astype(np.uint8)
    regions = LabelsToRegionsd("l", label_scheme=name)({"l": torch.from_numpy(labels) if as_tensor else labels})["l"]
    back = regions_to_labels(regions, name)
    assert isinstance(back, torch.Tensor) == as_tensor and back.dtype in (torch.uint8, np.uint8)
    assert np.array_equal(np.asarray(back), labels)
    # the scheme's own methods are the same conversions
    assert np.array_equal(np.asarray(scheme.to_regions(labels)), np.asarray(regions))
    assert np.array_equal(np.asarray(scheme.to_labels(scheme.to_regions(labels))), labels)
    masks = scheme.region_masks(labels)
    assert list(masks) == list(scheme.regions)
    assert all(np.array_equal(masks[r], np.asarray(regions)[i]) for i, r in enumerate(scheme.regions))


def test_rc_is_written_outside_the_tumor_only_and_et_threshold():
    regions = np.zeros((4, 3, 3, 1), bool)
    regions[1, 0, :] = True  # WT: first row
    regions[2, 0, 0] = True  # ET: one voxel
    regions[3, :2, :] = True  # RC predicted over the first two rows: the tumor row wins
    labels = regions_to_labels(regions, "brats2024")[:, :, 0]
    assert labels.tolist() == [[3, 2, 2], [4, 4, 4], [0, 0, 0]]
    labels = regions_to_labels(regions, "brats2024", et_threshold=2)[:, :, 0]
    assert labels.tolist() == [[1, 2, 2], [4, 4, 4], [0, 0, 0]]  # 1 ET voxel < 2: necrosis
    with pytest.raises(ValueError, match=r"brats2023 expects \(3, H, W, D\) masks in TC, WT, ET order"):
        regions_to_labels(regions, "brats2023")


def _label_file(path, values):
    data = np.zeros((4, 4, 4), np.uint8)
    data.flat[: len(values)] = values
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return str(path)


def test_detection_from_naming_and_rc_voxels(tmp_path):
    # 2018-2021 naming (ET 4): 4 is ET, the files are not even read
    assert detect_label_scheme([str(tmp_path / "missing.nii.gz")], et_label=4).name == "brats2018"
    plain = [_label_file(tmp_path / f"a{i}.nii.gz", [1, 2, 3]) for i in range(2)]
    rc = [_label_file(tmp_path / f"rc{i}.nii.gz", [2, 4]) for i in range(2)]
    assert detect_label_scheme(plain, et_label=3).name == "brats2023"
    # one stray 4 in 2023 data is not a resection cavity (validation reports it); most maps with 4 are 2024 data
    assert detect_label_scheme(plain + rc[:1], et_label=3).name == "brats2023"
    with_rc = plain[:1] + rc
    assert detect_label_scheme(with_rc, et_label=3).name == "brats2024"
    datalist = {"et_label": 3, "training": [{"label": p} for p in with_rc]}
    assert resolve_label_scheme(datalist).name == "brats2024"
    assert resolve_label_scheme(datalist, "brats2023").name == "brats2023"  # explicit wins
    assert resolve_label_scheme({"et_label": 4, "label_scheme": "brats2024", "training": []}).name == "brats2024"
    assert resolve_label_scheme({"training": []}).name == "brats2018"  # empty datalist: the default
