"""bench/bench_noniid.py: the grid's cells reuse one seed's local and centralised columns and train only their own
federation, a finished cell is kept on a second call, and the table reads the cells' own numbers."""
import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_noniid.py"


@pytest.mark.slow
def test_noniid_grid_reuses_local_and_central_and_continues(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_noniid", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "grid"
    assert bench.main(["--out", str(out), "--test", "--seeds", "0", "--policies", "shared", "fedbn"]) == 0
    shared, fedbn = out / "seed-0" / "shared-mu0", out / "seed-0" / "fedbn-mu0"
    assert (shared / "local" / "local.csv").read_text() == (fedbn / "local" / "local.csv").read_text()
    assert json.loads((fedbn / "cell.json").read_text())["columns"] == ["federated", "personalised"]
    rounds = [json.loads(line) for line in (fedbn / "federated" / "rounds.jsonl").read_text().splitlines()]
    assert {r["norm_policy"] for r in rounds} == {"fedbn"}
    cells = json.loads((out / "noniid.json").read_text())["cells"]
    assert set(cells) == {"shared-mu0", "fedbn-mu0"} and cells["fedbn-mu0"]["seeds"] == 1
    assert cells["fedbn-mu0"]["shared_bytes_per_client_round"] < cells["shared-mu0"]["shared_bytes_per_client_round"]
    before = (fedbn / "cell.json").stat().st_mtime_ns
    assert bench.main(["--out", str(out), "--test", "--seeds", "0", "--policies", "shared", "fedbn"]) == 0
    assert (fedbn / "cell.json").stat().st_mtime_ns == before          # finished cells are kept
    assert "| fedbn-mu0 | 1 |" in (out / "noniid.md").read_text()
