"""multi_gpu_inference.json and multi_gpu_evaluate.json: torchrun with 2 CPU processes (Gloo) on synthetic cases.

Each case is segmented on exactly one rank, a broken case is reported once by rank 0 and gives a non-zero exit on
every rank without a hang, a rerun skips the finished outputs, and the gathered metrics.csv equals the one of a
single process.
"""

import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from conftest import CONFIG_DIR, NARROW_NETWORK, REPO_ROOT
from custom.data.synthetic import case_files, synthesize
from custom.model.network import CascadedUNet

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with Gloo"
)
ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
RANK_LINE = re.compile(r"^rank (\d)/2: (\d+) case\(s\): (.*)$", re.MULTILINE)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(configs, overrides, processes):
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc_per_node={processes}",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "-m",
        "monai.bundle",
        "run",
    ]
    command = launcher if processes > 1 else [sys.executable, "-m", "monai.bundle", "run"]
    command += ["--config_file", json.dumps([str(CONFIG_DIR / c) for c in configs])]
    for key, value in overrides.items():
        command += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return subprocess.run(command, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    cases = root / "cases"
    synthesize(str(cases), num_cases=5, shape=(32, 32, 32), seed=4)
    torch.manual_seed(0)
    checkpoint = root / "model.pt"
    torch.save(CascadedUNet(init_filters=8, blocks_down=(1, 1, 1, 1), trilinear_decoder=False).state_dict(), checkpoint)
    return root, cases, checkpoint


def test_two_ranks_split_the_cases_report_the_broken_one_and_resume(setup):
    root, cases, checkpoint = setup
    broken = root / "broken"
    synthesize(str(broken), num_cases=5, shape=(32, 32, 32), seed=4)
    t1c = case_files(broken / "BraTS2021_00003")["t1c"]
    t1c.write_bytes(t1c.read_bytes()[:2000])
    output_dir = root / "out"
    overrides = {
        "dataset_dir": str(broken),
        "output_dir": str(output_dir),
        "checkpoints": [str(checkpoint)],
        "tta": 2,
        **NARROW_NETWORK,
    }
    result = _command(["inference.json", "multi_gpu_inference.json"], overrides, 2)
    log = result.stdout + result.stderr
    assert result.returncode != 0, log[-4000:]  # a failed case: non-zero on every rank (torchrun reports it)
    shares = {int(rank): [i for i in ids.split(", ") if i] for rank, _, ids in RANK_LINE.findall(result.stdout)}
    assert set(shares) == {0, 1} and all(shares.values()), log[-4000:]
    assert sorted(shares[0] + shares[1]) == [f"BraTS2021_0000{i}" for i in range(5)]  # each case on one rank
    written = sorted(p.name for p in output_dir.glob("*.nii.gz"))
    assert written == [f"BraTS2021_0000{i}.nii.gz" for i in (0, 1, 2, 4)]
    summary = result.stdout[result.stdout.index("segmented 4 of 5 cases") :]
    assert summary.count("BraTS2021_00003: ") == 1 and "failed (not written)" in summary  # once, by rank 0
    assert (output_dir / "volumes.csv").read_text().count("\n") == 5  # header + the 4 written cases

    stamps = {p.name: p.stat().st_mtime_ns for p in output_dir.glob("*.nii.gz")}
    # --device cpu, a documented key, is a string on the command line: the multi-GPU config must accept it
    rerun = _command(["inference.json", "multi_gpu_inference.json"], {**overrides, "device": "cpu"}, 2)
    assert "4 already written (skipped" in rerun.stdout, (rerun.stdout + rerun.stderr)[-4000:]
    assert {p.name: p.stat().st_mtime_ns for p in output_dir.glob("*.nii.gz")} == stamps


def test_gathered_metrics_equal_a_single_process(setup):
    root, cases, checkpoint = setup
    tables = {}
    for processes in (1, 2):
        output_dir = root / f"eval{processes}"
        configs = ["train.json", "evaluate.json"] + (["multi_gpu_evaluate.json"] if processes > 1 else [])
        overrides = {
            "dataset_dir": str(cases),
            "output_dir": str(output_dir),
            "checkpoints": [str(checkpoint)],
            "ensemble": "best",
            "num_folds": 2,
            "tta": 2,
            **NARROW_NETWORK,
        }
        if processes > 1:
            overrides["device"] = "cpu"  # a string from the command line under the multi-GPU config
        result = _command(configs, overrides, processes)
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
        (csv_file,) = output_dir.glob("eval*/*.csv")
        tables[processes] = csv_file.read_text()
    assert tables[1] == tables[2]
    rows = tables[2].splitlines()[1:]
    case_rows = [r.split(",")[0] for r in rows if r.startswith("BraTS")]
    assert case_rows == sorted(case_rows) and len(case_rows) >= 2
