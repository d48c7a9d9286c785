"""Experiment tracking with MLflow (the optional extra nfed[track]): a run's parameters, its metrics per round and
per district, and its report files as artefacts, in a store beside the run (RUN/mlruns.db, no server) or at the
URI of --track.

MLflow is imported here only, and only when a run is tracked (`--track` given). What is logged is parameters,
numbers and text files (JSON, CSV, HTML): never a model or a pickled object, so reading a run back unpickles
nothing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

from nfed.common.errors import ConfigError, one_line

INSTALL_HINT = "--track needs MLflow: pip install 'nfed[track]' (or pip install mlflow-skinny sqlalchemy alembic)"
STORE_NAME = "mlruns.db"   # the default store: one SQLite file beside the run (MLflow 3 refuses a folder store)
ARTIFACTS_NAME = "mlartifacts"   # the default store's artefacts, beside it
EXPERIMENT = "nfed"
_UNSAFE_KEY = re.compile(r"[^\w.\- /:]")   # what MLflow refuses in a parameter or metric name
_PARAMS_PER_BATCH = 100      # MLflow refuses a log_batch call with more parameters or metrics than these
_METRICS_PER_BATCH = 1000

def tracking_uri(track: str, run_dir: str | Path) -> str:
    """The store of `--track [URI]`: the URI given, or (`--track` alone, '') SQLite in RUN/mlruns.db."""
    if track:
        return track
    return f"sqlite:///{(Path(run_dir) / STORE_NAME).resolve()}"


def metric_key(*parts: str) -> str:
    """A metric or parameter name MLflow accepts, whatever a district is called (its name is data)."""
    return "/".join(_UNSAFE_KEY.sub("_", str(part)) for part in parts)[:250]


def flat_params(prefix: str, values) -> dict[str, str]:
    """`values` (a dataclass or a mapping, nested ones flattened with '.') as MLflow parameters named prefix.key."""
    if dataclasses.is_dataclass(values) and not isinstance(values, type):
        values = {field.name: getattr(values, field.name) for field in dataclasses.fields(values)}
    if not isinstance(values, Mapping):
        return {prefix: str(values)[:6000]}
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = metric_key(f"{prefix}.{key}" if prefix else str(key))
        if isinstance(value, Mapping) or (dataclasses.is_dataclass(value) and not isinstance(value, type)):
            flat.update(flat_params(name, value))
        else:
            flat[name] = str(value)[:6000]
    return flat


def run_params(command: str, env=None, **configs) -> dict[str, str]:
    """The parameters of a tracked run: the command, each config (train.*, federation.*, ...) and the run
    environment (env.device, env.precision, ...)."""
    params = {"command": command}
    for prefix, config in configs.items():
        if config is not None:
            params.update(flat_params(prefix, config))
    if env is not None:
        params.update(flat_params("env", env.record()))
    return params


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _client(uri: str):
    """MlflowClient for `uri` (ConfigError in one line without the extra, or when the store cannot be opened)."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)   # not its "creating database tables" lines
    logging.getLogger("alembic").setLevel(logging.WARNING)
    with warnings.catch_warnings():   # SQLAlchemy's deprecation notes about MLflow's own code
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)   # opens (and, the first time, creates) the store now
        except ImportError as exc:   # a SQLite store needs SQLAlchemy and Alembic
            raise ConfigError(f"--track {uri}: {one_line(exc)}; {INSTALL_HINT}") from None
        except Exception as exc:   # noqa: BLE001 -- any store error is the user's to fix, in one line
            raise ConfigError(f"--track {uri}: the tracking store cannot be opened: {one_line(exc)}") from None
    return client


class Tracker:
    """One MLflow run of an nfed command: start(params), log_round(record), log_district(row), log_artifacts(paths),
    end(status). A failure to log after the start is said once with `warn` and tracking stops; the run goes on."""

    def __init__(self, uri: str, run_name: str, *, artifact_location: str | None = None,
                 experiment: str = EXPERIMENT, warn: Callable[[str], None] | None = None):
        self.uri, self.run_name, self.experiment = uri, run_name, experiment
        self.artifact_location = artifact_location
        self.warn = warn or (lambda text: None)
        self.client = None
        self.run_id: str | None = None

    def start(self, params: Mapping[str, object]) -> Tracker:
        client = _client(self.uri)
        try:
            found = client.get_experiment_by_name(self.experiment)
            experiment_id = (found.experiment_id if found is not None else
                             client.create_experiment(self.experiment, artifact_location=self.artifact_location))
            self.run_id = client.create_run(experiment_id, run_name=self.run_name).info.run_id
        except Exception as exc:   # noqa: BLE001
            raise ConfigError(f"--track {self.uri}: cannot start a run: {one_line(exc)}") from None
        self.client = client
        logged = _params(params)
        for start in range(0, len(logged), _PARAMS_PER_BATCH):
            self._call("log_batch", params=logged[start:start + _PARAMS_PER_BATCH])
        return self

    def log_metrics(self, metrics: Mapping[str, object], step: int = 0) -> None:
        """The finite numbers among `metrics` (others are skipped), at `step`."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        numbers = [(key, _number(value)) for key, value in metrics.items()]
        logged = [Metric(metric_key(key), value, now, int(step)) for key, value in numbers if value is not None]
        for start in range(0, len(logged), _METRICS_PER_BATCH):
            self._call("log_batch", metrics=logged[start:start + _METRICS_PER_BATCH])

    def log_round(self, record: Mapping) -> None:
        """A round of rounds.jsonl at step = its round: its numbers (mean_val_f1, norm_difference, ...), how many
        answered, and the global model's validation per district (val_f1/<district>, val_loss/<district>)."""
        metrics = {key: value for key, value in record.items() if key != "round"}
        metrics["answered"] = len(record.get("answered", ()))
        for district, scores in (record.get("global_val") or {}).items():
            for name in ("f1", "loss"):
                metrics[metric_key(f"val_{name}", district)] = (scores or {}).get(name)
        self.log_metrics(metrics, step=int(record.get("round", 0)))

    def log_district(self, row: Mapping, prefix: str = "test", step: int = 0) -> None:
        """A district's results row (local.csv, federated.csv, ...): <prefix>_<metric>/<district>."""
        district = str(row.get("district", ""))
        self.log_metrics({metric_key(f"{prefix}_{key}", district): value for key, value in row.items()
                          if key != "district"}, step=step)

    def log_artifacts(self, paths: Iterable[str | Path], folder: str | None = None) -> None:
        """The files of `paths` that exist (text files: JSON, CSV, HTML, Markdown)."""
        for path in paths:
            if Path(path).is_file():
                self._call("log_artifact", local_path=str(path), artifact_path=folder)

    def end(self, status: str = "FINISHED") -> None:
        self._call("set_terminated", status=status)
        self.client = None

    def _call(self, method: str, **kwargs) -> None:
        if self.client is None:
            return
        try:
            getattr(self.client, method)(self.run_id, **kwargs)
        except Exception as exc:   # noqa: BLE001 -- tracking never ends a training run
            self.warn(f"warning: tracking stopped ({self.uri}): {one_line(exc)}")
            self.client = None


def _params(params: Mapping[str, object]) -> list:
    from mlflow.entities import Param

    return [Param(metric_key(key), str(value)[:6000]) for key, value in params.items()]


def open_tracker(track: str | None, run_dir: str | Path, run_name: str,
                 warn: Callable[[str], None] | None = None) -> Tracker | None:
    """The Tracker of `--track [URI]` for a run in `run_dir` (None: not tracked); the default store keeps its
    artefacts beside it in RUN/mlartifacts."""
    if track is None:
        return None
    artifacts = None if track else (Path(run_dir) / ARTIFACTS_NAME).resolve().as_uri()
    return Tracker(tracking_uri(track, run_dir), run_name, artifact_location=artifacts, warn=warn)


@contextlib.contextmanager
def tracked(track: str | None, run_dir: str | Path, run_name: str, params: Mapping[str, object],
            warn: Callable[[str], None] | None = None) -> Iterator[Tracker | None]:
    """A started Tracker (None when `track` is None) for the block: FINISHED when it ends, FAILED (or KILLED on
    Ctrl-C) when it raises."""
    tracker = open_tracker(track, run_dir, run_name, warn)
    if tracker is None:
        yield None
        return
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    tracker.start(params)
    try:
        yield tracker
    except KeyboardInterrupt:
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")
