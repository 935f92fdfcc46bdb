import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "bundle" / "configs"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# tests/zoo/ holds the model zoo's unit test of the bundle in the zoo's form; it runs against an unzipped bundle in a
# zoo-like folder, which tests/test_zoo.py builds and runs it in, not from this tree
collect_ignore_glob = ["zoo/*"]

# a narrow test-only network, for tests where the architecture is not under test (test_network.py checks the paper's)
NARROW_NETWORK = {"network_def#init_filters": 8, "network_def#blocks_down": [1, 1, 1, 1]}
# one epoch of train.json on 32^3 synthetic cases, validated at its end
TINY_TRAINING = {
    "epochs": 1,
    "val_interval": 1,
    "patch_size": [32, 32, 32],
    "num_workers": 0,
    "num_folds": 3,
    "memory_format": "contiguous",  # no layout timing (test_workflow.py runs it once)
    **NARROW_NETWORK,
}

# ---- the real BraTS case of the real-data tests: one environment variable names it -------------------------------

CASE_VARIABLE = "BRATS_TEST_CASE"
HOW_TO_ENABLE = (
    f"set {CASE_VARIABLE} to the folder of one BraTS case (any naming, e.g. .../BraTS-GLI-00001-000 or "
    ".../BraTS2021_00001) to run the real-data tests"
)


@dataclass(frozen=True)
class RealCase:
    """The case ``BRATS_TEST_CASE`` points at, as ``custom.data.discovery.discover_cases`` reads it."""

    dir: Path  # the folder holding its files
    case_id: str
    images: list[Path]  # T1, T1c, T2, FLAIR
    label: Path | None  # its segmentation, None for an unlabelled case
    et_label: int  # enhancing-tumour value its naming implies: 3 (BraTS 2023+) or 4 (BraTS 2018-2021)


@dataclass(frozen=True)
class Segmentation:
    path: Path
    et_label: int


def _load_real_case(folder: str) -> RealCase:
    """The one case under ``folder``. A set variable that leads to no usable case fails the tests that use it: a skip
    would hide the mistake (in CI, the real-data tests would silently stop running)."""
    from custom.data.discovery import discover_cases

    where = f"{CASE_VARIABLE}={folder!r}"
    try:
        cases = discover_cases(folder)
    except (OSError, ValueError) as e:
        cases, problem = [], f"{where} holds no usable BraTS case: {e}\n{HOW_TO_ENABLE}"
    if not cases:
        pytest.fail(problem, pytrace=False)  # outside the except: the discovery's traceback says nothing more
    if len(cases) != 1:
        names = ", ".join(c.case_id for c in cases[:5]) + (", ..." if len(cases) > 5 else "")
        pytest.fail(f"{where} holds {len(cases)} cases ({names}); point it at the folder of one case", pytrace=False)
    (case,) = cases
    if len(case.images) != 4:
        pytest.fail(
            f"{where}: {case.case_id} is a single 4-channel file; the real-data tests need the four sequence files "
            "(T1, T1c, T2, FLAIR) of a BraTS case",
            pytrace=False,
        )
    images = [Path(p) for p in case.images]
    given = Path(folder).expanduser().absolute()
    case_dir = given if given.resolve() == images[0].parent else images[0].parent  # keep the path as the user gave it
    return RealCase(case_dir, case.case_id, images, Path(case.label) if case.label else None, case.et_label)


@pytest.fixture(scope="session")
def real_case() -> RealCase:
    """The real BraTS case of ``BRATS_TEST_CASE``; tests using it skip, saying how to enable them, when it is unset."""
    folder = os.environ.get(CASE_VARIABLE, "").strip()
    if not folder:
        pytest.skip(HOW_TO_ENABLE)
    return _load_real_case(folder)


@pytest.fixture(scope="session")
def labelled_case(real_case) -> RealCase:
    """``real_case``, for tests that need its segmentation (they skip for an unlabelled case)."""
    if real_case.label is None:
        pytest.skip(
            f"{real_case.case_id} ({real_case.dir}) has no segmentation file; point {CASE_VARIABLE} at a labelled "
            "BraTS case (a training case) to run this test"
        )
    return real_case


def swap_et(labels: np.ndarray, et_label: int) -> np.ndarray:
    """Copy of a BraTS label map with enhancing tumour moved from ``et_label`` to the other convention (3 <-> 4)."""
    out = np.array(labels, copy=True)
    out[out == et_label] = 7 - et_label
    return out


@pytest.fixture(scope="session")
def other_convention_seg(labelled_case, tmp_path_factory) -> Segmentation:
    """The case's own segmentation with ET written the other way (3 -> 4 for a BraTS 2023+ case, 4 -> 3 for an older
    one), as a file: the same tumour in the other label convention."""
    image = nib.load(labelled_case.label)
    data = swap_et(np.asanyarray(image.dataobj), labelled_case.et_label)
    other = 7 - labelled_case.et_label
    path = tmp_path_factory.mktemp("relabelled") / f"{labelled_case.case_id}_et{other}.nii.gz"
    nib.Nifti1Image(data, image.affine, image.header).to_filename(str(path))
    return Segmentation(path, other)


@pytest.fixture(scope="session")
def algorithm_segmentation(labelled_case) -> Segmentation:
    """Another algorithm's segmentation of the case, for tests that compare two independent segmentations:
    ``<case folder>/../algorithm_segmentations/<case_id>_*.nii.gz`` (first in name order). Its ET label is read from
    its values (4 when 4 occurs, else 3 when 3 occurs, else the case's)."""
    folder = labelled_case.dir.parent / "algorithm_segmentations"
    found = sorted(folder.glob(f"{labelled_case.case_id}_*.nii.gz"))
    if not found:
        pytest.skip(
            f"no other algorithm's segmentation of {labelled_case.case_id} at {folder}/{labelled_case.case_id}_*.nii.gz; "
            "to run this test, save a segmentation of this case by another method (e.g. a BraTS challenge "
            "submission or any trained model's prediction) there"
        )
    values = set(np.unique(np.asanyarray(nib.load(found[0]).dataobj)).tolist())
    et_label = 4 if 4 in values else 3 if 3 in values else labelled_case.et_label
    return Segmentation(found[0], et_label)
