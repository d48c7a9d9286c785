"""bench/bench_noniid.py: the grid's cells reuse one seed's local and centralised columns and train only their own
federation, a finished cell is kept on a second call, and the table reads the cells' own numbers."""
import json

import pytest
from bench_scripts import load_bench


@pytest.mark.slow
def test_noniid_grid_reuses_local_and_central_and_continues(tmp_path, capsys):
    bench = load_bench("bench_noniid")
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


def _bench():
    return load_bench("bench_noniid")


def _facts(per_seed: dict, rounds: dict) -> dict:
    from nfed.report.stats import mean_interval

    columns = ("local", "federated", "personalised", "centralised")
    return {"seeds": len(per_seed), "per_seed": per_seed, "rounds_per_seed": rounds,
            **{f"f1_{c}": mean_interval([v[c] for v in per_seed.values()]) for c in columns}}


def test_cells_are_paired_with_the_base_by_seed_and_drawn(tmp_path):
    """The paired table compares a cell with shared FedAvg seed by seed (only seeds both finished), and the
    figure is written."""
    bench = _bench()
    row = lambda fed, pers, cen: {"local": 0.4, "federated": fed, "personalised": pers, "centralised": cen}  # noqa: E731
    results = {"shared-mu0": _facts({"seed-0": row(0.60, 0.69, 0.70), "seed-1": row(0.62, 0.68, 0.72),
                                     "seed-2": row(0.61, 0.70, 0.69)}, {"seed-0": 40, "seed-1": 90, "seed-2": 60}),
               "fedbn-mu0": _facts({"seed-0": row(0.68, 0.71, 0.70), "seed-1": row(0.70, 0.72, 0.72)},
                                   {"seed-0": 50, "seed-1": 45})}
    comparison = bench.paired(results)["fedbn-mu0"]
    assert comparison["seeds"] == ["seed-0", "seed-1"]
    assert comparison["federated_minus_base"]["per_seed"] == pytest.approx([0.08, 0.08])
    assert comparison["federated_minus_centralised"]["per_seed"] == pytest.approx([-0.02, -0.02])
    assert comparison["personalised_minus_centralised"]["per_seed"] == pytest.approx([0.01, 0.0])
    assert comparison["rounds_ratio"]["per_seed"] == pytest.approx([1.25, 0.5])
    assert "| fedbn-mu0 | 2 | +0.080 [" in bench.paired_table(bench.paired(results))
    assert bench.figure(results, tmp_path / "noniid.png").stat().st_size > 1000


@pytest.mark.slow
def test_compressed_cells_train_only_their_federation_under_the_recorded_protocol(tmp_path):
    """--compress adds a federation-only cell whose row reports the bytes that travelled; --protocol sets the
    federation's rules, recorded per cell, and a later call under another protocol is refused."""
    bench = _bench()
    out = tmp_path / "grid"
    call = ["--out", str(out), "--test", "--seeds", "0", "--policies", "shared", "--compress", "int8-ef",
            "--protocol", "patience_rounds=2", "--protocol", "select_by=loss"]
    assert bench.main(call) == 0
    cell = out / "seed-0" / "shared-mu0-int8-ef"
    facts = json.loads((cell / "cell.json").read_text())
    assert facts["columns"] == ["federated"]
    assert facts["settings"]["patience_rounds"] == 2 and facts["settings"]["compress"] == "int8-ef"
    rounds = [json.loads(line) for line in (cell / "federated" / "rounds.jsonl").read_text().splitlines()]
    assert {r["compress"] for r in rounds} == {"int8-ef"}
    cells = json.loads((out / "noniid.json").read_text())["cells"]
    plain, packed = cells["shared-mu0"], cells["shared-mu0-int8-ef"]
    assert packed["bytes_up_per_client_round"] < 0.3 * plain["bytes_up_per_client_round"]
    assert packed["bytes_down_per_client_round"] == plain["bytes_down_per_client_round"]
    assert "| shared-mu0-int8-ef | 1 |" in (out / "noniid.md").read_text()
    with pytest.raises(SystemExit, match="ran under another protocol: patience_rounds=2"):
        bench.main(call[:-4] + ["--protocol", "patience_rounds=3"])


def test_protocol_assignments_are_typed_and_checked():
    from nfed.demo import DemoSettings

    bench = _bench()
    settings = bench.protocol_settings(DemoSettings(), ["patience_rounds=3", "eps=0", "select_by=loss"])
    assert (settings.patience_rounds, settings.eps, settings.select_by) == (3, 0.0, "loss")
    for bad, said in (("lr=1", "KEY one of"), ("patience_rounds", "KEY=VALUE"), ("patience_rounds=x", "takes a int"),
                      ("max_rounds=-1", "must be >= 1"), ("select_by=median", "one of loss"),
                      ("eps=nan", "finite"), ("select_window=0", "select_window 0")):
        with pytest.raises(SystemExit, match=said):
            bench.protocol_settings(DemoSettings(), [bad])
