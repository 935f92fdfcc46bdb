"""The documentation's key tables agree with the configs, and no document points outside the repository.

A key table is a markdown table whose header is ``| <config> key | default | meaning |`` with ``<config>`` one of
``train``, ``inference``, ``evaluate`` (evaluate.json merged over train.json) or ``demo`` (demo.json merged over
train.json). Each row documents one key in backticks (``network_def#init_filters`` reaches into nested dicts). A
literal default must be written so that it parses as JSON to the config's value (``405``, ``[128, 128, 128]``,
``1e-4``, ``true``, ``null``) or, for a string, is the string itself (``memory``); a default computed by an
expression (``$...``, ``@...``) must be described in words, not given as a value.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "bundle" / "configs"
DOCS_DIR = REPO_ROOT / "bundle" / "docs"
CONFIGURATION_DOC = DOCS_DIR / "configuration.md"

# config named in a table header -> the config files it is merged from, and the file whose own keys it documents
CONFIG_FILES = {
    "train": ("train.json",),
    "inference": ("inference.json",),
    "evaluate": ("train.json", "evaluate.json"),
    "demo": ("train.json", "demo.json"),
}
# keys that wire the workflow together rather than being set by users
INTERNAL_KEYS = {
    "imports",
    "bundle_root",
    "datalist",
    "checked_datalist",
    "labels",
    "network",
    "ckpt_dir",
    "log_dir",
    "amp_dtype",
    "training",
    "run",
    "initialize",
    "finalize",
    "output_settings",
    "eval_dir",
}
HEADER_TAIL = ["default", "meaning"]
KEY_CELL = re.compile(r"^`([A-Za-z0-9_#]+)`$")
MISSING = object()


def key_table_documents() -> list[Path]:
    """Where key tables may live: the one list of them, and the two READMEs that must not keep their own."""
    return [CONFIGURATION_DOC, REPO_ROOT / "README.md", DOCS_DIR / "README.md"]


def documents() -> list[Path]:
    return [REPO_ROOT / "README.md", *sorted(DOCS_DIR.glob("*.md")), REPO_ROOT / "bundle" / "models" / "README.md"]


def split_row(line: str) -> list[str]:
    """Cells of a markdown table row; a ``|`` inside backticks does not split."""
    cells, current, in_code = [], "", False
    for char in line.strip().strip("|"):
        if char == "`":
            in_code = not in_code
        if char == "|" and not in_code:
            cells.append(current.strip())
            current = ""
        else:
            current += char
    cells.append(current.strip())
    return cells


def markdown_tables(text: str) -> list[tuple[int, list[str], list[list[str]]]]:
    """``(line number of the header, header cells, body rows)`` of every table outside fenced code blocks."""
    tables, block, start, fenced = [], [], 0, False
    for number, line in enumerate(text.splitlines() + [""], start=1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if not fenced and line.lstrip().startswith("|"):
            if not block:
                start = number
            block.append(line)
            continue
        if len(block) >= 2:
            tables.append((start, split_row(block[0]), [split_row(row) for row in block[2:]]))
        block = []
    return tables


def key_tables(path: Path) -> list[tuple[str, int, list[str], list[list[str]]]]:
    """``(config, line, header, rows)`` of every table of ``path`` whose first header cell ends with "key"
    (config is "" when the header does not name one)."""
    found = []
    for line, header, rows in markdown_tables(path.read_text()):
        first = header[0].strip().lower()
        if first == "key" or first.endswith(" key"):
            words = first.split()
            config = words[0] if len(words) == 2 else ""
            found.append((config, line, header, rows))
    return found


def display(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def merged_config(config: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIG_DIR / name) for name in CONFIG_FILES[config]])
    return parser


def is_expression(value) -> bool:
    """A default that the config computes: an expression or reference, or a list/dict holding one."""
    if isinstance(value, str):
        return value.startswith(("$", "@", "%"))
    if isinstance(value, (list, tuple)):
        return any(is_expression(v) for v in value)
    if isinstance(value, dict):
        return any(is_expression(v) for v in value.values())
    return False


def parse_cell(cell: str):
    """The value a default cell states: JSON (``405``, ``1e-4``, ``[1, 2]``, ``true``, ``null``) or the plain string."""
    text = cell.replace("`", "").strip()
    try:
        return json.loads(text)
    except ValueError:
        return text


def same_value(stated, actual) -> bool:
    """Equality that keeps booleans apart from numbers (``1`` does not document ``true``)."""
    if isinstance(stated, bool) or isinstance(actual, bool):
        return isinstance(stated, bool) and isinstance(actual, bool) and stated == actual
    if isinstance(stated, (int, float)) and isinstance(actual, (int, float)):
        return float(stated) == float(actual)
    if isinstance(stated, list) and isinstance(actual, (list, tuple)):
        return len(stated) == len(actual) and all(same_value(s, a) for s, a in zip(stated, actual))
    return type(stated) is type(actual) and stated == actual


def is_prose(cell: str) -> bool:
    """A description in words, not a value: not JSON and more than one word."""
    text = cell.replace("`", "").strip()
    try:
        json.loads(text)
        return False
    except ValueError:
        return len(text.split()) > 1


def row_problems(config: str, parser: ConfigParser, rows: list[list[str]], where: str) -> tuple[list[str], set[str]]:
    """What is wrong with the rows of one ``config`` key table, and the keys it documents."""
    problems, keys = [], set()
    for row in rows:
        match = KEY_CELL.match(row[0]) if len(row) == 3 else None
        if match is None:
            problems.append(f"{where}: a row must have 3 cells and one key in backticks: {row}")
            continue
        key, cell = match.group(1), row[1]
        keys.add(key)
        value = parser.get(key, MISSING)
        if value is MISSING:
            problems.append(f"{where}: `{key}` is not a key of {' + '.join(CONFIG_FILES[config])}")
        elif is_expression(value):
            if not is_prose(cell):
                problems.append(
                    f"{where}: `{key}` is computed ({value!r}); describe its default in words, not {cell!r}"
                )
        elif not same_value(parse_cell(cell), value):
            problems.append(f"{where}: `{key}` defaults to {json.dumps(value)} in the config, the table says {cell!r}")
    return problems, keys


def user_facing_keys(config: str) -> set[str]:
    """Top-level keys of the config's own file that users set: literals and expressions, not components."""
    own = json.loads((CONFIG_DIR / CONFIG_FILES[config][-1]).read_text())

    def component(value) -> bool:
        return isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, dict) for v in value))

    return {k for k, v in own.items() if k not in INTERNAL_KEYS and not k.startswith("+") and not component(v)}


def check_documents(paths: list[Path]) -> tuple[list[str], dict[str, set[str]]]:
    """All problems of the key tables in ``paths``, and the keys documented per config."""
    problems, documented = [], {config: set() for config in CONFIG_FILES}
    for path in paths:
        if not path.is_file():
            continue
        for config, line, header, rows in key_tables(path):
            where = f"{display(path)}:{line}"
            if config not in CONFIG_FILES or [h.lower() for h in header[1:]] != HEADER_TAIL:
                problems.append(
                    f"{where}: a key table's header must be `| <config> key | default | meaning |` with "
                    f"<config> one of {sorted(CONFIG_FILES)}, not {header}"
                )
                continue
            found, keys = row_problems(config, merged_config(config), rows, where)
            problems += found
            documented[config] |= keys
    return problems, documented


# ---------------------------------------------------------------------------------------------------------------


def test_key_tables_state_the_configs_defaults():
    problems, _ = check_documents(key_table_documents())
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("config", sorted(CONFIG_FILES))
def test_every_user_facing_key_is_in_its_table(config):
    _, documented = check_documents(key_table_documents())
    assert documented[config], f"{CONFIGURATION_DOC.name} has no `| {config} key | default | meaning |` table"
    missing = sorted(user_facing_keys(config) - documented[config])
    assert not missing, f"keys of {CONFIG_FILES[config][-1]} missing from the {config} key table: {missing}"


def test_the_readmes_keep_no_key_tables_of_their_own():
    for path in (REPO_ROOT / "README.md", DOCS_DIR / "README.md"):
        assert not key_tables(path), f"{path.relative_to(REPO_ROOT)}: key tables belong in {CONFIGURATION_DOC.name}"


def test_no_document_mentions_files_outside_the_repository():
    for path in documents():
        text = path.read_text()
        for forbidden in ("../shared", "DESIGN.md"):
            assert forbidden not in text, f"{path.relative_to(REPO_ROOT)} mentions {forbidden}"


def test_the_checker_catches_wrong_defaults_unknown_keys_and_values_for_expressions(tmp_path):
    doc = tmp_path / "configuration.md"
    doc.write_text(
        "| train key | default | meaning |\n| --- | --- | --- |\n"
        "| `epochs` | 404 | one less than the config |\n"
        "| `learning_rate` | 1e-4 | right, written as 1e-4 for 0.0001 |\n"
        "| `deterministic` | 0 | a number for a boolean |\n"
        "| `network_def#init_filters` | 32 | nested key, wrong |\n"
        "| `compile` | false | a value for an expression |\n"
        "| `no_such_key` | 1 | not in the config |\n"
        "| `fold` / `num_folds` | 0 / 5 | two keys in one row |\n\n"
        "| key | default | meaning |\n| --- | --- | --- |\n| `epochs` | 405 | no config named |\n"
    )
    problems, documented = check_documents([doc])
    text = "\n".join(problems)
    assert "`epochs` defaults to 405" in text
    assert "learning_rate" not in text
    assert "`deterministic` defaults to false" in text
    assert "`network_def#init_filters` defaults to 16" in text
    assert "`compile` is computed" in text
    assert "`no_such_key` is not a key" in text
    assert "one key in backticks" in text
    assert "header must be" in text
    assert len(problems) == 7, text
    assert "dataset_dir" in user_facing_keys("train") - documented["train"]
