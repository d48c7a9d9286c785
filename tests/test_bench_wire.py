"""bench/bench_wire.py: each encoding's federation runs through the command line once per seed, a finished run is
kept, and the table pairs every cell with the uncompressed run."""
import json

import pytest
from bench_scripts import load_bench
from test_norm_policy import tiny_packs  # noqa: F401 - the module's fixture, shared


def _bench():
    return load_bench("bench_wire")


def test_wire_bench_runs_each_cell_and_pairs_it_with_the_uncompressed_run(tmp_path, tiny_packs):  # noqa: F811
    bench = _bench()
    packs = next(iter(tiny_packs.values())).parent
    call = ["--out", str(tmp_path / "wire"), "--packs", str(packs), "--seeds", "0", "--test",
            "--cells", "none/fp32", "int8-ef/fp32", "none/fp16"]
    assert bench.main(call) == 0
    results = json.loads((tmp_path / "wire" / "wire.json").read_text())
    plain, packed, half = results["none/fp32"], results["int8-ef/fp32"], results["none/fp16"]
    assert packed["mb_up_per_client_round"] < 0.3 * plain["mb_up_per_client_round"]
    assert half["mb_down_per_client_round"] < 0.55 * plain["mb_down_per_client_round"]
    assert packed["paired_with_base"]["seeds"] == [0]
    rounds = (tmp_path / "wire" / "seed-0" / "int8-ef-fp32" / "rounds.jsonl").read_text().splitlines()
    assert {json.loads(line)["compress"] for line in rounds} == {"int8-ef"}
    before = (tmp_path / "wire" / "seed-0" / "none-fp32" / "summary.json").stat().st_mtime_ns
    assert bench.main(call) == 0                                             # finished runs are kept
    assert (tmp_path / "wire" / "seed-0" / "none-fp32" / "summary.json").stat().st_mtime_ns == before
    assert "| int8-ef/fp32 | 1 |" in (tmp_path / "wire" / "wire.md").read_text()


def test_a_cell_names_a_compression_and_a_broadcast():
    bench = _bench()
    assert bench.parse_cell("int8-ef/fp16") == ("int8-ef", "fp16")
    for bad in ("int4/fp32", "int8", "none/bf16"):
        with pytest.raises(SystemExit, match="expected COMPRESS/BROADCAST"):
            bench.parse_cell(bad)


def test_a_levir_folder_without_enough_labelled_pairs_is_refused_in_one_line(tmp_path):
    bench = _bench()
    (tmp_path / "levir" / "label").mkdir(parents=True)
    with pytest.raises(SystemExit, match="0 labelled LEVIR-CD pairs"):
        bench.main(["--out", str(tmp_path / "wire"), "--levir", str(tmp_path / "levir"), "--test"])
    for folder in ("A", "B", "label"):   # files that are not images: nothing can be packed
        (tmp_path / "levir" / folder).mkdir(exist_ok=True)
        for stem in ("a", "b", "c"):
            (tmp_path / "levir" / folder / f"{stem}.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit, match="packing LEVIR-CD for the benchmark: .*nothing to pack"):
        bench.main(["--out", str(tmp_path / "wire"), "--levir", str(tmp_path / "levir"), "--test"])
