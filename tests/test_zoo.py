"""What the MONAI model zoo checks of a submitted bundle, run on the packaged bundle here: the metadata against the
zoo's own schema, TorchScript by ``ckpt_export``'s default (scripting), the zoo-form unit test (train, evaluate,
infer through ``ConfigWorkflow``) in a zoo-like folder, and the requirements the zoo's CI installs from the metadata.

The zoo's schema is a data file of the zoo (``meta_schema_20240725.json``, named by ``schema`` of the metadata); the
schema test reads it from ``ZOO_META_SCHEMA`` and skips, saying so, without it. The zoo's CI scripts themselves
(``ci/verify_bundle.py`` and friends) are run against the bundle outside this repository (bundle/docs/README.md,
"Model zoo").
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import CONFIG_DIR, REPO_ROOT
from custom.model.network import CascadedUNet
from custom.tools.package import BUNDLE_ID, package

META_FILE = CONFIG_DIR / "metadata.json"
SCHEMA_VARIABLE = "ZOO_META_SCHEMA"
ZOO_TEST = REPO_ROOT / "tests" / "zoo" / f"test_{BUNDLE_ID}.py"


def _zoo_schema() -> Path:
    path = os.environ.get(SCHEMA_VARIABLE, "").strip()
    if not path:
        pytest.skip(
            f"set {SCHEMA_VARIABLE} to the model zoo's metadata schema (meta_schema_20240725.json, the file named by "
            "`schema` in bundle/configs/metadata.json) to check the metadata against it"
        )
    if not Path(path).is_file():
        pytest.fail(f"{SCHEMA_VARIABLE}={path!r} is not a file", pytrace=False)
    return Path(path)


@pytest.mark.skipif(importlib.util.find_spec("jsonschema") is None, reason="verify_metadata needs jsonschema")
def test_metadata_passes_the_zoo_schema_and_its_conventions(tmp_path):
    from monai.bundle import verify_metadata

    schema = _zoo_schema()
    meta = json.loads(META_FILE.read_text())
    assert meta["schema"].rsplit("/", 1)[-1] == schema.name  # the schema the metadata names is the one checked
    verify_metadata(meta_file=str(META_FILE), filepath=str(schema))  # raises on any violation

    # the zoo's conventions beyond the schema: a display name, the folder id apart, segmentation output
    assert meta["name"] != BUNDLE_ID and " " in meta["name"]
    assert BUNDLE_ID.startswith("brats_mri_") and BUNDLE_ID.endswith("_segmentation")
    assert meta["network_data_format"]["outputs"]["pred"]["format"] == "segmentation"
    assert "monai-label" in meta["supported_apps"]
    assert meta["data_source"].startswith("https://")

    # the checker can fail: a metadata without `schema` (required by the zoo's schema) is refused
    broken = {k: v for k, v in meta.items() if k != "schema"}
    (tmp_path / "metadata.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="schema"):
        verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=str(schema))


def test_required_packages_are_pinned_for_the_zoo_ci():
    """The zoo's CI installs ``monai==``, ``torch==``, ``numpy==`` and every ``required_packages_version`` pin on
    Python 3.10 (its GitHub runners): the pins are exact and none is a release limited to newer Pythons (numpy 2.3+,
    scipy 1.16+, matplotlib 3.11+ need Python 3.11). Resolution on 3.10 and 3.12 was checked with
    ``pip install --dry-run`` (bundle/docs/README.md, "Model zoo")."""
    meta = json.loads(META_FILE.read_text())
    pins = {
        "monai": meta["monai_version"],
        "torch": meta["pytorch_version"],
        "numpy": meta["numpy_version"],
        **meta["required_packages_version"],
    }
    for name, version in pins.items():
        parts = version.split(".")
        assert all(p.isdigit() for p in parts), f"{name}=={version} is not an exact release"
    newest_for_py310 = {"numpy": (2, 2), "scipy": (1, 15), "matplotlib": (3, 10)}
    for name, limit in newest_for_py310.items():
        if name in pins:
            assert tuple(int(p) for p in pins[name].split(".")[:2]) <= limit, f"{name}=={pins[name]} needs Python 3.11"


def test_network_scripts_with_the_state_dict_of_the_eager_network():
    """``ckpt_export`` scripts by default (the zoo has no trace option): the scripted network equals the eager one on
    a shape it never saw, and scripting changes no state-dict key (checkpoints load into either)."""
    torch.manual_seed(0)
    eager = CascadedUNet(init_filters=8, blocks_down=(1, 1, 1, 1), trilinear_decoder=False).eval()
    scripted = torch.jit.script(eager)
    assert list(scripted.state_dict()) == list(eager.state_dict())
    assert "stage1.encoder.levels.0.1.conv1.conv.weight" in eager.state_dict()  # nn.Sequential keys, as before
    x = torch.randn(1, 4, 16, 24, 32)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), eager(x), rtol=0, atol=0)
    with pytest.raises(Exception, match="divisible by 8"):
        scripted(torch.randn(1, 4, 12, 16, 16))


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "BUNDLE_ROOT")}
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "2")
    return env


def test_zoo_unit_test_passes_in_a_zoo_layout(tmp_path):
    """The packaged bundle at ``models/<id>`` and the zoo-form test at ``ci/unit_tests/``, run from that root the way
    the zoo's runner does (train one epoch, evaluate, infer 6 synthetic 32^3 cases, narrow network)."""
    zoo = tmp_path / "zoo"
    (zoo / "models").mkdir(parents=True)
    (zoo / "ci" / "unit_tests").mkdir(parents=True)
    zipfile.ZipFile(package(output=str(tmp_path / "bundle.zip"))).extractall(zoo / "models")
    assert (zoo / "models" / BUNDLE_ID / "configs" / "metadata.json").is_file()
    shutil.copy(ZOO_TEST, zoo / "ci" / "unit_tests" / ZOO_TEST.name)
    result = subprocess.run(
        [sys.executable, str(Path("ci") / "unit_tests" / ZOO_TEST.name), "-v"],
        cwd=zoo,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=480,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    assert "Ran 2 tests" in log and "skipped" not in log, log[-3000:]
    assert not (zoo / "models" / BUNDLE_ID / "runs").exists()  # everything went to the test's own folders


def test_large_files_yml_reads_with_monai_and_lists_nothing(tmp_path):
    """``large_files.yml`` is valid for MONAI's ``download_large_files`` (given the bundle folder alone: MONAI 1.6.1
    fails with ``--large_file_name``, see the file's comment) and for the zoo's reader (a ``large_files`` list); it
    lists nothing, so nothing is fetched."""
    from monai.bundle import ConfigParser, download_large_files

    bundle = tmp_path / "bundle"
    zipfile.ZipFile(package(output=str(tmp_path / "bundle.zip"))).extractall(bundle)
    root = bundle / BUNDLE_ID
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    download_large_files(bundle_path=str(root))
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    parser = ConfigParser()
    parser.read_config(str(root / "large_files.yml"))
    assert parser.get()["large_files"] == []
