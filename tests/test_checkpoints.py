"""Checkpoints and output files that never lose or mix runs and load safely: best metric restored on resume, one run
per checkpoint folder, snapshots loadable with weights_only=True, fallback from a bad snapshot, safe case ids,
umask-respecting atomic writes, a zip of the bundle's own files only, a disk cache keyed on the transforms."""

import json
import logging
import os
import pathlib
import random
import shutil
import subprocess
import zipfile

import custom.tools.package
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import CONFIG_DIR, REPO_ROOT
from custom.core.io import atomic_path, check_case_ids, safe_case_id
from custom.data.datalist import load_datalist
from custom.data.datasets import make_dataset
from custom.inference.ensemble import SnapshotFlipEnsemble, snapshot_sets
from custom.inference.inferer import BratsPredictionWriter
from custom.model.checkpoints import (
    PREVIOUS_RUNS,
    BestModelSaver,
    EpochSnapshotSaver,
    ResumeFromLatest,
    list_snapshots,
    load_state_dict,
)
from custom.model.network import CascadedUNet
from custom.tools.package import BUNDLE_CONFIGS, package
from ignite.engine import Engine
from ignite.metrics import Metric
from monai.bundle import ConfigParser
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import ValidationHandler
from monai.transforms import Compose, ShiftIntensityd

SMALL = {"init_filters": 8, "blocks_down": (1, 1, 1, 1)}


# ---------------------------------------------------------------------------------------------------------------
# a tiny training with the handlers wired as in train.json


class ScriptedMetric(Metric):
    """A key metric whose values are given in advance, one per validation."""

    def __init__(self, values):
        self.values = list(values)
        super().__init__()

    def reset(self):
        pass

    def update(self, output):
        pass

    def compute(self):
        return self.values.pop(0)


def _batch():
    return [{"image": torch.ones(1, 1, 2, 2, 2), "label": torch.zeros(1, 1, 2, 2, 2)}]


def _training(ckpt_dir, epochs, metric_values, resume=True, n_saved=2, seed=0):
    """SupervisedTrainer + SupervisedEvaluator with ResumeFromLatest, ValidationHandler, EpochSnapshotSaver and
    BestModelSaver in train.json's order; the network starts from ``seed`` so runs differ."""
    torch.manual_seed(seed)
    network = torch.nn.Conv3d(1, 1, 1)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    evaluator = SupervisedEvaluator(
        device="cpu",
        val_data_loader=_batch(),
        network=network,
        key_val_metric={"val_mean_dice": ScriptedMetric(metric_values)},
        val_handlers=[BestModelSaver(str(ckpt_dir), network)],
    )
    objects = {"model": network, "optimizer": optimizer}
    handlers = [
        ResumeFromLatest(str(ckpt_dir), objects, enabled=resume, validator=evaluator),
        ValidationHandler(validator=evaluator, interval=1, epoch_level=True),
        EpochSnapshotSaver(str(ckpt_dir), objects, n_saved=n_saved, validator=evaluator),
    ]
    trainer = SupervisedTrainer(
        device="cpu",
        max_epochs=epochs,
        train_data_loader=_batch(),
        network=network,
        optimizer=optimizer,
        loss_function=torch.nn.MSELoss(),
        train_handlers=handlers,
    )
    trainer.run()
    return trainer, evaluator


def test_resume_restores_the_best_metric_so_a_worse_model_never_replaces_model_pt(tmp_path):
    _training(tmp_path, epochs=1, metric_values=[0.9])
    best = load_state_dict(str(tmp_path / "model.pt"))
    # the resumed run validates worse (0.1): before the fix its first validation counted as a new best
    trainer, evaluator = _training(tmp_path, epochs=2, metric_values=[0.1], seed=1)
    assert trainer.state.epoch == 2
    assert (evaluator.state.best_metric, evaluator.state.best_metric_epoch) == (0.9, 1)
    kept = load_state_dict(str(tmp_path / "model.pt"))
    assert all(torch.equal(kept[k], best[k]) for k in best)
    trained_on = load_state_dict(str(tmp_path / "snapshot_epoch=2.pt"))
    assert not torch.equal(trained_on["weight"], best["weight"])  # epoch 2 changed the weights: model.pt was kept
    # a better validation after a resume still wins
    _, evaluator = _training(tmp_path, epochs=3, metric_values=[0.95], seed=2)
    assert (evaluator.state.best_metric, evaluator.state.best_metric_epoch) == (0.95, 3)
    assert torch.equal(
        load_state_dict(str(tmp_path / "model.pt"))["weight"],
        load_state_dict(str(tmp_path / "snapshot_epoch=3.pt"))["weight"],
    )


def test_train_json_wires_the_evaluator_and_the_rank_into_the_checkpoint_handlers():
    parser = ConfigParser()
    parser.read_config(str(CONFIG_DIR / "train.json"))
    parser["dataset_dir"] = "/nonexistent/BraTS"
    handlers = parser.get_parsed_content("train#handlers")
    evaluator = parser.get_parsed_content("validate#evaluator")
    resume = next(h for h in handlers if isinstance(h, ResumeFromLatest))
    saver = next(h for h in handlers if isinstance(h, EpochSnapshotSaver))
    assert resume.validator is evaluator and saver.validator is evaluator
    multi = ConfigParser()
    multi.read_config([str(CONFIG_DIR / "train.json"), str(CONFIG_DIR / "multi_gpu_train.json")])
    assert multi["train#handlers#0#_target_"] == "custom.model.checkpoints.ResumeFromLatest"
    assert multi["train#handlers#0#rank"] == "@rank"  # only rank 0 moves files when a new run starts


# ---------------------------------------------------------------------------------------------------------------
# one run per checkpoint folder


def _engine_run(ckpt_dir, epochs, resume, n_saved=2, network=None):
    """A plain ignite trainer (one Adam step per epoch, on a weight decay loss that needs no input) with
    ResumeFromLatest and EpochSnapshotSaver."""
    network = network if network is not None else torch.nn.Linear(2, 1)
    optimizer = torch.optim.Adam(network.parameters(), lr=0.01)

    def step(engine, batch):
        optimizer.zero_grad()
        loss = sum((p**2).sum() for p in network.parameters())
        loss.backward()
        optimizer.step()
        return loss.item()

    engine = Engine(step)
    objects = {"model": network, "optimizer": optimizer}
    ResumeFromLatest(str(ckpt_dir), objects, enabled=resume).attach(engine)
    EpochSnapshotSaver(str(ckpt_dir), objects, n_saved=n_saved).attach(engine)
    engine.run([0], max_epochs=epochs)
    return engine


def _run_id(path):
    return torch.load(path, weights_only=True)["run_id"]


def test_a_new_run_moves_the_previous_run_aside_and_never_prunes_or_resumes_it(tmp_path):
    old = _engine_run(tmp_path, epochs=5, resume=False)
    (tmp_path / "model.pt").write_bytes(b"best of the old run")
    old_files = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert sorted(old_files) == ["model.pt", "snapshot_epoch=4.pt", "snapshot_epoch=5.pt"]

    # --resume false in the used folder: before the fix, pruning by epoch number deleted the new epoch 1
    new = _engine_run(tmp_path, epochs=1, resume=False)
    assert [e for e, _ in list_snapshots(str(tmp_path))] == [1]
    assert new.state.run_id != old.state.run_id
    assert _run_id(tmp_path / "snapshot_epoch=1.pt") == new.state.run_id
    assert not (tmp_path / "model.pt").exists()  # the old run's best is not taken for this run's
    archived = tmp_path / PREVIOUS_RUNS / old.state.run_id
    assert {p.name: p.read_bytes() for p in archived.iterdir()} == old_files  # moved, nothing lost
    assert snapshot_sets(str(tmp_path)) == [[str(tmp_path / "snapshot_epoch=1.pt")]]  # the ensemble sees this run

    # resume continues the new run, not the old one's epoch 5, and keeps its run id
    resumed = _engine_run(tmp_path, epochs=3, resume=True)
    assert resumed.state.run_id == new.state.run_id and resumed.state.epoch == 3
    assert [e for e, _ in list_snapshots(str(tmp_path))] == [2, 3]
    assert {_run_id(p) for _, p in list_snapshots(str(tmp_path))} == {new.state.run_id}
    assert sorted(p.name for p in archived.iterdir()) == sorted(old_files)  # pruning left the old run alone

    # a fresh start with nothing to resume but an old model.pt moves it too; a second archive does not collide
    for _, path in list_snapshots(str(tmp_path)):
        os.remove(path)
    (tmp_path / "model.pt").write_bytes(b"orphan")
    _engine_run(tmp_path, epochs=1, resume=True)
    assert len(list((tmp_path / PREVIOUS_RUNS).iterdir())) == 2


# ---------------------------------------------------------------------------------------------------------------
# snapshots load with weights_only=True, resume falls back from a bad one


def test_real_snapshots_load_with_weights_only_and_restore_the_rng_streams(tmp_path):
    np.random.seed(1)
    random.seed(1)
    torch.manual_seed(1)
    network = CascadedUNet(**SMALL)  # the bundle's network, with the training-only decoder
    _engine_run(tmp_path, epochs=2, resume=False, network=network)
    after_save = (np.random.rand(), random.random(), torch.rand(1).item())
    snapshot = torch.load(tmp_path / "snapshot_epoch=2.pt", weights_only=True)  # numpy RNG state made this fail
    assert {"model", "optimizer", "trainer", "rng", "run_id"} <= set(snapshot)

    # the documented snapshot ensemble of a training folder
    ensemble = SnapshotFlipEnsemble(CascadedUNet(**SMALL, trilinear_decoder=False), [str(tmp_path)], "all", tta=1)
    assert len(ensemble.load().members) == 2

    # a resume from epoch 2 (nothing left to train) puts the RNGs back where the snapshot left them
    np.random.seed(99)
    random.seed(99)
    torch.manual_seed(99)
    _engine_run(tmp_path, epochs=2, resume=True, network=CascadedUNet(**SMALL))
    assert (np.random.rand(), random.random(), torch.rand(1).item()) == after_save


class PlantedCode:
    """A pickle that runs code when loaded with weights_only=False."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_resume_skips_a_truncated_or_planted_snapshot_and_names_it(tmp_path, caplog):
    _engine_run(tmp_path, epochs=3, resume=False, n_saved=3)
    latest = tmp_path / "snapshot_epoch=3.pt"
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 2])  # a disk that filled up, a copy that stopped
    with caplog.at_level(logging.INFO, logger="custom.model.checkpoints"):
        engine = _engine_run(tmp_path, epochs=3, resume=True, n_saved=3)
    assert f"snapshot {latest} cannot be loaded" in caplog.text  # the bad file is named ...
    assert f"resumed from {tmp_path / 'snapshot_epoch=2.pt'}" in caplog.text  # ... and the one before it used
    assert engine.state.epoch == 3
    assert torch.load(latest, weights_only=True)["trainer"]["iteration"] == 3  # epoch 3 trained again and saved whole

    marker = tmp_path / "code_ran"
    torch.save({"model": {}, "trainer": PlantedCode(marker)}, latest)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="custom.model.checkpoints"):
        engine = _engine_run(tmp_path, epochs=3, resume=True, n_saved=3)
    assert not marker.exists()  # weights_only=False ran the planted code
    assert f"snapshot {latest} cannot be loaded" in caplog.text and "snapshot_epoch=2.pt" in caplog.text
    assert engine.state.epoch == 3

    for _, path in list_snapshots(str(tmp_path)):
        pathlib.Path(path).write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match=r"no snapshot in .* can be resumed from: snapshot .*snapshot_epoch=3\.pt"):
        _engine_run(tmp_path, epochs=3, resume=True)


def _flip_bits_in_a_tensor(path):
    """Flips one byte inside the stored bytes of a tensor of a torch.save zip archive (bit rot, a bad copy)."""
    data = bytearray(pathlib.Path(path).read_bytes())
    with zipfile.ZipFile(path) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    start = record.header_offset + 30 + len(record.filename.encode())
    start += int.from_bytes(data[record.header_offset + 28 : record.header_offset + 30], "little")  # extra field
    data[start + record.file_size // 2] ^= 0x10
    pathlib.Path(path).write_bytes(bytes(data))


def test_resume_skips_a_snapshot_with_flipped_bits_and_names_it(tmp_path, caplog):
    _engine_run(tmp_path, epochs=3, resume=False, n_saved=3, network=torch.nn.Linear(64, 16))
    latest = tmp_path / "snapshot_epoch=3.pt"
    assert torch.load(latest, weights_only=True)["trainer"]["iteration"] == 3  # still a loadable file ...
    _flip_bits_in_a_tensor(latest)
    assert torch.load(latest, weights_only=True)["trainer"]["iteration"] == 3  # ... that torch.load takes as it is
    with caplog.at_level(logging.INFO, logger="custom.model.checkpoints"):
        engine = _engine_run(tmp_path, epochs=3, resume=True, n_saved=3, network=torch.nn.Linear(64, 16))
    assert f"snapshot {latest} cannot be loaded: its checksum does not match" in caplog.text
    assert f"resumed from {tmp_path / 'snapshot_epoch=2.pt'}" in caplog.text
    assert engine.state.epoch == 3


def test_a_model_pt_with_flipped_bits_is_refused_and_one_without_checksum_loads_with_a_note(tmp_path, caplog):
    weights = CascadedUNet(**SMALL, trilinear_decoder=False).state_dict()
    models = tmp_path / "models"
    models.mkdir()
    saved = BestModelSaver(str(models), CascadedUNet(**SMALL, trilinear_decoder=False))
    saved.network.load_state_dict(weights)
    engine = Engine(lambda e, b: None)
    engine.state.best_metric_epoch = engine.state.epoch = 1
    engine.state.key_metric_name, engine.state.best_metric = "val_mean_dice", 0.5
    saved(engine)
    path = models / "model.pt"
    assert all(torch.equal(v, weights[k]) for k, v in load_state_dict(str(path)).items())
    _flip_bits_in_a_tensor(path)
    with pytest.raises(RuntimeError, match=rf"checkpoint {path} cannot be loaded: its checksum does not match"):
        load_state_dict(str(path))
    ensemble = SnapshotFlipEnsemble(CascadedUNet(**SMALL, trilinear_decoder=False), [str(models)], tta=1)
    with pytest.raises(RuntimeError, match=rf"checkpoint {path} cannot be loaded: its checksum"):
        ensemble.load()  # inference stops on it, as on a truncated file
    torch.save(weights, path)  # an older version's model.pt: no checksum
    with caplog.at_level(logging.INFO, logger="custom.model.checkpoints"):
        assert set(load_state_dict(str(path))) == set(weights)
    assert f"checkpoint {path} has no checksum" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# case ids, permissions


@pytest.mark.parametrize("case_id", ["../x", "/tmp/abs", "a/b", "a\\b", "..", "", None, "C:evil"])
def test_case_ids_that_are_not_plain_file_names_are_refused(case_id):
    with pytest.raises(ValueError, match="case_id"):
        safe_case_id(case_id)
    with pytest.raises(ValueError, match=r"'training'\[1\]"):
        check_case_ids({"training": [{"case_id": "ok"}, {"case_id": case_id}]}, "datalist x.json")
    assert safe_case_id("BraTS-GLI-00001-000") == "BraTS-GLI-00001-000"


def test_load_datalist_refuses_unsafe_and_duplicate_case_ids(tmp_path):
    def datalist(training, testing=()):
        path = tmp_path / "list.json"
        path.write_text(json.dumps({"training": training, "testing": list(testing)}))
        return path

    case = {"image": ["t1.nii.gz", "t1c.nii.gz", "t2.nii.gz", "flair.nii.gz"], "label": "seg.nii.gz", "fold": 0}
    with pytest.raises(ValueError, match=r"'training'\[0\] '\.\./\.\./escape' contains a path separator"):
        load_datalist(str(datalist([{**case, "case_id": "../../escape"}])))
    with pytest.raises(ValueError, match=r"'training'\[1\] 'A' repeats 'training'\[0\]"):
        load_datalist(str(datalist([{**case, "case_id": "A"}, {**case, "case_id": "A"}])))
    with pytest.raises(ValueError, match=r"'testing'\[0\] 'A' repeats 'training'\[0\]"):
        load_datalist(str(datalist([{**case, "case_id": "A"}], [{"image": case["image"], "case_id": "A"}])))
    assert [e["case_id"] for e in load_datalist(str(datalist([{**case, "case_id": "A"}])))["training"]] == ["A"]


def test_prediction_writer_never_writes_outside_output_dir(tmp_path):
    source = tmp_path / "in" / "case_t1.nii.gz"
    source.parent.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), source)
    (tmp_path / "out").mkdir()
    writer = BratsPredictionWriter(str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"case_id '\.\./escape'"):
        writer({"case_id": "../escape", "source": [str(source)], "pred": np.zeros((1, 4, 4, 4), np.uint8)})
    assert not (tmp_path / "escape.nii.gz").exists()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        with atomic_path(tmp_path / "file.txt") as tmp, open(tmp, "w") as f:
            f.write("x")
    finally:
        os.umask(previous)
    assert (tmp_path / "file.txt").stat().st_mode & 0o777 == mode


# ---------------------------------------------------------------------------------------------------------------
# the zip holds the bundle's own files only


def test_package_ships_neither_extra_configs_nor_symbolic_links(tmp_path, monkeypatch):
    bundle = tmp_path / "bundle"
    for name in ("configs", "docs"):
        shutil.copytree(REPO_ROOT / "bundle" / name, bundle / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("LICENSE", "large_files.yml"):
        shutil.copy(REPO_ROOT / "bundle" / name, bundle / name)
    private = tmp_path / "private"
    private.mkdir()
    (private / "datalist.json").write_text('{"training": [{"image": "/home/me/patient_17.nii.gz"}]}')
    (bundle / "configs" / "datalist.json").write_text('{"training": [{"image": "/home/me/patient_17.nii.gz"}]}')
    (bundle / "configs" / "linked.json").symlink_to(private / "datalist.json")
    (bundle / "configs" / "extra.yaml").write_text("a: 1\n")
    (bundle / "docs" / "notes.md").symlink_to(private / "datalist.json")
    (bundle / "docs" / "private").symlink_to(private, target_is_directory=True)
    monkeypatch.setattr(custom.tools.package, "_bundle_dir", lambda: bundle)

    zip_path = package(output=str(tmp_path / "bundle.zip"))
    with zipfile.ZipFile(zip_path) as archive:
        names = [n.split("/", 1)[1] for n in archive.namelist()]
        content = b"".join(archive.read(n) for n in archive.namelist() if not n.endswith("/"))
    assert sorted(n for n in names if n.startswith("configs/") and n != "configs/") == sorted(
        f"configs/{c}" for c in BUNDLE_CONFIGS
    )
    real_docs = {
        f"docs/{p.relative_to(REPO_ROOT / 'bundle' / 'docs').as_posix()}"
        for p in (REPO_ROOT / "bundle" / "docs").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert {n for n in names if n.startswith("docs/") and not n.endswith("/")} == real_docs, names  # no symlinks
    assert b"patient_17" not in content


def test_every_tracked_config_of_the_repository_is_a_bundle_config():
    try:
        tracked = subprocess.run(
            ["git", "ls-files", "bundle/configs"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    missing = sorted({os.path.basename(p) for p in tracked} - set(BUNDLE_CONFIGS))
    assert not missing, f"add {missing} to BUNDLE_CONFIGS of custom/tools/package.py, or they are left out of the zip"


# ---------------------------------------------------------------------------------------------------------------
# the disk cache is keyed on the transforms


def test_disk_cache_is_rebuilt_when_the_cached_transforms_change(tmp_path):
    data = [{"x": np.zeros((1, 2, 2, 2), np.float32)}]
    cache_dir = str(tmp_path / "cache")

    def first_value(offset):
        dataset = make_dataset(
            data, Compose([ShiftIntensityd(keys="x", offset=offset)]), cache="disk", cache_dir=cache_dir
        )
        return float(dataset[0]["x"].flatten()[0])

    assert first_value(1.0) == 1.0
    assert first_value(1.0) == 1.0 and len(os.listdir(cache_dir)) == 1  # the same transforms hit the cache
    assert first_value(2.0) == 2.0  # before the fix: 1.0, read from the stale cache
    assert len(os.listdir(cache_dir)) == 2


def test_train_and_validation_pipelines_of_train_json_get_their_own_cache_keys(tmp_path):
    keys = {}
    for part in ("train", "validate", "train"):
        parser = ConfigParser()  # a fresh parse each time: the key must not depend on the objects' identity
        parser.read_config(str(CONFIG_DIR / "train.json"))
        parser["dataset_dir"] = "/nonexistent/BraTS"
        dataset = make_dataset(
            [], parser.get_parsed_content(f"{part}#preprocessing"), cache="disk", cache_dir=str(tmp_path)
        )
        keys.setdefault(part, set()).add(dataset.transform_hash)
    assert len(keys["train"]) == 1 and keys["train"] != keys["validate"]  # stable, and distinct in the shared cache_dir
