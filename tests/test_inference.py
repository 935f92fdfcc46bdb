"""Flip TTA, checkpoint ensembles, and the inference config on the real BraTS case."""

import copy

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import CONFIG_DIR, NARROW_NETWORK
from custom.data.synthetic import synthesize
from custom.inference.ensemble import SnapshotFlipEnsemble, plan_passes
from custom.inference.inferer import FLIP_DIMS, BratsPredictionWriter, FlipTTAInferer, RestrictToBraind
from custom.model.checkpoints import EpochSnapshotSaver
from custom.model.network import CascadedUNet
from ignite.engine import Engine, Events
from monai.bundle import ConfigWorkflow
from monai.data import MetaTensor

SMALL = {"init_filters": 8, "blocks_down": (1, 1, 1, 1)}


class PositionNet(torch.nn.Module):
    """Not flip-equivariant: the output depends on where a voxel is, not only on its neighbourhood."""

    def forward(self, x):
        h, w, d = x.shape[2:]
        ramp = (
            torch.linspace(0, 1, h)[:, None, None]
            + 2 * torch.linspace(0, 1, w)[None, :, None]
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
    network_def = CascadedUNet(init_filters=8, blocks_down=(1, 1, 1, 1), trilinear_decoder=False)
    with torch.no_grad():
        singles = [inferer(x, net) for net in nets]
        ensemble = SnapshotFlipEnsemble(network_def, paths, "all", tta=2).load()  # one snapshot set per file
        assert len(ensemble.members) == 2 and not ensemble.training and ensemble.n_passes == 4
        mean = (singles[0] + singles[1]) / 2
        assert torch.allclose(inferer(x, ensemble), mean, atol=1e-5)
        # its forward is the logit of the mean probability: it stands in wherever one network's logits are expected
        assert torch.allclose(torch.sigmoid(ensemble(x)), mean.clamp(1e-6, 1 - 1e-6), atol=1e-5)


def test_missing_or_incompatible_checkpoint_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        SnapshotFlipEnsemble(CascadedUNet(init_filters=8), [str(tmp_path / "nothere.pt")]).load()
    torch.save(CascadedUNet(init_filters=8).state_dict(), tmp_path / "eight.pt")
    ensemble = SnapshotFlipEnsemble(CascadedUNet(init_filters=16), [str(tmp_path / "eight.pt")])
    with pytest.raises(RuntimeError, match="eight.pt.*network_def"):
        ensemble.load()
    assert not ensemble.loaded and len(ensemble.members) == 0  # a failed load leaves the ensemble empty


def _train_snapshots(folder, n_epochs, n_saved=8, seed=0):
    """Snapshots written by training's own ``EpochSnapshotSaver``, one per epoch, of a network whose weights change
    every epoch (so every snapshot is another network); returns copies of the networks, oldest first."""
    torch.manual_seed(seed)
    net, nets = CascadedUNet(**SMALL), []

    def perturb(engine, batch):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.2 * torch.randn_like(p))

    engine = Engine(perturb)
    EpochSnapshotSaver(str(folder), {"model": net}, n_saved=n_saved).attach(engine)
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: nets.append(copy.deepcopy(net).eval()))
    engine.run([0], max_epochs=n_epochs)
    return nets


def _hand_mean(x, pairs):
    """Mean over (network, flip dims) pairs of sigmoid(network(flip(x))) flipped back, written out."""
    total = torch.zeros(x.shape[0], 3, *x.shape[2:])
    for net, dims in pairs:
        out = torch.sigmoid(net(torch.flip(x, dims) if dims else x))
        total += torch.flip(out, dims) if dims else out
    return total / len(pairs)


def _count_passes(ensemble):
    """Records the input of every forward call of every member network."""
    seen = [[] for _ in ensemble.members]
    for i, member in enumerate(ensemble.members):
        member.register_forward_hook(lambda module, args, out, i=i: seen[i].append(args[0].clone()))
    return seen


def test_paper_ensemble_runs_snapshot_i_on_flip_i(tmp_path):
    nets = _train_snapshots(tmp_path / "models", n_epochs=10)  # 10 epochs, the last 8 snapshots kept
    last8 = nets[2:]
    x = torch.randn(1, 4, 16, 16, 16)
    network_def = CascadedUNet(**SMALL, trilinear_decoder=False)
    ensemble = SnapshotFlipEnsemble(network_def, [str(tmp_path / "models")], "paper", tta=8, n_snapshots=8).load()
    assert [p.rsplit("=", 1)[1] for p in ensemble.paths] == [f"{e}.pt" for e in range(3, 11)]  # oldest first
    seen = _count_passes(ensemble)
    with torch.no_grad():
        probabilities = FlipTTAInferer(8)(x, ensemble)  # inference.json's inferer hands the ensemble its input
        expected = _hand_mean(x, list(zip(last8, FLIP_DIMS)))
        assert torch.allclose(probabilities, expected, atol=1e-5)
        # exactly 8 forward passes: snapshot i once, on flip i
        assert [len(calls) for calls in seen] == [1] * 8
        for i, (calls, dims) in enumerate(zip(seen, FLIP_DIMS)):
            assert torch.equal(calls[0], torch.flip(x, dims) if dims else x), i
        # the pairing matters: snapshot i on another flip gives another answer
        assert not torch.allclose(probabilities, _hand_mean(x, list(zip(last8, FLIP_DIMS[::-1]))), atol=1e-4)
        # the ensemble as a network: its logits are those of the mean probability
        assert torch.allclose(torch.sigmoid(ensemble(x)), expected, atol=1e-5)


def test_all_and_best_and_fewer_snapshots_than_flips(tmp_path):
    nets = _train_snapshots(tmp_path / "run", n_epochs=3)
    best = CascadedUNet(**SMALL, trilinear_decoder=False).eval()
    torch.save(best.state_dict(), tmp_path / "run" / "model.pt")
    network_def = CascadedUNet(**SMALL, trilinear_decoder=False)
    x = torch.randn(1, 4, 16, 16, 16)
    folder = [str(tmp_path / "run")]
    with torch.no_grad():
        paper = SnapshotFlipEnsemble(network_def, folder, "paper", tta=4).load()
        seen = _count_passes(paper)
        # 3 snapshots for 4 flips: every flip once, snapshot i mod 3 on flip i (the first snapshot sees 2 flips)
        expected = _hand_mean(x, [(nets[i % 3], FLIP_DIMS[i]) for i in range(4)])
        assert torch.allclose(paper.probabilities(x), expected, atol=1e-5)
        assert [sum(call.shape[0] for call in calls) for calls in seen] == [2, 1, 1]
        every = SnapshotFlipEnsemble(network_def, folder, "all", tta=2).load()
        assert every.n_passes == 6 and "model.pt" not in " ".join(every.paths)
        expected = _hand_mean(x, [(n, d) for n in nets for d in FLIP_DIMS[:2]])
        assert torch.allclose(every.probabilities(x), expected, atol=1e-5)
        chosen = SnapshotFlipEnsemble(network_def, folder, "best", tta=4).load()
        assert chosen.paths == [str(tmp_path / "run" / "model.pt")] and chosen.n_passes == 4
        assert torch.allclose(chosen.probabilities(x), _hand_mean(x, [(best, d) for d in FLIP_DIMS[:4]]), atol=1e-5)
    # several trainings or folds: one snapshot set each, each with its own snapshot-flip pairs
    sets = [["a/snapshot_epoch=1.pt", "a/snapshot_epoch=2.pt"], ["b/model.pt"]]
    expected = [(sets[0][0], ()), (sets[0][1], (2,)), ("b/model.pt", ()), ("b/model.pt", (2,))]
    assert plan_passes(sets, "paper", tta=2) == expected
    assert len(plan_passes([["s"] * 8], "paper", tta=1)) == 8  # more snapshots than flips: every snapshot once


def test_inference_config_checks_without_weights_and_says_how_to_get_them(tmp_path):
    empty = tmp_path / "models"
    empty.mkdir()
    for checkpoints in (None, [str(empty)]):  # the bundle's own models/ (no weights committed), an empty folder
        overrides = {"dataset_dir": str(tmp_path / "cases"), "output_dir": str(tmp_path / "out")}
        if checkpoints:
            overrides["checkpoints"] = checkpoints
        workflow = ConfigWorkflow(config_file=str(CONFIG_DIR / "inference.json"), workflow_type="infer", **overrides)
        workflow.initialize()
        assert workflow.check_properties() == []
        with pytest.raises(SystemExit) as failure:  # a clean exit with one message, no traceback
            workflow.run()
        assert "train first or pass --checkpoints" in str(failure.value)
    assert (CONFIG_DIR.parent / "models" / "README.md").is_file()


def test_checkpoint_with_the_old_preactivated_head_says_which_option_loads_it(tmp_path):
    torch.save(CascadedUNet(**SMALL, preactivated_head=True).state_dict(), tmp_path / "old.pt")
    with pytest.raises(RuntimeError, match="old.pt.*network_def#preactivated_head` to true"):
        SnapshotFlipEnsemble(CascadedUNet(**SMALL), [str(tmp_path / "old.pt")]).load()
    old_head = CascadedUNet(**SMALL, preactivated_head=True)
    assert SnapshotFlipEnsemble(old_head, [str(tmp_path / "old.pt")], tta=1).load().n_passes == 1


def test_evaluate_config_by_default_scores_the_last_snapshots_not_the_best_model(tmp_path):
    data, output_dir = tmp_path / "data", tmp_path / "run"
    synthesize(str(data), num_cases=6, shape=(32, 32, 32), seed=3)
    _train_snapshots(output_dir / "models", n_epochs=2)
    # model.pt was selected on this fold's cases; by default evaluation must not even read it
    (output_dir / "models" / "model.pt").write_bytes(b"the best-validation model, selected on the scored fold")
    settings = {
        "dataset_dir": str(data),
        "output_dir": str(output_dir),
        "tta": 1,
        "num_folds": 3,
        "num_workers": 0,
        **NARROW_NETWORK,
    }
    configs = [str(CONFIG_DIR / "train.json"), str(CONFIG_DIR / "evaluate.json")]
    evaluation = ConfigWorkflow(config_file=configs, workflow_type=None, **settings)
    evaluation.initialize()
    evaluation.run()
    network = evaluation.parser.get_parsed_content("evaluate#segmenter").network
    assert [p.rsplit("/", 1)[1] for p in network.paths] == ["snapshot_epoch=1.pt", "snapshot_epoch=2.pt"]
    rows = (output_dir / "eval" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("case_id") and len(rows) > 6
    evaluation.finalize()
    # `best` stays possible, and its results say the weights were selected on the fold they score
    best = ConfigWorkflow(config_file=configs, workflow_type=None, ensemble="best", **settings)
    best.initialize()
    assert best.parser.get_parsed_content("evaluate#metrics_csv") == str(
        output_dir / "eval_best" / "metrics_best_model_selected_on_fold0.csv"
    )
    with pytest.raises(RuntimeError, match="model.pt"):  # it does read model.pt (here not a checkpoint)
        best.parser.get_parsed_content("evaluate#segmenter").network.load()


def _inference_workflow(dataset_dir, output_dir, checkpoint, **overrides):
    workflow = ConfigWorkflow(
        config_file=str(CONFIG_DIR / "inference.json"),
        workflow_type="infer",
        dataset_dir=str(dataset_dir),
        output_dir=str(output_dir),
        checkpoints=[str(checkpoint)],
        tta=1,
        **NARROW_NETWORK,
        **overrides,
    )
    workflow.initialize()
    return workflow


def test_inference_config_on_the_real_case(real_case, tmp_path):
    checkpoint = tmp_path / "model.pt"
    torch.manual_seed(0)
    torch.save(CascadedUNet(init_filters=8, blocks_down=(1, 1, 1, 1)).state_dict(), checkpoint)
    # a good case and two broken ones in the same naming: a truncated T1c and a missing FLAIR
    data, case_id = tmp_path / "cases", real_case.case_id
    cases = {case_id: real_case.images, "truncated": real_case.images, "incomplete": real_case.images[:3]}
    for name, images in cases.items():
        (data / name).mkdir(parents=True)
        for image in images:
            (data / name / image.name.replace(case_id, name, 1)).symlink_to(image)
    t1c = data / "truncated" / real_case.images[1].name.replace(case_id, "truncated", 1)
    t1c.unlink()
    t1c.write_bytes(real_case.images[1].read_bytes()[: real_case.images[1].stat().st_size // 3])

    workflow = _inference_workflow(data, tmp_path / "out", checkpoint)
    assert workflow.check_properties() == []
    with pytest.raises(SystemExit) as failure:  # a clean non-zero exit, after the good case was written
        workflow.run()
    message = str(failure.value)
    truncated = next(line for line in message.splitlines() if "truncated" in line)
    assert t1c.name in truncated  # the file at fault is named, not only the case
    assert "EOFError" in truncated or not t1c.name.endswith(".gz")  # a cut .nii.gz
    assert "incomplete: ValueError: missing flair" in message
    assert case_id not in message
    written = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name != ".lock")  # the run's output lock
    assert written == [f"{case_id}.nii.gz", "volumes.csv"]  # no partial file of a failed case either

    prediction = nib.load(tmp_path / "out" / f"{case_id}.nii.gz")
    source = nib.load(real_case.images[0])
    assert prediction.shape == source.shape
    np.testing.assert_allclose(prediction.affine, source.affine)
    assert nib.aff2axcodes(prediction.affine) == nib.aff2axcodes(source.affine)
    assert prediction.get_data_dtype() == np.uint8
    labels = np.asarray(prediction.dataobj)
    assert set(np.unique(labels)) <= {0, 1, 2, real_case.et_label}  # ET written as the case's naming says
    # the crop to the brain was put back in place: far outside the brain's box (margin 8, padding to a
    # multiple of 8) nothing can be predicted
    rows = np.flatnonzero(np.any(np.asarray(source.dataobj) != 0, axis=(1, 2)))
    assert labels.any()
    assert not labels[: max(rows[0] - 16, 0)].any() and not labels[rows[-1] + 17 :].any()
    # and no label outside the brain: the voxels that are zero in every sequence
    brain = np.any([np.asarray(nib.load(path).dataobj) != 0 for path in real_case.images], axis=0)
    assert not labels[~brain].any() and labels[brain].any()


def test_no_label_outside_the_brain_and_no_output_off_the_input_grid(tmp_path):
    brain = torch.zeros(1, 4, 4, 4, dtype=torch.bool)
    brain[0, 1:3, 1:3, 1:3] = True
    labels = torch.full((1, 4, 4, 4), 2, dtype=torch.uint8)
    probabilities = torch.full((3, 4, 4, 4), 0.9)
    out = RestrictToBraind(["pred", "probabilities"])(
        {"pred": labels, "probabilities": probabilities, "brain_mask": brain}
    )
    assert out["pred"].dtype == torch.uint8 and out["pred"].sum() == 2 * 8 and not out["pred"][~brain].any()
    assert torch.equal(out["probabilities"] > 0, brain.expand(3, -1, -1, -1))
    with pytest.raises(ValueError, match="back to the input grid"):
        RestrictToBraind("pred")({"pred": labels[:, :2], "brain_mask": brain})
    with pytest.raises(KeyError, match="BrainMaskd"):
        RestrictToBraind("pred")({"pred": labels})
    # the writer refuses a prediction whose affine is not the input's (it would be written misplaced)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    source = str(tmp_path / "t1.nii.gz")
    nib.Nifti1Image(np.ones((4, 4, 4), np.float32), affine).to_filename(source)
    writer = BratsPredictionWriter(str(tmp_path))
    shifted = affine.copy()
    shifted[0, 3] = 2.0
    with pytest.raises(RuntimeError, match="affine.*Invertd"):
        writer({"case_id": "c", "source": [source], "pred": MetaTensor(labels, affine=torch.as_tensor(shifted))})
    path = writer({"case_id": "c", "source": [source], "pred": MetaTensor(labels, affine=torch.as_tensor(affine))})
    assert np.array_equal(nib.load(path).affine, affine)
