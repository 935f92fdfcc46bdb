"""The configs as wiring: one definition of the inference pipeline, short run lines, one key for the label scheme."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CONFIG_DIR, NARROW_NETWORK
from monai.bundle import ConfigParser

MAX_RUN_LINE = 120  # a run line longer than this is logic that belongs in custom/


def _parser(configs, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIG_DIR / c) for c in configs])
    for key, value in overrides.items():
        parser[key] = value
    return parser


def _targets(node) -> set[str]:
    if isinstance(node, dict):
        return ({node["_target_"]} if "_target_" in node else set()) | {t for v in node.values() for t in _targets(v)}
    if isinstance(node, list):
        return {t for v in node for t in _targets(v)}
    return set()


def _outputs(network: torch.nn.Module, size: int = 16) -> int:
    with torch.no_grad():
        return network.eval()(torch.zeros(1, 4, size, size, size)).shape[1]


@pytest.mark.parametrize("configs", [["inference.json"], ["train.json", "evaluate.json"]])
def test_an_explicit_brats2024_scheme_builds_four_outputs_without_a_dataset(tmp_path, configs):
    """An explicit label_scheme is never contradicted by a default guessed from a missing dataset (the old
    inference.json said "et_label 4 contradicts label_scheme brats2024"): ckpt_export and MONAI Label need this."""
    parser = _parser(configs, dataset_dir=str(tmp_path / "none"), label_scheme="brats2024", **NARROW_NETWORK)
    labels = parser.get_parsed_content("labels")
    assert (labels.name, labels.et_label, labels.rc_label) == ("brats2024", 3, 4)
    assert _outputs(parser.get_parsed_content("network_def")) == 4
    if "evaluate.json" in configs:  # the evaluation pipeline, built from inference.json, writes the same labels
        segmenter = parser.get_parsed_content("evaluate#segmenter")
        assert segmenter.labels.name == "brats2024" and _outputs(segmenter.network._template[0]) == 4


def test_et_label_alone_still_picks_the_scheme(tmp_path):
    parser = _parser(["inference.json"], dataset_dir=str(tmp_path / "none"), et_label=3)
    assert parser.get_parsed_content("labels").name == "brats2023"
    assert _parser(["inference.json"], dataset_dir=str(tmp_path)).get_parsed_content("labels").name == "brats2018"


def test_run_lines_are_short_calls_and_evaluate_reuses_the_inference_pipeline():
    configs = {name: json.loads((CONFIG_DIR / name).read_text()) for name in ("inference.json", "evaluate.json")}
    for name, config in configs.items():
        for line in config["run"]:
            assert len(line) <= MAX_RUN_LINE, f"{name}: run line of {len(line)} characters: {line}"
    inference_targets = _targets(configs["inference.json"]) - {"Compose"}
    copied = inference_targets & _targets(configs["evaluate.json"])
    assert not copied, f"evaluate.json defines again what inference.json defines: {sorted(copied)}"
    assert {"LoadImaged", "custom.inference.ensemble.SnapshotFlipEnsemble"} <= inference_targets


def test_one_error_boundary_turns_data_errors_into_a_clean_exit():
    """Library code raises DataError (a ValueError with the case problems); clean_exit, the wrapper of every config
    entry point and command, ends the process with its message; any other error keeps its traceback."""
    import pickle

    from custom.core.errors import CaseProblem, DataError, clean_exit

    problem = CaseProblem("case1", "t1.nii.gz", "file not found", "check the path", kind="read")

    @clean_exit
    def failing(error: Exception):
        raise error

    with pytest.raises(SystemExit) as stop:
        failing(DataError("1 problem:\ncase1: t1.nii.gz: file not found -> check the path", [problem]))
    assert str(stop.value).endswith("-> check the path") and stop.value.__cause__ is None
    with pytest.raises(KeyError):  # a bug is not a data problem
        failing(KeyError("bug"))
    copied = pickle.loads(pickle.dumps(DataError("m", [problem])))  # pre-flight worker processes send these back
    assert isinstance(copied, ValueError) and copied.problems[0].kind == "read" and str(copied) == "m"


def test_an_explicit_et_label_wins_over_a_detected_scheme(tmp_path):
    """A 2024 dataset (RC 4 in its label maps) with --et_label 4: the user's key decides, not the detection."""
    from custom.data.synthetic import synthesize

    synthesize(str(tmp_path / "data"), num_cases=2, shape=(32, 32, 32), seed=1, naming="2024")
    detected = _parser(["inference.json"], dataset_dir=str(tmp_path / "data"))
    assert detected.get_parsed_content("labels").name == "brats2024"
    explicit = _parser(["inference.json"], dataset_dir=str(tmp_path / "data"), et_label=4)
    assert explicit.get_parsed_content("labels").name == "brats2018"


@pytest.mark.parametrize("part", ["train", "validate"])
def test_the_caches_cover_every_deterministic_loading_step(part):
    """MONAI's caches (and the disk cache's key) stop at the first transform that is random or not a MONAI
    ``Transform``: every step of train.json's ``base_preprocessing`` must be cached, or it reruns every epoch and
    the training and validation caches share their disk keys."""
    from monai.transforms import RandomizableTrait, Transform

    parser = ConfigParser()
    parser.read_config(str(CONFIG_DIR / "train.json"))
    parser["dataset_dir"] = "/nonexistent/BraTS"
    transforms = parser.get_parsed_content(f"{part}#preprocessing").flatten().transforms
    first_uncached = next(
        (i for i, t in enumerate(transforms) if isinstance(t, RandomizableTrait) or not isinstance(t, Transform)),
        len(transforms),
    )
    assert first_uncached >= len(parser.get_parsed_content("base_preprocessing")), transforms[first_uncached]
