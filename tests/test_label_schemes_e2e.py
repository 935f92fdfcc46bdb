"""label_scheme brats2024 end to end on a tiny synthetic tree (resection cavity, label 4): detection, validation,
1 epoch with 4 outputs, inference in the input geometry, metrics with the rc region; a stray 4 in 2023 data."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import CONFIG_DIR, TINY_TRAINING
from custom.data.synthetic import case_files, synthesize
from custom.evaluation.folders import evaluate_folder
from monai.bundle import ConfigWorkflow

TINY = {**TINY_TRAINING, "cache": "none"}


def test_brats2024_tree_trains_segments_and_scores_rc(tmp_path):
    dataset = tmp_path / "data"
    ids = synthesize(str(dataset), num_cases=6, shape=(32, 32, 32), seed=1, naming="2024")
    output_dir = tmp_path / "run"
    train = ConfigWorkflow(config_file=str(CONFIG_DIR / "train.json"), workflow_type="train",
                           dataset_dir=str(dataset), output_dir=str(output_dir), **TINY)  # fmt: skip
    train.initialize()
    assert train.parser.get_parsed_content("label_scheme") == "brats2024"  # detected: RC voxels in 2023+ naming
    assert train.parser.get_parsed_content("network_def#out_channels") == 4
    train.run()  # validation accepted label 4, one epoch ran
    assert train.parser.get_parsed_content("train#trainer").state.epoch == 1
    network = train.parser.get_parsed_content("network")
    with torch.no_grad():
        out = network.eval()(torch.zeros(1, 4, 32, 32, 32))
    assert out.shape[1] == 4  # TC, WT, ET, RC
    train.finalize()

    predictions = tmp_path / "pred"
    infer = ConfigWorkflow(
        config_file=str(CONFIG_DIR / "inference.json"), workflow_type=None, dataset_dir=str(dataset),
        output_dir=str(predictions), checkpoints=[str(output_dir / "models" / "model.pt")], tta=1,
        label_scheme="brats2024", **{k: v for k, v in TINY.items() if k.startswith("network_def")},
    )  # fmt: skip
    infer.initialize()
    infer.run()
    for cid in ids:
        written = nib.load(str(predictions / f"{cid}.nii.gz"))
        source = nib.load(str(case_files(dataset / cid, "2024")["t1"]))
        assert written.shape == source.shape and np.allclose(written.affine, source.affine)
        assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2, 3, 4}
    table = evaluate_folder(str(predictions), str(dataset), str(tmp_path / "m.csv"))  # scheme detected from the refs
    assert {"dice_rc", "hd95_rc", "sensitivity_rc", "specificity_rc"} <= set(table[0])
    assert len(table) == len(ids) + 5


def test_a_stray_label_4_in_2023_data_is_still_rejected(tmp_path):
    dataset = tmp_path / "data"
    ids = synthesize(str(dataset), num_cases=6, shape=(32, 32, 32), seed=1, naming="2023")
    seg_path = case_files(dataset / ids[2], "2023")["seg"]
    seg = nib.load(str(seg_path))
    data = np.asarray(seg.dataobj).copy()
    data[0, 0, 0] = 4
    nib.save(nib.Nifti1Image(data, seg.affine, seg.header), str(seg_path))
    train = ConfigWorkflow(config_file=str(CONFIG_DIR / "train.json"), workflow_type="train",
                           dataset_dir=str(dataset), output_dir=str(tmp_path / "run"), **TINY)  # fmt: skip
    train.initialize()
    assert train.parser.get_parsed_content("label_scheme") == "brats2023"  # one map with 4 is not 2024 data
    with pytest.raises((ValueError, SystemExit)) as failure:
        train.parser.get_parsed_content("train#data")
    assert ids[2] in str(failure.value) and "label_scheme brats2024" in str(failure.value)
