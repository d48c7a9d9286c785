"""Per-district columns trained by worker processes: the same rows as in-process training, in task order,
and a failing district stops the run with one line naming it."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from test_training import synthetic_pack

from nfed.common.errors import TrainingError
from nfed.federation.config import FederationConfig
from nfed.federation.district_jobs import PoolRunner, WorkerPool, make_task, run_tasks
from nfed.federation.server import federate
from nfed.model import checkpoint
from nfed.model.checkpoint import save_checkpoint
from nfed.training.trainer import TrainConfig, build_model

COUNTS = {"Gangseo-gu": (7, 3, 4), "Nowon-gu": (3, 2, 4), "Jung-gu": (5, 2, 4)}


@pytest.fixture(scope="module")
def packs(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("packs")
    paths = []
    for seed, (district, counts) in enumerate(COUNTS.items()):
        paths.append(synthetic_pack(folder / f"{district}.h5", district, counts=counts, tile=16, seed=seed))
    return paths


def _config() -> TrainConfig:
    return TrainConfig(width=2, lr=1e-3, batch_size=4, epochs=3, patience=2, lambda_rec=0.1)


def _same_rows(parallel: list[dict], serial: list[dict]) -> None:
    assert [row["district"] for row in parallel] == [row["district"] for row in serial] == list(COUNTS)
    for a, b in zip(parallel, serial):
        assert (a["epochs_run"], a["steps"], a["stop"], a["best_epoch"]) == \
               (b["epochs_run"], b["steps"], b["stop"], b["best_epoch"])
        for key in ("f1", "precision", "recall", "iou", "loss"):
            if math.isnan(b[key]):
                assert math.isnan(a[key]), key
            else:
                assert a[key] == pytest.approx(b[key], abs=1e-4), key


@pytest.mark.parametrize("kind", ["local", "personalise"])
def test_two_workers_give_the_in_process_rows_in_task_order(packs, tmp_path, kind):
    config = _config()
    weights = None
    if kind == "personalise":
        weights = save_checkpoint(tmp_path / "global.h5", build_model(config.replace(seed=5)).state_dict())
    seen = []
    with WorkerPool(2) as pool:
        parallel = run_tasks([make_task(kind, p, tmp_path / "two", config, weights) for p in packs], pool,
                             seen.append)
    serial = run_tasks([make_task(kind, p, tmp_path / "one", config, weights) for p in packs], None)
    _same_rows(parallel, serial)
    assert sorted(row["district"] for row in seen) == sorted(COUNTS)
    for district in COUNTS:
        assert (tmp_path / "two" / district / "best.h5").is_file()


def test_a_failing_district_stops_the_workers_with_one_line(packs, tmp_path):
    broken = tmp_path / "Mapo-gu.h5"
    broken.write_bytes(b"not an HDF5 file")
    tasks = [make_task("local", p, tmp_path / "out", _config()) for p in [packs[0], broken, packs[1]]]
    with pytest.raises(TrainingError, match=r"Mapo-gu\.h5 \(local\): .*Mapo-gu\.h5") as caught:
        with WorkerPool(2) as pool:
            run_tasks(tasks, pool)
    assert "\n" not in str(caught.value)


def test_a_federation_on_worker_processes_matches_the_in_process_one(packs, tmp_path, monkeypatch):
    """Same rounds, same stop, same global weights (to float32 rounding) and the same test scores."""
    config = _config().replace(epochs=1)
    fed = FederationConfig(rounds=3, local_epochs=1, patience_rounds=5, seed=0)
    by_name = {path.stem: path for path in packs}
    serial = federate(by_name, tmp_path / "serial", config, fed)
    written = []
    save = checkpoint.save_checkpoint

    def counted_save(path, *args, **kwargs):
        written.append(path)
        return save(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_checkpoint", counted_save)
    with WorkerPool(2) as pool, PoolRunner(pool, tmp_path / "work", by_name) as runner:
        pooled = federate(by_name, tmp_path / "pooled", config, fed, runner=runner, evaluate_fn=runner.evaluate)
    assert (len(pooled.rounds), pooled.best_round, pooled.stop_reason) == \
        (len(serial.rounds), serial.best_round, serial.stop_reason)
    for name, value in serial.best_weights.items():
        np.testing.assert_allclose(pooled.best_weights[name], value, rtol=1e-4, atol=1e-5, err_msg=name)
    for a, b in zip(pooled.results, serial.results):
        assert a["district"] == b["district"] and a["f1"] == pytest.approx(b["f1"], abs=1e-3)
    assert list((tmp_path / "work").iterdir()) == []   # no weights left behind
    # each global model written once: round r's validation and round r + 1's training share its file
    global_files = [path for path in written if Path(path).parent == tmp_path / "work"]
    assert len(global_files) == len(set(global_files)) == len(pooled.rounds) + 1
