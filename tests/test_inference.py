"""Flip TTA, checkpoint ensembles, and the inference config on the real BraTS case."""

import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from conftest import CONFIG_DIR
from custom.inference import FLIP_DIMS, CheckpointEnsemble, FlipTTAInferer, load_network
from custom.network import CascadedUNet


class PositionNet(torch.nn.Module):
    """Not flip-equivariant: the output depends on where a voxel is, not only on its neighbourhood."""

    def forward(self, x):
        h, w, d = x.shape[2:]
        ramp = (
            torch.linspace(0, 1, h)[:, None, None] + 2 * torch.linspace(0, 1, w)[None, :, None]
            + 3 * torch.linspace(0, 1, d)[None, None, :]
        )
        return x[:, :3] * ramp + torch.roll(x[:, 1:4], shifts=1, dims=2)


def test_flip_tta_inverts_each_flip():
    torch.manual_seed(0)
    x, net = torch.randn(1, 4, 6, 5, 4), PositionNet()
    expected = torch.zeros(1, 3, 6, 5, 4)
    for dims in FLIP_DIMS:  # by hand: flip, predict, flip back, average probabilities
        flipped = torch.flip(x, dims) if dims else x
        out = torch.sigmoid(net(flipped))
        expected += torch.flip(out, dims) if dims else out
    expected /= 8
    for chunk in (1, 3, 8):
        assert torch.allclose(FlipTTAInferer(8, chunk_size=chunk)(x, net), expected, atol=1e-6)
    assert torch.allclose(FlipTTAInferer(1)(x, net), torch.sigmoid(net(x)))
    # the network is not flip-equivariant, so skipping the flip back would give another answer
    assert not torch.allclose(FlipTTAInferer(2)(x, net), torch.sigmoid(net(x)), atol=1e-3)
    with pytest.raises(ValueError, match="between 1 and 8"):
        FlipTTAInferer(9)


def test_ensemble_of_two_checkpoints_is_the_mean_of_both(tmp_path):
    torch.manual_seed(0)
    nets = [CascadedUNet(init_filters=8, blocks_down=(1, 1, 1, 1)).eval() for _ in range(2)]
    paths = []
    for i, net in enumerate(nets):
        paths.append(str(tmp_path / f"m{i}.pt"))
        torch.save({"model": net.state_dict(), "epoch": i}, paths[-1])  # a training snapshot
    x = torch.randn(1, 4, 16, 16, 16)
    inferer = FlipTTAInferer(2)
    with torch.no_grad():
        singles = [inferer(x, net) for net in nets]
        ensemble = load_network(CascadedUNet(init_filters=8, blocks_down=(1, 1, 1, 1), trilinear_decoder=False), paths)
        assert isinstance(ensemble, CheckpointEnsemble) and not ensemble.training
        assert torch.allclose(inferer(x, ensemble), (singles[0] + singles[1]) / 2, atol=1e-5)


def test_missing_or_incompatible_checkpoint_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        load_network(CascadedUNet(init_filters=8), [str(tmp_path / "nothere.pt")])
    torch.save(CascadedUNet(init_filters=8).state_dict(), tmp_path / "eight.pt")
    with pytest.raises(RuntimeError, match="eight.pt.*network_def"):
        load_network(CascadedUNet(init_filters=16), [str(tmp_path / "eight.pt")])


def _inference_workflow(dataset_dir, output_dir, checkpoint, **overrides):
    workflow = ConfigWorkflow(
        config_file=str(CONFIG_DIR / "inference.json"),
        workflow_type="infer",
        dataset_dir=str(dataset_dir),
        output_dir=str(output_dir),
        checkpoints=[str(checkpoint)],
        tta=1,
        **{"network_def#init_filters": 8, "network_def#blocks_down": [1, 1, 1, 1]},
        **overrides,
    )
    workflow.initialize()
    return workflow


def test_inference_config_on_the_real_case(real_case, tmp_path):
    checkpoint = tmp_path / "model.pt"
    torch.manual_seed(0)
    torch.save(CascadedUNet(init_filters=8, blocks_down=(1, 1, 1, 1)).state_dict(), checkpoint)
    # a good case and two broken ones: a truncated file and a missing sequence
    data = tmp_path / "cases"
    shutil.copytree(real_case, data / real_case.name)
    broken = data / "BraTS-GLI-00002-000"
    shutil.copytree(real_case, broken)
    for path in broken.iterdir():
        path.rename(broken / path.name.replace("00001", "00002"))
    t1c = broken / "BraTS-GLI-00002-000-t1c.nii.gz"
    t1c.write_bytes(t1c.read_bytes()[: t1c.stat().st_size // 3])
    missing = data / "BraTS-GLI-00003-000"
    missing.mkdir()
    for name in ("t1n", "t1c", "t2w"):
        shutil.copy(real_case / f"BraTS-GLI-00001-000-{name}.nii.gz", missing / f"BraTS-GLI-00003-000-{name}.nii.gz")

    workflow = _inference_workflow(data, tmp_path / "out", checkpoint)
    assert workflow.check_properties() == []
    with pytest.raises(RuntimeError) as failure:
        workflow.run()
    message = str(failure.value.__cause__ or failure.value)  # the config parser wraps the run's error
    assert "BraTS-GLI-00002-000: EOFError" in message  # the truncated .nii.gz
    assert "BraTS-GLI-00003-000: ValueError: missing flair" in message
    assert "BraTS-GLI-00001-000" not in message
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["BraTS-GLI-00001-000.nii.gz"]  # no partial file of a failed case either

    prediction = nib.load(tmp_path / "out" / "BraTS-GLI-00001-000.nii.gz")
    source = nib.load(real_case / "BraTS-GLI-00001-000-t1n.nii.gz")
    assert prediction.shape == source.shape
    np.testing.assert_allclose(prediction.affine, source.affine)
    assert nib.aff2axcodes(prediction.affine) == nib.aff2axcodes(source.affine) == ("L", "P", "S")
    assert prediction.get_data_dtype() == np.uint8
    labels = np.asarray(prediction.dataobj)
    assert set(np.unique(labels)) <= {0, 1, 2, 3}  # BraTS 2023 naming: ET written as 3
    # the crop to the brain was put back in place: far outside the brain's box (margin 8, padding to a
    # multiple of 8) nothing can be predicted
    rows = np.flatnonzero(np.any(np.asarray(source.dataobj) != 0, axis=(1, 2)))
    assert labels.any()
    assert not labels[: max(rows[0] - 16, 0)].any() and not labels[rows[-1] + 17 :].any()
