"""multi_gpu_train.json: torchrun with 2 CPU processes (Gloo) on tiny synthetic data, one epoch.

Checks what a distributed run must get right: every rank trains on its own disjoint shard of the training cases,
validation covers every validation case exactly once (uneven shards, no padding duplicates) and gives the same
metric on every rank, only rank 0 writes checkpoints and TensorBoard files, and both processes exit cleanly.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import torch.distributed as dist
from conftest import CONFIG_DIR, REPO_ROOT, TINY_TRAINING
from custom.data.datalist import load_datalist, training_files, validation_files
from custom.data.synthetic import synthesize
from monai.bundle import ConfigParser

CONFIGS = [str(CONFIG_DIR / "train.json"), str(CONFIG_DIR / "multi_gpu_train.json")]
# 7 cases in 3 folds: fold 0 validates on 3 cases (uneven over 2 ranks) and trains on 4 (2 per rank)
NUM_CASES, NUM_FOLDS = 7, 3
TINY = {**TINY_TRAINING, "num_folds": NUM_FOLDS}
SHARD_LINE = re.compile(
    r"rank (\d+)/(\d+) (trained|validated) on (\d+) cases in epoch (\d+): ([^;\n]*)(?:; all ranks: (.*))?"
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rank_zero_overrides_point_at_the_intended_handlers():
    """The overrides address train.json's handlers by index: fail loudly when train.json's order changes."""
    parser = ConfigParser()
    parser.read_config(CONFIGS)
    expected = {
        "train#handlers#1": "LrScheduleHandler",
        "train#handlers#3": "StatsHandler",
        "train#handlers#4": "TensorBoardStatsHandler",
        "train#handlers#5": "ignite.handlers.ProgressBar",
        "train#handlers#6": "custom.model.checkpoints.EpochSnapshotSaver",
        "validate#handlers#0": "StatsHandler",
        "validate#handlers#1": "TensorBoardStatsHandler",
        "validate#handlers#2": "custom.model.checkpoints.BestModelSaver",
    }
    for key, target in expected.items():
        assert (
            parser[f"{key}#_target_"] == target
        ), f"{key} of train.json is no longer {target}: update multi_gpu_train.json"
    assert parser["train#handlers"][-1]["_target_"] == "custom.core.distributed.ShardLogger"
    assert parser["validate#handlers"][-1]["_target_"] == "custom.core.distributed.ShardLogger"
    # train.json's own setup still runs first, the process group after it; teardown comes last
    assert parser["initialize"][0] == "$custom.check_monai_version()"
    assert "init_process_group" in " ".join(parser["initialize"][3:])
    assert "destroy_process_group" in parser["finalize"][-1]


@pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with Gloo is needed"
)
def test_torchrun_two_cpu_processes_one_epoch(tmp_path):
    dataset = tmp_path / "data"
    synthesize(str(dataset), num_cases=NUM_CASES, shape=(32, 32, 32), seed=3)
    datalist = load_datalist(str(dataset), folds=NUM_FOLDS, seed=0)
    train_ids = {e["case_id"] for e in training_files(datalist, 0)}
    val_ids = {e["case_id"] for e in validation_files(datalist, 0)}
    assert (len(train_ids), len(val_ids)) == (4, 3)

    output_dir = tmp_path / "run"
    overrides = {**TINY, "dataset_dir": str(dataset), "output_dir": str(output_dir)}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        json.dumps(CONFIGS),
    ]
    for key, value in overrides.items():
        command += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]  # torchrun exits 0 only when every worker exited 0
    print(f"torchrun, 2 processes, 1 epoch: {time.perf_counter() - start:.1f} s")

    shards: dict[tuple[str, int], list[str]] = {}
    metrics: dict[int, str] = {}
    for rank, world, action, count, epoch, ids, gathered in SHARD_LINE.findall(log):
        assert (world, epoch) == ("2", "1")
        case_ids = [i.strip() for i in ids.split(",") if i.strip()]
        assert len(case_ids) == int(count)
        shards[(action, int(rank))] = case_ids
        if action == "validated":
            metrics[int(rank)] = gathered
    assert set(shards) == {("trained", 0), ("trained", 1), ("validated", 0), ("validated", 1)}, log[-5000:]

    # training: disjoint shards of equal size that together are the training set
    train_0, train_1 = set(shards[("trained", 0)]), set(shards[("trained", 1)])
    assert len(shards[("trained", 0)]) == len(shards[("trained", 1)]) == 2
    assert not train_0 & train_1 and train_0 | train_1 == train_ids
    # validation: uneven shards (2 + 1), no duplicate, all cases; the gathered metrics agree on both ranks
    val_0, val_1 = shards[("validated", 0)], shards[("validated", 1)]
    assert sorted([len(val_0), len(val_1)]) == [1, 2]
    assert not set(val_0) & set(val_1) and set(val_0) | set(val_1) == val_ids
    assert metrics[0] == metrics[1] and metrics[0]
    for name in ("val_mean_dice", "val_dice_tc", "val_dice_wt", "val_dice_et"):
        assert re.search(rf"{name} [0-9.]+ over {len(val_ids)} cases", metrics[0]), metrics[0]

    # rank 0 alone writes: one checkpoint set, no temporary files, TensorBoard files of one process
    assert sorted(os.listdir(output_dir / "models")) == ["model.pt", "snapshot_epoch=1.pt"]
    events = os.listdir(output_dir / "logs")
    assert events and len({name.rsplit(".", 2)[1] for name in events}) == 1, events  # events.out.tfevents.T.HOST.PID.N
    # logs from rank 0 only: the LR and the validation metrics appear once
    assert log.count("Current learning rate") == 1 and log.count("Epoch[1] Metrics --") == 1
