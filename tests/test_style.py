"""The file formats of the model zoo's pre-commit hooks: JSON configs as ``pretty-format-json --indent=4
--no-sort-keys`` writes them (one item per line) and every text file ending in exactly one newline.

black, isort and flake8 run in ``.ci/run`` with the settings of ``pyproject.toml`` and ``setup.cfg``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".json", ".md", ".cfg", ".toml", ".conf", ".yml", ".yaml", ".txt"}


def _tracked() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the file list comes from git ls-files")
    return [REPO / line for line in out.splitlines() if line]


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "bundle" / "configs").glob("*.json")))
def test_json_configs_are_pretty_formatted(name):
    path = REPO / "bundle" / "configs" / name
    text = path.read_text()
    expected = json.dumps(json.loads(text), indent=4, ensure_ascii=False) + "\n"
    assert text == expected, f"{path} is not formatted as pretty-format-json --indent=4 --no-sort-keys writes it"


def test_text_files_end_with_one_newline():
    bad = []
    for path in _tracked():
        if path.suffix not in TEXT_SUFFIXES and path.name not in ("run", "LICENSE") or not path.is_file():
            continue
        data = path.read_bytes()
        if data and (not data.endswith(b"\n") or data.endswith(b"\n\n")):
            bad.append(str(path.relative_to(REPO)))
    assert not bad, f"files that do not end with exactly one newline: {bad}"
