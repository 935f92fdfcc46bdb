"""train.json and evaluate.json end to end on tiny synthetic BraTS data; resume after SIGKILL; atomic saves."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import CONFIG_DIR, REPO_ROOT, TINY_TRAINING
from custom.data.synthetic import synthesize
from custom.model.checkpoints import atomic_save, list_snapshots, load_state_dict
from ignite.engine import Events
from monai.bundle import ConfigParser, ConfigWorkflow


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    synthesize(str(folder), num_cases=6, shape=(32, 32, 32), seed=3)
    return folder


def test_train_config_network_and_run_ids():
    parser = ConfigParser()
    parser.read_config(str(CONFIG_DIR / "train.json"))
    network = parser.get_parsed_content("network_def")
    assert (
        sum(p.numel() for p in network.parameters()) == 24_923_945
    )  # the paper's cascade (Conv1 heads), see test_network
    assert parser.config["training"] == "$@run"  # `run training` and plain `run` do the same
    # the config can be inspected before any dataset exists (MONAI Label, model-zoo checks) ...
    workflow = ConfigWorkflow(
        config_file=str(CONFIG_DIR / "train.json"), workflow_type="train", dataset_dir="/nonexistent/BraTS"
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    # ... and running it says what is missing
    with pytest.raises(SystemExit) as failure:  # a clean exit (no traceback) from the command line
        workflow.run()
    assert "dataset_dir '/nonexistent/BraTS' does not exist" in str(failure.value)


def _tiny_training(dataset, output_dir, **overrides) -> ConfigWorkflow:
    """train.json for one epoch of the tiny dataset, initialised."""
    workflow = ConfigWorkflow(
        config_file=str(CONFIG_DIR / "train.json"),
        workflow_type="train",
        dataset_dir=str(dataset),
        output_dir=str(output_dir),
        **{**TINY_TRAINING, **overrides},
    )
    workflow.initialize()
    return workflow


def test_train_one_epoch_then_evaluate(tiny_dataset, tmp_path):
    output_dir = tmp_path / "run"
    workflow = _tiny_training(tiny_dataset, output_dir)
    assert workflow.check_properties() == []  # MONAI's train workflow contract
    workflow.run()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 1
    metrics = workflow.parser.get_parsed_content("validate#evaluator").state.metrics
    assert set(metrics) >= {"val_mean_dice", "val_dice_tc", "val_dice_wt", "val_dice_et"}
    assert 0.0 <= metrics["val_mean_dice"] <= 1.0
    models = output_dir / "models"
    assert [e for e, _ in list_snapshots(str(models))] == [1]
    assert (models / "model.pt").exists() and any((output_dir / "logs").iterdir())
    weights = load_state_dict(str(models / "model.pt"))
    assert not any(k.startswith("stage2_trilinear_decoder.") for k in weights)  # inference model only
    workflow.finalize()

    evaluation = ConfigWorkflow(
        config_file=[str(CONFIG_DIR / "train.json"), str(CONFIG_DIR / "evaluate.json")],
        workflow_type=None,
        dataset_dir=str(tiny_dataset),
        output_dir=str(output_dir),
        tta=2,
        **TINY_TRAINING,
    )
    evaluation.initialize()
    evaluation.run()
    rows = (output_dir / "eval" / "metrics.csv").read_text().splitlines()
    validation_cases = evaluation.parser.get_parsed_content("evaluate#data")
    assert len(rows) == 1 + len(validation_cases) + 5  # header, cases, mean/std/median/quantiles
    assert rows[-5].startswith("mean,")
    assert len(list((output_dir / "eval" / "predictions").glob("*.nii.gz"))) == len(validation_cases)


def _train_command(dataset, output_dir, epochs):
    overrides = {
        **TINY_TRAINING,
        "epochs": epochs,
        "val_interval": epochs + 1,  # snapshots are written every epoch; no validation is needed for resume
        "dataset_dir": str(dataset),
        "output_dir": str(output_dir),
        "cache": "none",
    }
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(CONFIG_DIR / "train.json")]
    for key, value in overrides.items():
        command += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    return command


def test_resume_after_sigkill_continues_the_epoch_count(tiny_dataset, tmp_path):
    output_dir, epochs = tmp_path / "run", 4
    models = output_dir / "models"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        _train_command(tiny_dataset, output_dir, epochs),
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while not (models / "snapshot_epoch=2.pt").exists():
        assert process.poll() is None and time.time() < deadline, "training did not reach epoch 2"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = max(e for e, _ in list_snapshots(str(models)))
    assert 2 <= killed_at < epochs

    resumed = subprocess.run(
        _train_command(tiny_dataset, output_dir, epochs),
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert "resumed from" in log and f"epoch {killed_at} of {epochs} done" in log
    assert f"Epoch[{killed_at + 1}] Complete" in log and "Epoch[1] Complete" not in log
    final = torch.load(models / f"snapshot_epoch={epochs}.pt", weights_only=True)  # tensors and plain values only
    trainer_state = final["trainer"]  # ignite saves the iteration count: epochs x iterations per epoch
    assert trainer_state["iteration"] == epochs * trainer_state["epoch_length"]
    # the LR schedule continued too: 5 warm-up epochs, so epoch 4 ran at 4/5 of the base rate
    assert final["lr_scheduler"]["last_epoch"] == epochs
    assert final["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4 * 5 / 5)


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    atomic_save({"w": torch.ones(2)}, str(path))

    def crash(*args):
        raise KeyboardInterrupt("killed between writing and renaming")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"w": torch.zeros(2)}, str(path))
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left behind


def _first_epoch_losses(dataset, output_dir, seed: int) -> list[float]:
    workflow = _tiny_training(dataset, output_dir, val_interval=2, cache="none", deterministic=True, seed=seed)
    trainer = workflow.parser.get_parsed_content("train#trainer")  # the instance the run line runs
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: losses.append(engine.state.output[0]["loss"]))
    workflow.run()
    workflow.finalize()
    return [float(loss) for loss in losses]


def test_the_same_seed_gives_the_same_first_epoch(tiny_dataset, tmp_path):
    """``deterministic`` (demo.json sets it) seeds the weights, the shuffling, the crops and the flips with `seed`."""
    first = _first_epoch_losses(tiny_dataset, tmp_path / "a", seed=5)
    again = _first_epoch_losses(tiny_dataset, tmp_path / "b", seed=5)
    other = _first_epoch_losses(tiny_dataset, tmp_path / "c", seed=6)
    assert len(first) == 4 and again == pytest.approx(first, rel=1e-5)  # the memory layout is timed: not bitwise
    assert other != pytest.approx(first, rel=1e-3)


def test_memory_format_is_timed_or_taken_as_given(caplog):
    import logging

    from custom.model.network import CascadedUNet
    from custom.training.workflow import fastest_memory_format

    network = CascadedUNet(init_filters=8, blocks_down=(1, 1, 1, 1), trilinear_decoder=False)
    with caplog.at_level(logging.INFO, logger="custom.training.workflow"):
        fastest_memory_format(network, (16, 16, 16), repeats=1)
    assert "memory layout: NCDHW" in caplog.text and "channels-last" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="custom.training.workflow"):
        chosen = fastest_memory_format(network, (16, 16, 16), memory_format="channels_last")
    weight = next(chosen.parameters())
    assert weight.is_contiguous(memory_format=torch.channels_last_3d) and "memory layout" not in caplog.text
    with pytest.raises(ValueError, match="memory_format"):
        fastest_memory_format(network, (16, 16, 16), memory_format="nhwc")
