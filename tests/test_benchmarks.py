import json

import pytest

from benchmarks.run import main


@pytest.mark.slow
def test_quick_benchmark_run_writes_every_case(tmp_path):
    path = tmp_path / "bench.json"
    assert main(["--quick", "--json", str(path)]) == 0
    document = json.loads(path.read_text())
    rows = document["measurements"]
    variants = {(r["section"], r["variant"]) for r in rows}
    for variant in ("plain", "Clamp", "FixedMask", "LearnableMask", "prune hooks", "baked"):
        assert ("layers", variant) in variants
    assert ("surgery", "50% shrunk") in variants
    cases = {(r["section"], r["case"], r["task"]) for r in rows}
    for arch in ("mobilenet_v3_small", "mobilenet_v3_large"):
        assert ("models", f"{arch} b8", "train step") in cases
        assert ("models", f"{arch} b1", "inference") in cases
    assert all(r["ratio_to_plain"] == 1.0 for r in rows if r["variant"] == "plain")
    assert all(r["median"] > 0 for r in rows)
    table = (tmp_path / "table.md").read_text()
    assert table.startswith("# torchconstrain benchmarks")
    assert "| mobilenet_v3_large | 50% shrunk |" in table
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")
    memory_cells = {(r["variant"], r["task"]) for r in document["memory"]["rows"]}
    assert {("mix", "training"), ("plain", "inference")} <= memory_cells
    assert "## Peak memory: 2 x Linear(256,256) b8" in table


def test_copies_of_a_variant_are_each_timed_and_merged():
    import torch

    from benchmarks.timing import Budget, measure_group

    calls = {"plain": [0, 0], "slow": [0]}

    def counting(name, k, size):
        work = torch.ones(size)

        def call():
            calls[name][k] += 1
            work.add_(1)

        return call

    budget = Budget(warmup=0.0, warmup_calls=1, min_run_time=0.02, rounds=2, copies=2)
    stats = measure_group(
        {"plain": [counting("plain", 0, 10), counting("plain", 1, 10)], "slow": [counting("slow", 0, 10**6)]},
        budget, threads=1, device=torch.device("cpu"),
    )
    assert all(n > 1 for n in calls["plain"] + calls["slow"])  # every copy warmed up and timed
    assert len(stats["plain"]["copy_medians"]) == 2 and len(stats["slow"]["copy_medians"]) == 1
    low, high = sorted(stats["plain"]["copy_medians"])
    assert low <= stats["plain"]["median"] <= high
    assert stats["slow"]["median"] > stats["plain"]["median"]


def test_slow_calls_still_get_the_fewest_blocks_the_budget_asks_for():
    import time

    import torch

    from benchmarks.timing import Budget, measure_group

    budget = Budget(warmup=0.0, warmup_calls=0, min_run_time=0.001, rounds=2, copies=1, min_blocks=6)
    stats = measure_group({"slow": [lambda: time.sleep(0.005)]}, budget, threads=1, device=torch.device("cpu"))
    assert len(stats["slow"]["block_times"]) >= 6
    assert stats["slow"]["median"] >= 0.005


def test_case_picks_the_cases_whose_name_contains_it(tmp_path):
    path = tmp_path / "bench.json"
    assert main(["--quick", "--case", "40 x Linear", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["measurements"]
    assert {(r["case"], r["task"]) for r in rows} == {
        ("40 x Linear(64,64) b8", "train step"), ("40 x Linear(64,64) b8", "inference")
    }


def test_a_case_that_matches_nothing_is_refused_before_timing(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", "--case", "resnet"])
    assert exit_info.value.code == 2
    assert "--case 'resnet' matches no case" in capsys.readouterr().err


def test_memory_is_measured_for_every_variant_and_task_each_in_a_process_of_its_own():
    import math
    import os

    from benchmarks import memory

    tiny = memory.Setup(layers=2, width=64, batch=4, calls=1)
    result = memory.run(tiny)
    rows = result["rows"]
    assert [(r["variant"], r["task"]) for r in rows] == [(v.name, t) for v in memory.VARIANTS for t in memory.TASKS]
    assert result["W_bytes"] == 2 * 64 * 64 * 4
    assert all(r["weight_bytes"] == result["W_bytes"] for r in rows)  # what each process's model stores
    assert all(r["constrained"] == (0 if r["variant"] == "plain" else 2) for r in rows)
    assert all(r["peak_kib"] > 0 and math.isfinite(r["peak_over_plain_W"]) for r in rows)
    assert all(r["peak_over_plain_W"] == 0 for r in rows if r["variant"] == "plain")
    assert os.getpid() not in {r["pid"] for r in rows} and len({r["pid"] for r in rows}) == len(rows)
    assert result["verdicts"]["prune hooks"] == "reference"
    assert result["verdicts"]["LearnableMask (per element)"] == "exempt"
    table = "\n".join(memory.markdown(result))
    assert all(f"| {v.name} |" in table for v in memory.VARIANTS)


def test_case_peak_memory_runs_the_memory_table_alone(tmp_path):
    path = tmp_path / "bench.json"
    assert main(["--quick", "--case", "peak memory", "--json", str(path)]) == 0
    document = json.loads(path.read_text())
    assert document["measurements"] == []
    assert document["memory"]["model"] == "2 x Linear(256,256) b8"
    table = (tmp_path / "table.md").read_text()
    assert "## Peak memory: 2 x Linear(256,256) b8" in table
    assert "## Every measurement" not in table
    assert not (tmp_path / "plot.png").exists()


def test_quick_leaves_the_compiled_cases_out(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", "--case", "compiled"])
    assert exit_info.value.code == 2
    assert "matches only compiled cases" in capsys.readouterr().err


@pytest.mark.slow
def test_compiled_section_times_every_variant_compiled_once():
    import torch
    from torch import nn

    from benchmarks import compiled, models
    from benchmarks.timing import Budget

    def tiny() -> nn.Module:
        return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))

    cases = tuple(models.ModelCase("compiled tiny", task, tiny, (4, 8), models._regression, compiled.STACK)
                  for task in ("train step", "inference"))
    budget = Budget(warmup=0.0, warmup_calls=1, min_run_time=0.0)
    lines = []
    results = compiled.run(torch.device("cpu"), 1, budget, lambda result: None, cases, lines.append)
    names = [v.name for v in compiled.STACK]
    assert names == ["plain", "Clamp", "FixedMask", "mix", "baked", "plain, not compiled"]
    assert [(r.section, r.task, r.variant) for r in results] == [
        ("compiled", task, name) for task in ("train step", "inference") for name in names
    ]
    assert all(r.median > 0 for r in results)
    assert len(lines) == 2 * len(names)  # one compile line per variant and task


def test_torch_pruning_is_matched_to_the_most_macs_not_above_the_limit():
    import torch

    from benchmarks import peers
    from torchconstrain import surgery
    from torchconstrain.demo.data import make_model

    model, example = make_model(0).eval(), torch.zeros(1, 3, 32, 32)
    limit = surgery.count_macs(model, example) // 2
    pruned, ratio = peers.match_macs(model, example, limit, bisections=8)
    assert surgery.count_macs(pruned, example) <= limit
    assert surgery.count_macs(peers.prune_torch_pruning(model, example, ratio - 2 ** -8), example) > limit
    assert surgery.count_params(model) == 1_528_106  # the dense model is left as it was
    assert pruned.classifier[-1].out_features == 10


def test_case_peers_compares_the_three_models_at_the_same_macs(tmp_path):
    path = tmp_path / "bench.json"
    assert main(["--quick", "--case", "digits mobilenet_v3_small", "--json", str(path)]) == 0
    document = json.loads(path.read_text())
    assert [r["variant"] for r in document["measurements"]] == ["plain", "torchconstrain", "Torch-Pruning"]
    rows = {r["variant"]: r for r in document["peers"]}
    assert set(rows) == {"plain", "plain + F epochs", "torchconstrain", "Torch-Pruning"}
    ours, theirs = rows["torchconstrain"], rows["Torch-Pruning"]
    assert ours["macs_share"] <= ours["target"] == 0.5
    assert theirs["macs"] <= ours["macs"] < rows["plain"]["macs"]
    assert all(0 <= r["accuracy"] <= 1 for r in rows.values())
    table = (tmp_path / "table.md").read_text()
    assert "## Against Torch-Pruning at the same MACs" in table
    assert "| Torch-Pruning |" in table
