"""Medical Segmentation Decathlon Task01_BrainTumour trees (imagesTr/labelsTr/imagesTs + dataset.json) read natively:
channels by the names of dataset.json's "modality" map, labels by its "labels" map (label scheme ``msd``), its "test"
list as testing. The same synthetic cases written as a BraTS tree and as a decathlon tree give the same image arrays
after the loading transforms and the same TC, WT, ET targets."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from custom.core.labels import SCHEMES, LabelsToRegionsd, get_scheme, resolve_label_scheme, scheme_from_label_names
from custom.core.naming import OrderSequencesd, channel_index_from_modality, sequence_name
from custom.data.datalist import load_datalist
from custom.data.discovery import discover_cases
from custom.data.synthetic import synthesize
from custom.data.transforms import EnsureSequenceChannelsd
from custom.data.validation import inspect_case
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

MSD_MODALITY = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
MSD_LABELS = {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}
MSD_ORDER = ("flair", "t1", "t1c", "t2")  # the sequences of the decathlon's channels 0-3
BRATS2023_TO_MSD = np.array([0, 2, 1, 3], np.uint8)  # 1 NETC -> 2, 2 SNFH (edema) -> 1, 3 ET -> 3


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """The same 3 synthetic cases (32^3) as a BraTS 2023 tree and as a decathlon tree, plus one unlabelled test case
    in imagesTs/."""
    root = tmp_path_factory.mktemp("msd")
    brats = root / "brats"
    ids = synthesize(brats, 3, shape=32, seed=3, naming="2023")
    msd = root / "Task01_BrainTumour"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (msd / sub).mkdir(parents=True)
    suffix = {"t1": "t1n", "t1c": "t1c", "t2": "t2w", "flair": "t2f"}
    training, test = [], []
    for i, case_id in enumerate(ids):
        folder = brats / case_id
        ref = nib.load(str(folder / f"{case_id}-t1n.nii.gz"))
        data = np.stack(
            [np.asanyarray(nib.load(str(folder / f"{case_id}-{suffix[s]}.nii.gz")).dataobj) for s in MSD_ORDER], -1
        )
        name = f"BRATS_{i + 1:03d}.nii.gz"
        sub = "imagesTs" if i == 2 else "imagesTr"
        nib.Nifti1Image(data.astype(np.float32), ref.affine).to_filename(str(msd / sub / name))
        if i == 2:
            test.append(f"./imagesTs/{name}")
            continue
        seg = np.asanyarray(nib.load(str(folder / f"{case_id}-seg.nii.gz")).dataobj)
        nib.Nifti1Image(BRATS2023_TO_MSD[seg], ref.affine).to_filename(str(msd / "labelsTr" / name))
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    (msd / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"macOS resource fork")  # shipped in the real archive
    description = {
        "name": "BRATS",
        "tensorImageSize": "4D",
        "modality": MSD_MODALITY,
        "labels": MSD_LABELS,
        "numTraining": len(training),
        "numTest": len(test),
        "training": training,
        "test": test,
    }
    (msd / "dataset.json").write_text(json.dumps(description, indent=4))
    return brats, msd, ids


def _pipeline(scheme) -> Compose:
    """train.json's loading transforms (base_preprocessing) with the channel order applied."""
    return Compose(
        [
            LoadImaged("image", image_only=True),
            LoadImaged("label", image_only=True, allow_missing_keys=True),
            EnsureSequenceChannelsd("image"),
            OrderSequencesd("image"),
            EnsureChannelFirstd("label", allow_missing_keys=True),
            LabelsToRegionsd("label", label_scheme=scheme, allow_missing_keys=True),
        ]
    )


def test_modality_map_and_label_names():
    assert channel_index_from_modality(MSD_MODALITY) == (1, 2, 3, 0)  # T1 in channel 1, T1c 2, T2 3, FLAIR 0
    assert channel_index_from_modality({"0": "T1", "1": "T1-Gd", "2": "T2", "3": "T2-FLAIR"}) == (0, 1, 2, 3)
    assert [sequence_name(n) for n in ("T1w", "t1gd", "T2w", "FLAIR", "t1ce", "T1n")] == [
        "t1",
        "t1c",
        "t2",
        "flair",
        "t1c",
        "t1",
    ]
    with pytest.raises(ValueError, match="twice"):
        channel_index_from_modality({"0": "FLAIR", "1": "T1w", "2": "T1", "3": "T2w"})
    with pytest.raises(ValueError, match="'DWI', not one of"):
        channel_index_from_modality({"0": "FLAIR", "1": "T1w", "2": "DWI", "3": "T2w"})
    with pytest.raises(ValueError, match="expected a 'modality' map"):
        channel_index_from_modality({"0": "FLAIR", "1": "T1w", "2": "t1gd"})
    assert scheme_from_label_names(MSD_LABELS).name == "msd"
    assert scheme_from_label_names({"0": "background", "1": "NCR", "2": "ED", "4": "ET"}).name == "brats2018"
    assert scheme_from_label_names({"0": "background", "1": "kidney", "2": "tumour"}) is None


def test_msd_scheme_regions_and_written_values():
    msd = SCHEMES["msd"]
    labels = np.array([0, 1, 2, 3], np.uint8).reshape(4, 1, 1)
    regions = msd.to_regions(labels)[:, :, 0, 0].astype(int).tolist()
    assert regions == [[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1]]  # TC {2, 3}, WT {1, 2, 3}, ET {3}
    assert msd.to_labels(msd.to_regions(labels)).ravel().tolist() == [0, 1, 2, 3]  # written back in MSD values
    # small ET becomes the core label (2 in MSD, 1 in BraTS)
    assert msd.to_labels(msd.to_regions(labels), et_threshold=5).ravel().tolist() == [0, 1, 2, 2]
    assert (msd.edema_label, msd.core_label, SCHEMES["brats2023"].edema_label) == (1, 2, 2)
    with pytest.raises(ValueError, match="contradicts label_scheme msd"):
        get_scheme("msd", et_label=4)


@pytest.mark.parametrize("source", ["folder", "dataset.json"])
def test_msd_tree_loads_like_the_brats_tree(trees, source):
    brats, msd, ids = trees
    dl_brats = load_datalist(str(brats))
    dl_msd = load_datalist(str(msd if source == "folder" else msd / "dataset.json"))
    s_brats, s_msd = resolve_label_scheme(dl_brats), resolve_label_scheme(dl_msd)
    assert (s_brats.name, s_msd.name) == ("brats2023", "msd")
    assert dl_msd["et_label"] == 3
    assert [e["case_id"] for e in dl_msd["training"]] == ["BRATS_001", "BRATS_002"]
    assert [e["case_id"] for e in dl_msd["testing"]] == ["BRATS_003"]  # the "test" list / imagesTs
    assert all(e["channel_index"] == [1, 2, 3, 0] for e in dl_msd["training"] + dl_msd["testing"])
    by_id = {e["case_id"]: e for e in dl_brats["training"]}
    for i, entry in enumerate(dl_msd["training"] + dl_msd["testing"]):
        ref = by_id[ids[i]]
        a = _pipeline(s_brats)({k: ref[k] for k in ("image", "label") if i < 2 or k == "image"})
        b = _pipeline(s_msd)({k: v for k, v in entry.items() if k in ("image", "label", "channel_index")})
        assert a["image"].shape == b["image"].shape == (4, 32, 32, 32)
        assert torch.equal(torch.as_tensor(a["image"]), torch.as_tensor(b["image"]).to(a["image"].dtype))
        assert "channel_index" not in b  # consumed: a second OrderSequencesd changes nothing
        if i < 2:
            assert a["label"].shape == b["label"].shape == (3, 32, 32, 32)
            assert bool(a["label"][1].any()) and torch.equal(a["label"], b["label"])
        # the pre-flight reads the decathlon labels and channels the same way
        report = inspect_case(entry, et_label=3, label_scheme=s_msd.name)
        assert report.errors == [], report.problems
    # without the map the channels would be read as T1, T1c, T2, FLAIR: a different image (what the map prevents)
    wrong = _pipeline(s_msd)({"image": dl_msd["training"][0]["image"]})
    ref = _pipeline(s_brats)({"image": by_id[ids[0]]["image"]})
    assert not torch.equal(torch.as_tensor(wrong["image"]), torch.as_tensor(ref["image"]).to(wrong["image"].dtype))


def test_msd_folder_discovery_and_overrides(trees, tmp_path):
    _, msd, _ = trees
    cases = discover_cases(str(msd))
    assert [(c.case_id, c.channel_index, c.label_scheme, c.et_label) for c in cases] == [
        ("BRATS_001", (1, 2, 3, 0), "msd", 3),
        ("BRATS_002", (1, 2, 3, 0), "msd", 3),
        ("BRATS_003", (1, 2, 3, 0), "msd", 3),
    ]
    # an explicit key wins over the detection
    dl = load_datalist(str(msd))
    assert resolve_label_scheme(dl, "brats2023").name == "brats2023"
    raw = json.loads((msd / "dataset.json").read_text())
    raw["label_scheme"] = "brats2023"
    (tmp_path / "dataset.json").write_text(json.dumps(raw))
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (tmp_path / sub).symlink_to(msd / sub)
    assert resolve_label_scheme(load_datalist(str(tmp_path / "dataset.json"))).name == "brats2023"
    # a broken modality map is named with its file
    raw["modality"] = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "ADC"}
    raw.pop("label_scheme")
    (tmp_path / "dataset.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"dataset.json.*'ADC'"):
        load_datalist(str(tmp_path / "dataset.json"))
    with pytest.raises(ValueError, match=r"dataset.json.*'ADC'"):
        discover_cases(str(tmp_path))


def test_inference_on_the_msd_tree_equals_the_brats_tree_in_msd_labels(trees, tmp_path):
    """inference.json on the decathlon folder: channels re-ordered by its modality map, labels written in its values
    (scheme ``msd`` detected from dataset.json); the same segmentation as on the BraTS tree of the same cases."""
    from conftest import CONFIG_DIR, NARROW_NETWORK
    from custom.model.network import CascadedUNet
    from monai.bundle import ConfigWorkflow

    brats, msd, ids = trees
    torch.manual_seed(0)
    checkpoint = tmp_path / "model.pt"
    torch.save(CascadedUNet(init_filters=8, blocks_down=(1, 1, 1, 1)).state_dict(), checkpoint)
    outputs = {}
    for name, source in (("brats", brats), ("msd", msd)):
        workflow = ConfigWorkflow(
            config_file=str(CONFIG_DIR / "inference.json"),
            workflow_type="infer",
            dataset_dir=str(source),
            output_dir=str(tmp_path / name),
            checkpoints=[str(checkpoint)],
            tta=1,
            et_threshold=0,
            **NARROW_NETWORK,
        )
        workflow.initialize()
        assert workflow.parser.get_parsed_content("label_scheme") == ("msd" if name == "msd" else "brats2023")
        workflow.run()
        outputs[name] = sorted((tmp_path / name).glob("*.nii.gz"))
    assert [p.name for p in outputs["msd"]] == ["BRATS_001.nii.gz", "BRATS_002.nii.gz", "BRATS_003.nii.gz"]
    for brats_file, msd_file in zip(outputs["brats"], outputs["msd"]):
        brats_labels = np.asarray(nib.load(str(brats_file)).dataobj)
        msd_labels = np.asarray(nib.load(str(msd_file)).dataobj)
        assert np.count_nonzero(brats_labels) > 0  # a segmentation to compare, not two empty maps
        np.testing.assert_array_equal(msd_labels, BRATS2023_TO_MSD[brats_labels])


def test_train_json_loading_reads_both_trees_alike(trees):
    """train.json's own loading transforms (``base_preprocessing``, with its channel-order step) on the labelled
    cases of both trees: the same normalised images and the same TC, WT, ET targets."""
    from conftest import CONFIG_DIR
    from monai.bundle import ConfigParser

    brats, msd, ids = trees

    def loading(source):
        parser = ConfigParser()
        parser.read_config(str(CONFIG_DIR / "train.json"))
        parser.update({"dataset_dir": str(source)})
        datalist = parser.get_parsed_content("datalist")
        return Compose(parser.get_parsed_content("base_preprocessing")), datalist

    brats_loading, brats_list = loading(brats)
    msd_loading, msd_list = loading(msd)
    by_id = {e["case_id"]: e for e in brats_list["training"]}
    for i, entry in enumerate(msd_list["training"]):
        a, b = brats_loading(dict(by_id[ids[i]])), msd_loading(dict(entry))
        assert torch.equal(torch.as_tensor(a["image"]), torch.as_tensor(b["image"]))
        assert bool(a["label"][1].any()) and torch.equal(torch.as_tensor(a["label"]), torch.as_tensor(b["label"]))
