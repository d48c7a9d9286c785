"""The whole synthetic study on the demo profile: synth -> pack -> the four columns -> report.

Columns, each trained to convergence by its own stop rule (the protocol of ARCHITECTURE.md):
- local: every district alone, early stopping (patience 3) under an epoch cap that is at least the number
  of epochs a client can train in the whole federation, so the cap is never what ends a fair run;
- federated: the protocol `nfed federate` runs by default (FederationConfig's defaults, not a copy): FedAvg rounds
  of 3 local epochs until the validation-loss rule or the norm-difference rule fires after the warm-up; the round
  the selection rule keeps (`select_by`) is scored;
- personalised: the federated model fine-tuned on each district's own data, early stopping;
- centralised: one model on the pooled training data of all districts, early stopping.
The synthetic data holds a fixed number of validation and test tiles per district (whatever the scale), so
every district's F1 rests on the same number of pixels. Several seeds (`seeds` > 1) vary model
initialisation and shuffling on the same data; each seed's run lives in OUT/seed-<k>/.

Districts held out (`hold_out`) never train in the federation but are scored: RUN/federated/heldout.csv gives each
one's F1 under its local model, the global model, and the global model after AdaBN on its training tiles.

After the columns each run gets its cross-district matrix (nfed.training.matrix: every local model and the
global model on every district's test split, RUN/matrix.csv and matrix.json) unless `matrix` is off.

Output layout: OUT/synth, OUT/packs, then per run (OUT itself for one seed) local/, federated/,
personalised/, central/, matrix.csv, matrix.json, report/, and OUT/demo.json with settings, stage times and the
headline numbers.
"""
from __future__ import annotations

import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from nfed.common.atomic import write_json_atomic
from nfed.common.progress import Countdown, duration

COLUMNS = ("local", "federated", "personalised", "central")
STAGE_FOLDERS = COLUMNS + ("report",)
DATA_FOLDERS = ("synth", "packs")
DEMO_MARKER = ".nfed-demo"   # says "nfed demo made this folder": a rerun may replace its stage folders


def claim_demo_folder(out_dir: Path) -> None:
    """Make `out_dir` a demo folder, refusing a non-empty folder that a demo did not make (a rerun deletes the
    stage folders, and must never delete a user's files)."""
    from nfed.common.atomic import write_text_atomic
    from nfed.common.errors import ConfigError
    from nfed.runs.runlock import LOCK_NAME

    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir}: is a file; --out needs a folder")
    if out_dir.is_dir() and any(path.name != LOCK_NAME for path in out_dir.iterdir()):
        if not (out_dir / DEMO_MARKER).exists() and not (out_dir / "demo.json").exists():
            raise ConfigError(f"{out_dir}: is not empty and not an nfed demo folder; choose a new or empty --out")
    write_text_atomic(out_dir / DEMO_MARKER, "made by nfed demo; a rerun replaces "
                      + ", ".join(DATA_FOLDERS + STAGE_FOLDERS) + " and seed-*/\n")


def _federation_default(name: str):
    """The default of a FederationConfig field: the demo runs the protocol nfed federate runs by default."""
    from dataclasses import fields

    from nfed.federation.config import FederationConfig

    return next(f.default for f in fields(FederationConfig) if f.name == name)


@dataclass
class DemoSettings:
    """What `nfed demo` runs. Sized so that one seed with all four columns took about 15 minutes on a 2-core CPU
    under the earlier federation protocol; today's (patience 10) runs longer (measured figures in the README); the
    model and optimiser are training.PROFILES["demo"]."""

    scale: float = 0.008           # share of the study's sample count generated per district (training tiles)
    min_train_tiles: int = 4       # at least half a batch of training tiles per district
    val_tiles: int = 16            # fixed per district, whatever the scale
    test_tiles: int = 24
    districts: str = "all"
    data_seed: int = 0             # synthetic data and split
    seeds: tuple[int, ...] = (0,)  # model initialisation and shuffling
    # the federation's protocol: nfed federate's defaults (one declaration, nfed.federation.config)
    max_rounds: int = _federation_default("rounds")                # safety budget (a stop rule should fire first)
    local_epochs: int = _federation_default("local_epochs")        # a client's epochs per round
    patience_rounds: int = _federation_default("patience_rounds")  # the validation-loss rule
    warmup_rounds: int = _federation_default("warmup_rounds")      # no rule fires, counts or keeps a round before
    eps: float = _federation_default("eps")                        # the norm-difference rule
    select_by: str = _federation_default("select_by")              # which round's global model is kept and scored
    select_window: int = _federation_default("select_window")
    server_opt: str = "fedavg"
    prox_mu: float = 0.0           # FedProx weight of the federated clients (0: plain FedAvg)
    norm_policy: str = "shared"    # shared | fedbn | silobn: the BatchNorm tensors each district keeps to itself
    compress: str = "none"         # none | fp16 | int8 | int8-ef: how the clients send their updates
    broadcast: str = "fp32"        # fp32 | fp16: how the server sends the global model
    hold_out: tuple[str, ...] = ()  # districts kept out of the federation's training, scored before and after AdaBN
    epochs: int = 400              # local / personalised / centralised epoch cap (never what ends a fair run)
    patience: int = 3
    lr: float | None = None
    device: str = "cpu"
    precision: str = "fp32"        # GPU GEMM precision (nfed.gpu.precision); no effect on the CPU
    jobs: int = 0                  # districts trained at once (local, personalised columns); 0: one per CPU
    matrix: bool = True            # the cross-district matrix of each run after its columns (RUN/matrix.csv)
    quiet: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        from nfed.common.errors import ConfigError

        self.hold_out = tuple(self.hold_out)
        if not self.seeds:
            raise ConfigError("--seeds must be >= 1")
        if any(seed < 0 for seed in self.seeds) or self.data_seed < 0:
            raise ConfigError("seeds must not be negative")
        if self.val_tiles < 1 or self.test_tiles < 1:
            raise ConfigError(f"--val-tiles {self.val_tiles}, --test-tiles {self.test_tiles}: the study needs "
                              f"both (>= 1)")
        for name in ("max_rounds", "local_epochs", "patience", "min_train_tiles"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        if self.epochs < 1:
            raise ConfigError(f"--epochs {self.epochs}: must be >= 1")
        if self.patience_rounds < 0:
            raise ConfigError(f"--patience-rounds {self.patience_rounds}: must be >= 0")

    @property
    def epoch_cap(self) -> int:
        """Never below what a client can train in the whole federation: the cap must not decide."""
        return max(self.epochs, self.max_rounds * self.local_epochs)

    def to_dict(self) -> dict:
        return {"scale": self.scale, "min_train_tiles": self.min_train_tiles, "val_tiles": self.val_tiles,
                "test_tiles": self.test_tiles, "districts": self.districts, "data_seed": self.data_seed,
                "seeds": list(self.seeds), "max_rounds": self.max_rounds, "local_epochs": self.local_epochs,
                "patience_rounds": self.patience_rounds, "warmup_rounds": self.warmup_rounds, "eps": self.eps,
                "select_by": self.select_by, "select_window": self.select_window,
                "server_opt": self.server_opt, "prox_mu": self.prox_mu, "norm_policy": self.norm_policy,
                "compress": self.compress, "broadcast": self.broadcast, "hold_out": list(self.hold_out),
                "epoch_cap": self.epoch_cap, "patience": self.patience, "lr": self.lr, "device": self.device,
                "precision": self.precision, "jobs": self.district_jobs, "matrix": self.matrix}

    @property
    def district_jobs(self) -> int:
        """Worker processes of the per-district columns: one per CPU core on the CPU, one on a GPU."""
        from nfed.core.functions.parallel import usable_cpus

        if not self.device.startswith("cpu"):
            return 1
        return self.jobs if self.jobs > 0 else usable_cpus()


def _bar(enabled: bool):
    from nfed.common.progress import progress

    def show(iterable, length, label):
        return progress(iterable, label=label, length=length, enabled=enabled)

    return show


class _Stages:
    """Wall time per named stage, echoed as each ends."""

    def __init__(self, echo: Callable[[str], None]):
        self.echo = echo
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        self.seconds[name] = round(self.seconds.get(name, 0.0) + elapsed, 2)
        self.echo(f"[demo] {name} done in {elapsed:.1f} s ({duration(self.total)} elapsed)")

    @property
    def total(self) -> float:
        return round(sum(self.seconds.values()), 1)


def make_data(out_dir: Path, settings: DemoSettings, echo: Callable[[str], None]) -> dict[str, Path]:
    """Synthetic districts and their packs; returns district -> pack path."""
    from nfed.data.pack import pack_folder
    from nfed.data.synth import synthesise
    from nfed.runs.packs import find_packs
    from nfed.training.trainer import PROFILE_TILES

    echo(f"[demo] generating synthetic districts (scale {settings.scale:g}, {settings.val_tiles} validation and "
         f"{settings.test_tiles} test tiles each) -> {out_dir / 'synth'}")
    synthesise(out_dir / "synth", scale=settings.scale, tile=PROFILE_TILES["demo"], seed=settings.data_seed,
               districts=settings.districts, min_per_district=settings.min_train_tiles,
               val_tiles=settings.val_tiles, test_tiles=settings.test_tiles, progress=_bar(not settings.quiet))
    pack_folder(out_dir / "synth", out_dir / "packs", seed=settings.data_seed, progress=_bar(not settings.quiet))
    return find_packs(out_dir / "packs")


def run_columns(run_dir: Path, packs: dict[str, Path], settings: DemoSettings, seed: int, stages: _Stages,
                echo: Callable[[str], None], columns: tuple[str, ...] = COLUMNS) -> None:
    """The four columns of one seed into RUN/local, federated, personalised, central (CSV tables); `columns`
    runs only some of them (a benchmark that varies the federation reuses one seed's local and central)."""
    from nfed.federation.district_jobs import make_task, run_tasks, worker_pool
    from nfed.runs.results import study_table, write_results_csv
    from nfed.training.environment import RunEnvironment
    from nfed.training.matrix import remove_matrix
    from nfed.training.study import train_central
    from nfed.training.trainer import profile_config

    config = profile_config("demo", seed=seed, epochs=settings.epoch_cap, patience=settings.patience, lr=settings.lr)
    env = RunEnvironment(settings.device, settings.precision)
    unknown = set(columns) - set(COLUMNS)
    if unknown or ("personalised" in columns and "federated" not in columns):
        raise ValueError(f"columns {columns}: choose from {COLUMNS} (personalised needs federated)")
    for name in STAGE_FOLDERS:
        if name in columns or name == "report":
            shutil.rmtree(run_dir / name, ignore_errors=True)
    if {"local", "federated"} & set(columns):
        remove_matrix(run_dir)   # its models are retrained

    countdown = Countdown(len(packs))

    def said_local(row: dict) -> None:
        echo(f"  {row['district']:<16} local F1 {row['f1']:.4f} ({row['epochs_run']} epochs, "
             f"{row['steps']} steps, {row['stop']}, {row['wall_time_s']:.1f} s); {countdown.step()}")

    with worker_pool(settings.district_jobs, len(packs), say=False) as pool:
        if "local" in columns:
            echo(f"[demo] seed {seed}: local column, every district alone (early stopping, cap {config.epochs} "
                 "epochs)")
            tasks = [make_task("local", path, run_dir / "local", config, env=env) for path in packs.values()]
            rows = run_tasks(tasks, pool, said_local)
            write_results_csv(study_table(run_dir, "local"), rows, "local")
            stages.done("local")
        if "federated" in columns:
            result = _federated_column(run_dir, packs, settings, seed, config, env, pool, echo)
            _held_out_local(run_dir)
            stages.done("federated")
        if "personalised" in columns:
            _personalised_column(run_dir, packs, config, env, pool, result.best_weights, result.best_round, echo,
                                 seed)
            stages.done("personalised")

    if "central" in columns:
        echo(f"[demo] seed {seed}: centralised column, one model on the pooled data")
        summary, _ = train_central(list(packs.values()), study_table(run_dir, "central").parent, config, env=env,
                                   quiet=settings.quiet)
        echo(f"  centralised: {summary['epochs_run']} epochs, {summary['steps']} steps, {summary['stop']}")
        stages.done("central")


def federation_config(settings: DemoSettings, seed: int):
    """The FederationConfig of one seed's federated column (also what benchmarks of the demo's protocol run)."""
    from nfed.federation.config import FederationConfig

    return FederationConfig(rounds=settings.max_rounds, local_epochs=settings.local_epochs, eps=settings.eps,
                            patience_rounds=settings.patience_rounds, server_opt=settings.server_opt, seed=seed,
                            warmup_rounds=settings.warmup_rounds, select_by=settings.select_by,
                            select_window=settings.select_window, prox_mu=settings.prox_mu,
                            norm_policy=settings.norm_policy, compress=settings.compress,
                            broadcast=settings.broadcast, hold_out=settings.hold_out)


def _federated_column(run_dir: Path, packs: dict[str, Path], settings: DemoSettings, seed: int, config, env, pool,
                      echo: Callable[[str], None]):
    """RUN/federated: the federation under the demo's protocol (its FederationResult)."""
    from nfed.federation.district_jobs import PoolRunner
    from nfed.federation.selection import describe
    from nfed.federation.server import federate

    fed = federation_config(settings, seed)
    echo(f"[demo] seed {seed}: federated column, {fed.server_opt} rounds of {fed.local_epochs} local epoch(s) "
         f"until the validation loss stalls for {fed.patience_rounds} rounds after {fed.warmup_rounds} (budget "
         f"{fed.rounds}); kept: the round of the {describe(fed.select_by, fed.select_window)}")
    with nullcontext() if pool is None else PoolRunner(pool, run_dir / "federated" / "work", packs) as runner:
        pooled = {} if runner is None else {"runner": runner, "evaluate_fn": runner.evaluate}
        result = federate(packs, run_dir / "federated", config, fed, echo=echo,
                          show_progress=not settings.quiet, overwrite=True, env=env, **pooled)
    shutil.rmtree(run_dir / "federated" / "work", ignore_errors=True)
    return result


def _held_out_local(run_dir: Path) -> None:
    """RUN/federated/heldout.csv's local column from the run's local models (when the run has both)."""
    from nfed.federation.heldout import add_local_f1
    from nfed.runs.results import read_results, study_table

    local = study_table(run_dir, "local")
    if local.is_file():
        add_local_f1(run_dir / "federated", {d: row["f1"] for d, row in read_results(local).items()})


def _personalised_column(run_dir: Path, packs: dict[str, Path], config, env, pool, best_weights, best_round: int,
                         echo: Callable[[str], None], seed: int) -> None:
    """RUN/personalised: the kept round's global model fine-tuned per district."""
    from nfed.federation.district_jobs import make_task, run_tasks
    from nfed.model.checkpoint import save_checkpoint
    from nfed.runs.results import study_table, write_results_csv
    from nfed.runs.runfolder import BEST_NAME
    from nfed.training.study import fine_tune_config

    echo(f"[demo] seed {seed}: personalised column, the round-{best_round} global model fine-tuned per district")

    countdown = Countdown(len(packs))

    def said_personalised(row: dict) -> None:
        echo(f"  {row['district']:<16} personalised F1 {row['f1']:.4f} ({row['epochs_run']} epochs, "
             f"best epoch {row['best_epoch']}); {countdown.step()}")

    start = run_dir / "federated" / BEST_NAME
    if not start.is_file():   # no round was evaluated: the run's final weights are its best
        save_checkpoint(start, best_weights)
    tasks = [make_task("personalise", path, run_dir / "personalised", fine_tune_config(config), weights=start,
                       env=env) for path in packs.values()]
    rows = run_tasks(tasks, pool, said_personalised)
    write_results_csv(study_table(run_dir, "personalised"), rows, "personalised")


def _matrix(run_dir: Path, packs: dict[str, Path], settings: DemoSettings, echo: Callable[[str], None]) -> None:
    """RUN/matrix.csv and matrix.json: every local model and the global model on every district's test split."""
    from nfed.report.matrix import matrix_line
    from nfed.training.environment import RunEnvironment
    from nfed.training.matrix import run_matrix

    echo(f"[demo] cross-district matrix: {len(packs)} local models and the global model on every test split")
    _, summary = run_matrix(run_dir, packs, env=RunEnvironment(settings.device, settings.precision))
    echo(f"  {matrix_line({**summary, 'seeds': 1})}")


def run_demo(out_dir: str | Path, settings: DemoSettings | None = None, *,
             echo: Callable[[str], None] = print, warn: Callable[[str], None] | None = None) -> dict:
    """Run the whole study; returns what OUT/demo.json holds (settings, stage times, report summary).

    One seed: the run's folders and report/ are in OUT itself. Several: each seed's in OUT/seed-<k>/, and
    OUT/report/ aggregates them (mean and 95 % interval per column, paired tests over districts)."""
    from nfed.common.memory import worker_count
    from nfed.federation.config import training_districts
    from nfed.report.build import make_study_report, table_text

    settings = settings or DemoSettings()
    warn = warn or echo
    out_dir = Path(out_dir)
    claim_demo_folder(out_dir)
    stages = _Stages(echo)
    packs = make_data(out_dir, settings, echo)
    stages.done("data")
    training_districts(list(packs), settings.hold_out)   # a name that is no district fails before any training
    settings = replace(settings, jobs=worker_count(settings.district_jobs, len(packs), say=settings.jobs > 0))
    run_dirs = []
    for seed in settings.seeds:
        run_dir = out_dir if len(settings.seeds) == 1 else out_dir / f"seed-{seed}"
        run_columns(run_dir, packs, settings, seed, stages, echo)
        if settings.matrix:
            _matrix(run_dir, packs, settings, echo)
            stages.done("matrix")
        run_dirs.append(run_dir)
        if len(settings.seeds) > 1:
            make_study_report([run_dir], run_dir / "report", demo=_page_facts(settings, stages))
            stages.done("report")
    comparison = make_study_report(run_dirs, out_dir / "report", demo=_page_facts(settings, stages))
    stages.done("report")
    echo("")
    echo(table_text(comparison))
    for warning in comparison.summary.get("warnings", []):
        warn(f"warning: {warning}")
    echo(f"\n[demo] total wall time {stages.total:.1f} s ({stages.total / 60:.1f} min); "
         f"report in {out_dir / 'report'}")
    summary = {"settings": settings.to_dict(), "stage_seconds": stages.seconds, "total_seconds": stages.total,
               "runs": [str(d) for d in run_dirs],
               "summary": {k: v for k, v in comparison.summary.items() if k != "figures"}}
    write_json_atomic(out_dir / "demo.json", summary)
    return summary


def _page_facts(settings: DemoSettings, stages: _Stages) -> dict:
    """What report.html shows of the demo (demo.json itself is written last)."""
    return {"settings": settings.to_dict(), "stage_seconds": dict(stages.seconds), "total_seconds": stages.total}


def settings_with(settings: DemoSettings, **changes) -> DemoSettings:
    """`settings` with the non-None `changes` applied."""
    return replace(settings, **{k: v for k, v in changes.items() if v is not None})
