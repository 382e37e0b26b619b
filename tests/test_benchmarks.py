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
