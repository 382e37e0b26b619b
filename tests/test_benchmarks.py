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
    assert all(r["ratio_to_plain"] == 1.0 for r in rows if r["variant"] == "plain")
    assert all(r["median"] > 0 for r in rows)
    table = (tmp_path / "table.md").read_text()
    assert table.startswith("# torchconstrain benchmarks")
    assert "| mobilenet_v3_large | 50% shrunk |" in table
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")
