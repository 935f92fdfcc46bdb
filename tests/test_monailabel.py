"""The packaged bundle served by MONAI Label's `monaibundle` sample app: /infer on a 4-channel study.

MONAI Label is an optional, heavy dependency that CI does not install; this test skips without it. To run it, install
MONAI Label in its own virtual environment (see bundle/docs/README.md, "MONAI Label") and run
``BRATS_TEST_CASE=<a BraTS case folder> <venv>/bin/python -m pytest tests/test_monailabel.py``.
"""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import CONFIG_DIR
from custom.model.network import CascadedUNet
from custom.tools.package import package

SMALL = {"init_filters": 8, "blocks_down": [1, 1, 1, 1]}  # a small cascade so that CPU inference takes seconds
STARTUP_TIMEOUT, INFER_TIMEOUT = 180, 420


def _monailabel_problem() -> str | None:
    if importlib.util.find_spec("monailabel") is None:
        return (
            "monailabel is not installed (optional; CI does not install it): see bundle/docs/README.md, 'MONAI Label'"
        )
    try:
        import monailabel.tasks.infer.bundle  # noqa: F401  (imports torchvision, which must match torch)
    except Exception as e:  # e.g. a CUDA torchvision next to a CPU torch
        return f"monailabel is installed but not importable here ({type(e).__name__}: {e})"
    return None


pytestmark = pytest.mark.skipif(_monailabel_problem() is not None, reason=str(_monailabel_problem()))


def _sample_app() -> Path:
    """`<prefix>/monailabel/sample-apps/monaibundle`, where the monailabel wheel installs it (as `monailabel apps` finds it)."""
    import monailabel

    package_root = Path(monailabel.__file__).resolve().parent.parent
    candidates = [
        package_root / "sample-apps",
        Path(sys.prefix) / "monailabel" / "sample-apps",
        Path(sys.prefix) / "local" / "monailabel" / "sample-apps",
        Path.home() / ".local" / "monailabel" / "sample-apps",
    ]
    for candidate in candidates:
        if (candidate / "monaibundle" / "main.py").is_file():
            return candidate / "monaibundle"
    pytest.skip(f"MONAI Label's monaibundle sample app is not in any of {[str(c) for c in candidates]}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _four_channel_study(real_case, folder: Path) -> Path:
    """The real case as MONAI Label stores a multi-sequence study: one NIfTI, channels last (T1, T1c, T2, FLAIR: the
    bundle's channel order), the sequences' affine."""
    images = [nib.load(path) for path in real_case.images]
    data = np.stack([np.asarray(image.dataobj) for image in images], axis=-1)
    study = nib.Nifti1Image(data, images[0].affine)
    study.header.set_data_dtype(data.dtype)
    folder.mkdir(parents=True)
    path = folder / f"{real_case.case_id}.nii.gz"
    nib.save(study, path)
    return path


def _serve_bundle(tmp_path: Path) -> tuple[Path, str, Path]:
    """The monaibundle app with the packaged bundle as a local model (small network, random weights, 1 flip)."""
    app = tmp_path / "app"
    shutil.copytree(_sample_app(), app, ignore=shutil.ignore_patterns("__pycache__", "logs", "model"))
    zip_path = Path(package(output=str(tmp_path / "dist" / "bundle.zip")))
    zipfile.ZipFile(zip_path).extractall(app / "model")
    (name,) = [p.name for p in (app / "model").iterdir()]
    bundle = app / "model" / name
    config_path = bundle / "configs" / "inference.json"
    config = json.loads(config_path.read_text())
    config["tta"] = 1
    config["network_def"].update(SMALL)
    config_path.write_text(json.dumps(config, indent=4))
    torch.manual_seed(0)
    weights = bundle / "models" / "model.pt"
    torch.save(CascadedUNet(**SMALL, trilinear_decoder=False).state_dict(), weights)
    return app, name, weights


def _get(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def test_monailabel_infers_a_four_channel_study(real_case, tmp_path):
    app, name, weights = _serve_bundle(tmp_path)
    study = _four_channel_study(real_case, tmp_path / "studies")
    study_id = real_case.case_id
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(
        BUNDLE_DOWNLOAD_SRC="github", HOME=str(tmp_path / "home"), OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2")
    )
    log_path = tmp_path / "server.log"
    command = [
        sys.executable,
        "-m",
        "monailabel.main",
        "start_server",
        "--app",
        str(app),
        "--studies",
        str(study.parent),
        "--conf",
        "models",
        name,
        "--conf",
        "sam2",
        "false",
        "--conf",
        "preload",
        "false",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + STARTUP_TIMEOUT
        info = None
        while info is None:
            assert server.poll() is None, f"MONAI Label exited:\n{log_path.read_text()[-4000:]}"
            assert (
                time.time() < deadline
            ), f"MONAI Label did not answer in {STARTUP_TIMEOUT} s:\n{log_path.read_text()[-4000:]}"
            try:
                info = json.loads(_get(f"{base}/info/", timeout=5))
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        assert name in info["models"] and name in info["trainers"]

        request = urllib.request.Request(f"{base}/infer/{name}?image={study_id}&output=image", data=b"", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=INFER_TIMEOUT) as response:
                answer = response.read()
        except urllib.error.HTTPError as e:
            pytest.fail(f"/infer answered {e.code}: {e.read()[:2000]!r}\n{log_path.read_text()[-4000:]}")
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=20)

    (tmp_path / "answer.nii.gz").write_bytes(answer)
    label_map = nib.load(tmp_path / "answer.nii.gz")
    reference = nib.load(study)
    assert label_map.shape == reference.shape[:3] == nib.load(real_case.images[0]).shape
    assert np.allclose(label_map.affine, reference.affine)
    labels = np.asarray(label_map.dataobj)
    assert np.issubdtype(labels.dtype, np.integer) and set(np.unique(labels)) <= {
        0,
        1,
        2,
        4,
    }  # et_label 4: no dataset_dir

    # the same study through the bundle's own `run` (inference.json, same weights): MONAI Label must give the same map,
    # in the study's geometry (a label map resized from the brain crop would have the right shape but not these voxels)
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=str(CONFIG_DIR / "inference.json"),
        workflow_type="infer",
        dataset_dir=str(study),
        output_dir=str(tmp_path / "run"),
        checkpoints=[str(weights)],
        tta=1,
        et_label=4,
        **{f"network_def#{k}": v for k, v in SMALL.items()},
    )
    workflow.initialize()
    workflow.run()
    expected = np.asarray(nib.load(tmp_path / "run" / f"{study_id}.nii.gz").dataobj)
    assert (expected > 0).any()
    agreement = (labels == expected).mean()
    assert agreement > 0.999, agreement  # identical up to float summation order of two processes' thread pools
