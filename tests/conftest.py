import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
REAL_CASE = SHARED_DATA / "BraTS-GLI-00001-000"
CONFIG_DIR = REPO_ROOT / "bundle" / "configs"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def real_case() -> Path:
    if not (REAL_CASE / "BraTS-GLI-00001-000-t1n.nii.gz").exists():
        pytest.skip(f"the real BraTS case is not at {REAL_CASE} (see shared/data/README.md of the project)")
    return REAL_CASE
