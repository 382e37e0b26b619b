import json

import pytest
import torch

import torchconstrain.demo
from torchconstrain.__main__ import main
from torchconstrain.demo import DemoConfig, default_rules_path, run_demo
from torchconstrain.errors import ConstraintViolation

# One epoch of two batches, short latency timing, a small calibration set: the whole demo but the
# ExecuTorch lowering in a few seconds. Only the ``tiny`` fixture exports; the command line runs skip it.
TINY = {"epochs": 1, "limit_batches": 2, "latency_time": 0.01, "progress": False, "calibration_images": 64}
PROGRAMS = ("executorch_fp32", "executorch_int8")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = ("curves.png", "sparsity.png", "weights.png")
THREADS = torch.get_num_threads()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out=out, **TINY)


@pytest.fixture
def quick_cli(monkeypatch):
    """Make the command line run the tiny setting (the CLI keeps its own flags)."""
    def run(config):
        return run_demo(config, limit_batches=TINY["limit_batches"], latency_time=TINY["latency_time"],
                        progress=False, deploy=False)

    monkeypatch.setattr(torchconstrain.demo, "run_demo", run)


def without_timing_and_programs(metrics: dict) -> dict:
    kept = {key: value for key, value in metrics.items() if key != "timing"}
    kept["stages"] = {name: stage for name, stage in metrics["stages"].items() if name not in PROGRAMS}
    kept["verification"] = {key: value for key, value in metrics["verification"].items()
                            if not key.startswith("executorch")}
    kept["settings"] = {key: value for key, value in metrics["settings"].items() if key != "deploy"}
    return kept


def test_the_demo_writes_every_artefact(tiny):
    out, result = tiny
    assert result.ok
    assert sorted(path.name for path in result.files) == sorted(["report.md", "metrics.json", *PLOTS,
                                                                 *(f"{name}.pte" for name in PROGRAMS)])
    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000, name
    report = (out / "report.md").read_text()
    for text in ("## Stages", "| shrunk + folded |", "| ExecuTorch int8 |", "## Constraints", "`features.0.0.weight`",
                 *PLOTS):
        assert text in report
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"settings", "data", "stages", "history", "constraints", "blocks", "targets", "verification", "timing"}
    assert set(metrics["stages"]) == {"plain", "constrained", "baked", "shrunk", *PROGRAMS}
    assert set(metrics["timing"]["latency_ms"]) == {*metrics["stages"], "folded"}
    assert [len(metrics["history"][name]) for name in ("plain", "constrained")] == [1, 1]


def test_the_demo_checks_constraints_and_verifies_the_shrunk_model(tiny):
    _, result = tiny
    metrics = result.metrics
    history = metrics["history"]["constrained"]
    assert history[0]["checked_tensors"] == len(metrics["constraints"]) > 0
    assert metrics["verification"]["shrunk_matches_baked"]
    assert metrics["verification"]["stock_load_max_abs_difference"] == 0.0
    assert metrics["data"] == {"train_images": 1437, "test_images": 360, "image_size": 32, "classes": 10}
    stages = metrics["stages"]
    assert stages["plain"]["sparsity"] == 0.0 < stages["baked"]["sparsity"]
    assert stages["shrunk"]["params"] <= stages["baked"]["params"] == stages["plain"]["params"]
    assert "shrunk vs plain" in result.summary


def test_the_summary_names_what_shrink_removed_and_the_budget_it_met(tiny):
    from torchconstrain.demo import report

    metrics = json.loads(json.dumps(tiny[1].metrics))
    metrics["blocks"] = {"features.2": {"before": 72, "after": 30}, "features.3": {"before": 88, "after": 40}}
    assert "shrink: 2 blocks, expanded channels 160 -> 70;" in report.summary(metrics, [])
    assert "budget:" not in report.summary(metrics, [])  # the packaged rules set no budget
    metrics["blocks"] = {"features.0.0:out": {"before": 16, "after": 8}, "features.2": {"before": 72, "after": 30}}
    metrics["targets"] = {"macs": [0.5, 0.4993]}
    text = report.summary(metrics, [])
    assert "shrink: 2 channel groups, channels 88 -> 38;" in text  # not only blocks: no "expanded" claim
    assert "budget: macs target 0.500, achieved 0.499" in text
    assert "## Channel groups after `surgery.shrink`" in report.markdown(metrics, [])


def test_the_command_line_runs_the_demo_and_the_same_seed_gives_the_same_metrics(tiny, quick_cli, tmp_path, capsys):
    assert main(["demo", "--epochs", "1", "--calibrate", "64", "--out", str(tmp_path)]) == 0
    assert "shrunk + folded" in capsys.readouterr().out
    again = json.loads((tmp_path / "metrics.json").read_text())
    assert without_timing_and_programs(again) == without_timing_and_programs(tiny[1].metrics)


def test_the_last_stage_is_an_int8_executorch_program_of_the_shrunk_model(tiny):
    from executorch.runtime import Runtime

    out, result = tiny
    metrics, stages = result.metrics, result.metrics["stages"]
    verification = metrics["verification"]
    assert verification["executorch_fp32_matches_shrunk"]
    assert verification["executorch_fp32_vs_shrunk_max_abs_difference"] <= 1e-5  # near-random logits: small
    assert stages["executorch_int8"]["int8"] and not stages["executorch_fp32"]["int8"]
    assert stages["executorch_int8"]["quantized_weights"] > 50  # every conv and linear of MobileNetV3-Small
    assert stages["executorch_int8"]["size_bytes"] < stages["executorch_fp32"]["size_bytes"] / 3
    assert stages["executorch_int8"]["size_bytes"] == (out / "executorch_int8.pte").stat().st_size
    assert metrics["timing"]["latency_ms"]["executorch_int8"] > 0
    method = Runtime.get().load_program((out / "executorch_int8.pte").read_bytes()).load_method("forward")
    assert method.execute([torch.randn(1, 3, 32, 32)])[0].shape == (1, 10)
    assert "ExecuTorch int8" in result.summary and "int8 program vs plain" in result.summary


def test_show_rules_prints_the_rules_file(tmp_path, capsys):
    assert main(["demo", "--show-rules"]) == 0
    assert capsys.readouterr().out == default_rules_path().read_text()
    mine = tmp_path / "mine.yaml"
    mine.write_text("rules:\n  - match: classifier.0\n    apply: NonNeg\n")
    assert main(["demo", "--show-rules", "--rules", str(mine)]) == 0
    assert capsys.readouterr().out == mine.read_text()


@pytest.mark.parametrize("arguments, message", [
    (["--epochs", "0"], "argument --epochs: expected an integer >= 1. Got 0."),
    (["--epochs", "two"], "argument --epochs: expected an integer >= 1. Got 'two'."),
    (["--batch-size", "-3"], "argument --batch-size: expected an integer >= 1. Got -3."),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["--steps", "3"], "unrecognized arguments: --steps 3"),
])
def test_bad_flags_are_refused_by_the_parser(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", *arguments])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_missing_or_bad_rules_file_is_a_clear_error(tmp_path, capsys):
    assert main(["demo", "--rules", str(tmp_path / "missing.yaml")]) == 2
    assert f"rules: no such file: {tmp_path / 'missing.yaml'}" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - match: features.0.0\n    apply: {Clam: {min: -1}}\n")
    assert main(["demo", "--rules", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "unknown constraint 'Clam'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_demo_extras_are_named_before_any_work(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torchconstrain.demo.config, "EXTRAS", ("sklearn", "no_such_module_here"))
    assert main(["demo", "--out", str(tmp_path / "out")]) == 2
    assert "the demo needs no_such_module_here, which is not installed: pip install 'torchconstrain[demo]'." in (
        capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_the_demo_restores_the_thread_count(tiny):
    assert tiny[1].metrics["settings"]["threads"] == 1
    assert torch.get_num_threads() == THREADS


def test_bad_settings_are_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="limit_batches: expected None or an integer >= 1. Got 0."):
        run_demo(DemoConfig(out=tmp_path / "out"), limit_batches=0)
    assert not (tmp_path / "out").exists()


def test_a_failed_check_exits_with_1(monkeypatch, quick_cli, tmp_path, capsys):
    def broken(model):
        raise ConstraintViolation([("features.0.0.weight", "3 entries are above 1")])

    monkeypatch.setattr(torchconstrain.demo.train, "check", broken)
    assert main(["demo", "--epochs", "1", "--out", str(tmp_path)]) == 1
    assert "check failed" in capsys.readouterr().err


def test_a_shrunk_model_that_differs_from_the_baked_one_exits_with_1(monkeypatch, quick_cli, tmp_path, capsys):
    monkeypatch.setattr(torchconstrain.demo.stages, "max_difference", lambda *models: (0.5, False))
    assert main(["demo", "--epochs", "1", "--out", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "MISMATCH" in captured.out
    assert "differ from the baked model's" in captured.err


def test_the_summary_reports_the_calibration_images_there_were(tiny):
    # --calibrate 5000 calibrated on the 1437 training images, and said 5000.
    from torchconstrain.demo import report

    metrics = json.loads(json.dumps(tiny[1].metrics))
    metrics["settings"]["calibration_images"] = 5000
    assert "activations calibrated on 1437 training images" in report.summary(metrics, [])
