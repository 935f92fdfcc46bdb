"""The bundle: its metadata, the monai.bundle verbs (verify_net_in_out,
ckpt_export, onnx_export), the bundle zip, and the unzipped bundle training and inferring on its own."""

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONFIG_DIR, NARROW_NETWORK, REPO_ROOT
from custom.model.network import CascadedUNet
from custom.tools.package import BUNDLE_CONFIGS, BUNDLE_ID, bundle_files, default_output, package

BUNDLE_DIR = REPO_ROOT / "bundle"
META_FILE = CONFIG_DIR / "metadata.json"
INFERENCE_CONFIG = CONFIG_DIR / "inference.json"
# a small cascade for the export and end-to-end tests (the full one is 24.9 M parameters); every override names a
# `network_def` argument, so the same overrides apply to ckpt_export, onnx_export and `monai.bundle run`
SMALL_ARGS = {"init_filters": 8, "blocks_down": (1, 1, 1, 1), "trilinear_decoder": False}


def _cli_overrides(overrides: dict) -> list[str]:
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return args


def _run(command, cwd=REPO_ROOT, env=None, timeout=300):
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    """Random weights of the small inference network, as training would write them (no trilinear decoder)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "model.pt"
    torch.save(CascadedUNet(**SMALL_ARGS).state_dict(), path)
    return path


def _eager(checkpoint: Path) -> CascadedUNet:
    network = CascadedUNet(**SMALL_ARGS)
    network.load_state_dict(torch.load(checkpoint, weights_only=True))
    return network.eval()


# ---------------------------------------------------------------------------------------------------------------
# metadata


def test_metadata_has_what_the_specification_and_this_project_ask():
    meta = json.loads(META_FILE.read_text())
    assert meta["version"] in meta["changelog"]
    assert meta["monai_version"] and meta["pytorch_version"] and meta["numpy_version"]
    assert "nibabel" in meta["required_packages_version"]
    assert "optional_packages_version" not in meta  # MONAI >= 1.4 warns on every run that the name is deprecated
    image = meta["network_data_format"]["inputs"]["image"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert image["num_channels"] == 4 and image["channel_def"] == {"0": "T1", "1": "T1c", "2": "T2", "3": "FLAIR"}
    assert pred["num_channels"] == 3 and pred["channel_def"] == {"0": "TC", "1": "WT", "2": "ET"}
    assert image["spatial_shape"] == ["8*n"] * 3 and pred["spatial_shape"] == ["8*n"] * 3
    references = " ".join(meta["references"])
    assert "Two-Stage Cascaded U-Net" in references and "BRATS" in references and "Baid" in references
    assert not meta.get("eval_metrics")  # no BraTS accuracy was measured by this project; the paper's is cited
    for key in (
        "task",
        "description",
        "authors",
        "copyright",
        "data_source",
        "data_type",
        "image_classes",
        "label_classes",
        "pred_classes",
        "intended_use",
    ):
        assert meta[key], key
    assert "0.9094" in meta["description"] and "paper" in meta["description"]  # the paper's figures, as the paper's


def test_verify_net_in_out_with_the_full_size_network():
    """The full 24.9 M parameter cascade of inference.json on 8*n inputs (n=1: 8^3, n=3: 24^3); a few seconds on CPU."""
    from monai.bundle import verify_net_in_out

    for n in (1, 3):
        verify_net_in_out("network_def", meta_file=str(META_FILE), config_file=str(INFERENCE_CONFIG), device="cpu", n=n)


# ---------------------------------------------------------------------------------------------------------------
# exports


def _export_command(verb: str, exported, checkpoint, *extra: str) -> list[str]:
    """``python -m monai.bundle <verb> network_def`` of inference.json with the narrow test network."""
    return [
        sys.executable, "-m", "monai.bundle", verb, "network_def", "--filepath", str(exported),
        "--ckpt_file", str(checkpoint), "--meta_file", str(META_FILE), "--config_file", str(INFERENCE_CONFIG),
        *extra, *_cli_overrides(NARROW_NETWORK),
    ]  # fmt: skip


@pytest.mark.parametrize("use_trace", [False, True], ids=["scripted", "traced"])
def test_ckpt_export_torchscript_equals_the_eager_network(small_checkpoint, tmp_path, use_trace):
    """The model card's command, scripted (``ckpt_export``'s default and the model zoo's check) and traced: both
    equal the eager network on a shape other than the 8^3 of the trace (the eval-mode forward has no data-dependent
    branch)."""
    from monai.data import load_net_with_metadata

    exported = tmp_path / "model.ts"
    _run(_export_command("ckpt_export", exported, small_checkpoint, "--use_trace", str(use_trace)))
    traced, meta, extra = load_net_with_metadata(str(exported), more_extra_files=["inference.json"])
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "TC", "1": "WT", "2": "ET"}
    assert json.loads(extra["inference.json"])["network_def"]["_target_"] == "custom.model.network.CascadedUNet"
    torch.manual_seed(1)
    x = torch.randn(1, 4, 16, 24, 32)  # not the 8^3 shape it was traced with
    with torch.no_grad():
        expected, actual = _eager(small_checkpoint)(x), traced(x)
    assert actual.shape == (1, 3, 16, 24, 32)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


ONNX_KWARGS = (
    "{'dynamo': False, 'input_names': ['image'], 'output_names': ['pred'], "
    "'dynamic_axes': {'image': {0: 'batch', 2: 'x', 3: 'y', 4: 'z'}, 'pred': {0: 'batch', 2: 'x', 3: 'y', 4: 'z'}}}"
)


@pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None,
    reason="ONNX export is an optional extra: pip install onnx onnxruntime (or .[onnx])",
)
def test_onnx_export_equals_the_eager_network(small_checkpoint, tmp_path):
    import onnxruntime

    exported = tmp_path / "model.onnx"
    _run(
        _export_command(
            "onnx_export", exported, small_checkpoint, "--use_trace", "True", "--converter_kwargs", ONNX_KWARGS
        )
    )
    session = onnxruntime.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    torch.manual_seed(1)
    x = torch.randn(1, 4, 16, 24, 32)  # dynamic spatial axes: not the 8^3 export shape
    (actual,) = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        expected = _eager(small_checkpoint)(x).numpy()
    assert actual.shape == (1, 3, 16, 24, 32)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# the bundle zip


def _names(zip_path: Path) -> list[str]:
    with zipfile.ZipFile(zip_path) as archive:
        return archive.namelist()


def test_package_writes_one_folder_with_the_bundle_and_the_code(tmp_path, small_checkpoint):
    meta = json.loads(META_FILE.read_text())
    name = BUNDLE_ID
    assert default_output() == os.path.join("dist", f"{name}_v{meta['version']}.zip")

    zip_path = Path(package(output=str(tmp_path / "out" / "bundle.zip")))
    names = _names(zip_path)
    assert {n.split("/")[0] for n in names} == {name}
    for required in (
        "LICENSE",
        "large_files.yml",
        "configs/metadata.json",
        "configs/inference.json",
        "configs/train.json",
        "configs/evaluate.json",
        "configs/logging.conf",
        "docs/README.md",
        "docs/data_license.txt",
        "custom/__init__.py",
        "custom/__main__.py",
        "custom/model/network.py",
        "custom/tools/package.py",
        "custom/tools/benchmark.py",
        "models/",
    ):
        assert f"{name}/{required}" in names, required
    configs = set(BUNDLE_CONFIGS)  # the bundle's own configs; tests/test_checkpoints.py checks the list is complete
    assert {n.split("/")[-1] for n in names if n.startswith(f"{name}/configs/")} - {""} == configs
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    assert not any(
        n.startswith(f"{name}/models/") and n not in (f"{name}/models/", f"{name}/models/README.md") for n in names
    )  # no weights by default, only the note on how to get them
    assert "Apache License" in zipfile.ZipFile(zip_path).read(f"{name}/LICENSE").decode()
    assert [p.name for p in zip_path.parent.iterdir()] == ["bundle.zip"]  # no temporary file left behind

    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        package(output=str(tmp_path / "w.zip"), weights=str(tmp_path / "nothere.pt"))
    with pytest.raises(
        ValueError, match="do not fit `network_def`"
    ):  # weights of another network_def than inference.json's
        package(output=str(tmp_path / "w.zip"), weights=str(small_checkpoint))
    assert not (tmp_path / "w.zip").exists()
    files = bundle_files(with_weights=False)
    assert "models/model.pt" not in files and all(source.is_file() for source in files.values())

    # every tool the zip ships runs from it: imported from the unpacked folder alone, the benchmark on its configs
    shipped = [n[len(f"{name}/") :] for n in names if n.startswith(f"{name}/custom/tools/") and n.endswith(".py")]
    tools = {relative: relative[: -len(".py")].replace("/", ".").removesuffix(".__init__") for relative in shipped}
    assert {"custom.tools", "custom.tools.benchmark", "custom.tools.package", "custom.tools.visualize"} <= set(
        tools.values()
    )
    bundle, run = _unpacked_bundle(zip_path, tmp_path)
    imported = dict(line.split("=", 1) for line in run("--import", *tools.values()).splitlines() if "=" in line)
    for relative, module in tools.items():
        assert imported[module] == str(bundle / relative), module
    assert imported["CONFIG_DIR"] == str(bundle / "configs")  # the benchmark reads the unpacked configs
    assert "--measures" in run("custom", "benchmark", "--help")
    # the smallest measurement its command line allows: one whole-case inference, one flip, a 16^3 volume
    lines = tmp_path / "benchmark.jsonl"
    run(
        "custom",
        "benchmark",
        "--device",
        "cpu",
        "--measures",
        "infer",
        "--steps",
        "1",
        "--tta",
        "1",
        "--volume",
        "16,16,16",
        "--output",
        str(lines),
    )
    records = [json.loads(line) for line in lines.read_text().splitlines()]
    assert [r["measure"] for r in records] == ["infer_case", "infer_case", "infer_case_ratio"]
    assert all("error" not in r for r in records), records
    assert records[0]["ensemble"] == "paper" and records[0]["s_per_case"] > 0


def test_package_with_weights_ships_models_model_pt(tmp_path):
    weights = tmp_path / "full.pt"
    torch.save(CascadedUNet(trilinear_decoder=False).state_dict(), weights)  # inference.json's network_def
    zip_path = Path(package(output=str(tmp_path / "bundle.zip"), weights=str(weights)))
    name = BUNDLE_ID
    with zipfile.ZipFile(zip_path) as archive:
        assert archive.read(f"{name}/models/model.pt") == weights.read_bytes()


# ---------------------------------------------------------------------------------------------------------------
# the unzipped bundle on its own

# Runs a module with the unpacked bundle folder (the working directory) first on sys.path and this repository off it,
# also when the repository is pip-installed in editable mode, so that only the bundle's own copy of `custom` exists.
ISOLATED_RUNNER = """
import os, runpy, sys
repo, module = os.path.realpath(sys.argv[1]), sys.argv[2]
inside = lambda p: os.path.realpath(p or os.getcwd()) == repo or os.path.realpath(p or os.getcwd()).startswith(repo + os.sep)
sys.path[:] = [os.getcwd()] + [p for p in sys.path if p and not inside(p)]
sys.meta_path[:] = [f for f in sys.meta_path if "brats_cascaded_unet" not in (getattr(f, "__module__", "") or "")]
if module == "--where":
    import custom, custom.core.runtime
    print("CUSTOM=" + os.path.realpath(custom.__file__))
    print("BUNDLE_ROOT=" + os.path.realpath(custom.core.runtime.bundle_root()))
elif module == "--import":  # the modules named, where each came from, and the configs the benchmark reads
    import importlib
    for name in sys.argv[3:]:
        print(name + "=" + os.path.realpath(importlib.import_module(name).__file__))
    import custom.tools.benchmark
    print("CONFIG_DIR=" + os.path.realpath(custom.tools.benchmark.config_dir()))
else:
    sys.argv = [module] + sys.argv[3:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def _clean_env() -> dict:
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH", "PYTHONSTARTUP")
    }
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "2")
    return env


def _unpacked_bundle(zip_path: Path, tmp_path: Path):
    """Unzips ``zip_path`` under ``tmp_path``; returns the bundle folder and ``run(module, *args)``, which runs a
    module (or ``--where`` / ``--import``, see ``ISOLATED_RUNNER``) there with only the bundle's copy of ``custom``."""
    name = BUNDLE_ID
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    zipfile.ZipFile(zip_path).extractall(unpacked)
    assert [p.name for p in unpacked.iterdir()] == [name]
    bundle = (unpacked / name).resolve()
    runner = tmp_path / "run_isolated.py"
    runner.write_text(ISOLATED_RUNNER)
    env = _clean_env()

    def run(module, *args, timeout=240):
        return _run([sys.executable, str(runner), str(REPO_ROOT), module, *args], cwd=bundle, env=env, timeout=timeout)

    return bundle, run


def test_unzipped_bundle_runs_its_own_code(tmp_path):
    """The unpacked zip imports its own ``custom`` and is its own bundle root, with this repository off the path.
    Training, evaluation and inference from the unpacked zip run in ``tests/test_zoo.py`` (the zoo-form unit test)."""
    zip_path = Path(package(output=str(tmp_path / "dist" / "bundle.zip")))
    bundle, run = _unpacked_bundle(zip_path, tmp_path)
    where = dict(line.split("=", 1) for line in run("--where").splitlines() if "=" in line)
    assert where["CUSTOM"] == str(bundle / "custom" / "__init__.py")
    assert where["BUNDLE_ROOT"] == str(bundle)
