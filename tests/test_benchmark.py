"""`python -m custom benchmark` on CPU at tiny sizes: JSON lines, FLOP counts, anchor and ratio lines, failures that
stay local to one measurement; torch.compile of the cascade against eager."""

import contextlib
import io
import json
import shutil
import time
from pathlib import Path

import custom.tools.benchmark as bench
import nibabel as nib
import pytest
import torch
from custom.core.runtime import bundle_root
from custom.inference.ensemble import SnapshotFlipEnsemble
from custom.model.losses import CascadeDiceLoss
from custom.model.network import CascadedUNet
from torch.utils.flop_counter import FlopCounterMode

PATCH = 16
TINY = dict(device="cpu", patch=PATCH, volume="16,16,16", tta=2, steps=2, workers=0, loader_cases=3)
COMMON_KEYS = {"device", "device_type", "torch", "dtype", "measure", "settings"}


def _lines(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # every stdout line is one JSON record


def _one(records, **match) -> dict:
    found = [r for r in records if all(r.get(k) == v for k, v in match.items())]
    assert len(found) == 1, (match, records)
    return found[0]


def _flops(network: torch.nn.Module, loss_fn: torch.nn.Module, size: int) -> int:
    """One forward + loss + backward at ``size``^3 on CPU, counted with FlopCounterMode."""
    torch.manual_seed(0)
    x = torch.randn(1, 4, size, size, size)
    y = (torch.rand(1, 3, size, size, size) > 0.5).float()
    network.train()
    with FlopCounterMode(display=False) as counter:
        loss_fn(network(x), y).backward()
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("bench") / "bench.jsonl"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        records = bench.benchmark(**TINY, output=str(output))
    return records, stdout.getvalue(), output


def test_every_line_is_json_with_the_common_keys(tiny_run):
    records, stdout, output = tiny_run
    printed = _lines(stdout)
    assert printed == records and _lines(output.read_text()) == records
    assert [r["measure"] for r in records] == [
        "train_step",
        "train_step",
        "train_step_ratio",
        "infer_case",
        "infer_case",
        "infer_case_ratio",
        "loader",
    ]
    for record in records:
        assert COMMON_KEYS <= set(record), record
        assert "error" not in record, (record["measure"], record.get("model"), record.get("error"))
        assert record["device_type"] == "cpu" and record["torch"] == torch.__version__
        assert record["dtype"] == "float32" and "cores" in record["device"]
        assert record["settings"]["patch"] == [PATCH] * 3 and record["settings"]["compile"] is False


def test_train_steps_time_flops_and_memory(tiny_run):
    records, _, _ = tiny_run
    cascade = _one(records, measure="train_step", model="cascade", mode="eager")
    anchor = _one(records, measure="train_step", model="anchor", mode="eager")
    expected = {
        "cascade": _flops(CascadedUNet(), CascadeDiceLoss(), PATCH),
        "anchor": _flops(bench.anchor_network(), bench.anchor_loss(), PATCH),
    }
    for name, record in (("cascade", cascade), ("anchor", anchor)):
        assert record["ms_per_step"] > 0 and record["first_step_s"] > 0
        assert record["tflop_per_step"] > 0
        assert record["tflop_per_step"] * 1e12 == pytest.approx(expected[name], rel=0.01), name
        achieved = record["tflop_per_step"] / (record["ms_per_step"] / 1e3)
        assert record["tflop_per_s"] == pytest.approx(achieved, rel=1e-3)
        assert record["peak_memory_mib"] > 0 and record["memory_method"].startswith("cpu")
    assert cascade["parameters"] == 24_923_945  # train.json's cascade, trilinear decoder included (see test_network)
    assert anchor["parameters"] == sum(p.numel() for p in bench.anchor_network().parameters())
    ratio = _one(records, measure="train_step_ratio", mode="eager")
    assert ratio["ms_ratio"] == pytest.approx(cascade["ms_per_step"] / anchor["ms_per_step"], rel=1e-3)
    assert ratio["tflop_ratio"] == pytest.approx(expected["cascade"] / expected["anchor"], rel=1e-3)


def test_inference_and_loader_lines(tiny_run):
    records, _, _ = tiny_run
    cascade = _one(records, measure="infer_case", model="cascade", mode="eager")
    anchor = _one(records, measure="infer_case", model="anchor", mode="eager")
    for record in (cascade, anchor):
        assert record["s_per_case"] > 0 and record["peak_memory_mib"] > 0 and record["flips"] == 2
    assert cascade["tta_chunk_used"] == 1  # FlipTTAInferer's CPU default
    # inference.json's network: the paper's snapshot-flip ensemble of the one checkpoint, all flips on it
    assert cascade["ensemble"] == "paper" and cascade["forward_passes"] == 2
    assert all(n % 8 == 0 for n in cascade["crop"]) and cascade["full_padded"] == [16, 16, 16]
    ratio = _one(records, measure="infer_case_ratio", mode="eager")
    assert ratio["s_ratio"] == pytest.approx(cascade["s_per_case"] / anchor["s_per_case"], rel=1e-3)
    loader = _one(records, measure="loader")
    assert loader["samples_per_s"] > 0 and loader["timed_samples"] >= 2 and loader["case_shape"] == [16, 16, 16]
    rate = 1e3 / _one(records, measure="train_step", model="cascade")["ms_per_step"]
    assert loader["ratio_to_eager_train_steps"] == pytest.approx(loader["samples_per_s"] / rate, rel=1e-3)


def test_a_failed_measurement_prints_an_error_line_and_the_others_still_run(monkeypatch, capsys):
    def no_compiler(model, *args, **kwargs):
        raise RuntimeError("torch.compile is unavailable (injected)")

    ensembles = []  # the ensembles the cascade's inference ran: inference.json's SnapshotFlipEnsemble, as inference

    def probabilities(self, x, chunk_size=None, base_inferer=None, activation=torch.sigmoid):
        ensembles.append((self, chunk_size))
        return real_probabilities(self, x, chunk_size, base_inferer, activation)

    real_probabilities = SnapshotFlipEnsemble.probabilities
    monkeypatch.setattr(SnapshotFlipEnsemble, "probabilities", probabilities)
    monkeypatch.setattr(torch, "compile", no_compiler)
    monkeypatch.setattr(bench, "_loader", lambda *a, **k: 1 / 0)
    records = bench.benchmark(**{**TINY, "steps": 1}, measures="loader,infer", compile=True)
    # one eager call through FlipTTAInferer's ensemble path (the compiled one failed while loading its members)
    assert len(ensembles) == 1 and ensembles[0][0].loaded and ensembles[0][0].n_passes == 2
    assert ensembles[0][0].paths[0].endswith("model.pt") and ensembles[0][0].ensemble == "paper"
    assert _lines(capsys.readouterr().out) == records
    assert [(r["measure"], r.get("model"), r.get("mode"), "error" in r) for r in records] == [
        ("infer_case", "cascade", "eager", False),
        ("infer_case", "cascade", "compiled", True),
        ("infer_case", "anchor", "eager", False),
        ("infer_case_ratio", None, "eager", False),
        ("infer_case_ratio", None, "compiled", True),
        ("loader", None, None, True),
    ]
    failed = [r for r in records if "error" in r]
    assert records[1]["error"] == "RuntimeError: torch.compile is unavailable (injected)"
    assert records[-1]["error"].startswith("ZeroDivisionError") and "samples_per_s" not in records[-1]
    assert records[0]["s_per_case"] > 0 and records[0]["settings"]["warmup"] == 0
    assert all(COMMON_KEYS <= set(r) for r in records)
    assert all("\n" not in r["error"] and len(r["error"]) <= 400 for r in failed)  # compiler errors run to pages


def test_configs_come_from_the_bundle_root():
    """The configs of ``bundle_root()``: ``bundle/configs`` here, ``configs/`` of an unpacked zip (tests/test_bundle.py
    runs the benchmark there)."""
    assert bench.config_dir() == Path(bundle_root()) / "configs"
    assert bench.config_dir().resolve() == (Path(__file__).resolve().parents[1] / "bundle" / "configs")
    assert (bench.config_dir() / "inference.json").is_file() and (bench.config_dir() / "train.json").is_file()


def test_settings_as_the_command_line_passes_them():
    # python-fire turns "240,240,155" into a tuple of ints and "train,infer" into a tuple of strings
    assert bench._triple((240, 240, 155), "volume") == (240, 240, 155)
    assert bench._triple("240,240,155", "volume") == bench._triple("240x240x155", "volume") == (240, 240, 155)
    assert bench._triple(64, "patch") == (64, 64, 64)
    assert bench._measures(("infer", "train")) == bench._measures("train,infer") == ["train", "infer"]
    with pytest.raises(ValueError, match="subset of train,infer,loader"):
        bench._measures("train,speed")
    with pytest.raises(ValueError, match="--tta"):
        bench.benchmark(device="cpu", tta=9)


def test_synthetic_brain_is_cropped_like_the_real_case(real_case):
    synthetic = bench._inference_inputs((240, 240, 155), None, seed=0)
    real = bench._inference_inputs(None, str(real_case.dir), seed=0)
    assert real["source"] == real_case.case_id
    assert real["full_padded"] == [bench._ceil8(n) for n in nib.load(real_case.images[0]).shape]
    assert all(n % 8 == 0 for n in real["crop"])  # inference.json pads its crop to multiples of 8
    if real_case.case_id == "BraTS-GLI-00001-000":  # the case the synthetic brain's proportions were taken from
        assert real["crop"] == [160, 208, 160] and real["full_padded"] == [240, 240, 160]  # inference.json's crop
        assert synthetic["crop"] == real["crop"] and synthetic["full_padded"] == real["full_padded"]
    # the brain's bounding box alone (no margin), padded to 8, is 43 % of the padded volume
    brain = bench.synthetic_brain((240, 240, 155))[0] > 0
    box = [int(brain.any(dim=[d for d in range(3) if d != axis]).sum()) for axis in range(3)]
    assert box == pytest.approx([140, 190, 137], abs=2)
    padded_box = bench._ceil8(box[0]) * bench._ceil8(box[1]) * bench._ceil8(box[2])
    assert padded_box / (240 * 240 * 160) == pytest.approx(0.43, abs=0.01)


@pytest.mark.skipif(
    not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")),
    reason="torch.compile's inductor backend needs a C++ compiler (g++ or clang++) for CPU kernels; none on PATH",
)
def test_compiled_cascade_equals_eager_on_cpu():
    """torch.compile (inductor) of a small two-level cascade in eval mode matches eager within atol = rtol = 1e-4
    (float32; the fused GroupNorm reductions sum in another order; measured difference about 1e-6). The first
    compile takes 25-30 s on 2 busy cores, about 5 s with inductor's cache warm."""
    torch.manual_seed(0)
    network = CascadedUNet(init_filters=8, blocks_down=(1, 1), blocks_up=(1,), trilinear_decoder=False).eval()
    x = torch.randn(1, 4, 16, 16, 16)
    with torch.no_grad():
        expected = network(x)
        start = time.perf_counter()
        compiled = torch.compile(network)
        actual = compiled(x)
        print(f"first compiled call: {time.perf_counter() - start:.1f} s")
        again = compiled(x)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(again, expected, atol=1e-4, rtol=1e-4)
