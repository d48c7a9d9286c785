"""`nfed status RUN`: how a federated run stands (running, finished, failed and why), with an exit status that
scripts can test: `flwr run` exits 0 whatever became of the run, this command does not. `--follow` watches a
running federation round by round until it ends."""
from __future__ import annotations

import time
from pathlib import Path

import click

from nfed.common import strict_json

EXIT_FINISHED, EXIT_FAILED, EXIT_RUNNING = 0, 1, 3


@click.command("status")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print RUN/status.json's fields as one JSON object")
@click.option("--follow", is_flag=True,
              help="watch the run: one line per round (answered and late districts, mean validation F1, time per "
                   "round, time left at most) until it ends; the exit status is then the end's")
@click.option("--interval", type=click.FloatRange(0.05, 3600), default=5.0, show_default=True,
              help="seconds between looks at the run folder with --follow")
def status(run_dir, as_json, follow, interval):
    """Print the state of the federated run in RUN_DIR (nfed federate or the Flower ServerApp): finished
    (exit 0), failed with the one-line reason (exit 1; also when the run's process was killed) or still
    running (exit 3). With --follow, wait for the end (Ctrl-C stops watching, exit 3: the run goes on)."""
    from nfed.common.names import printable
    from nfed.runs.runstatus import current_status, status_line

    if follow:
        current = _follow(run_dir, interval)
    else:
        current = current_status(run_dir)   # its reasons quote what nodes and files said: shown escaped
        click.echo(printable(strict_json.dumps(current, sort_keys=True), json_text=True) if as_json
                   else printable(f"{run_dir}: {status_line(current)}"))
    click.get_current_context().exit(_exit_code(current))


def _exit_code(current: dict) -> int:
    return {"finished": EXIT_FINISHED, "failed": EXIT_FAILED}.get(current["state"], EXIT_RUNNING)


def _follow(run_dir: Path, interval: float) -> dict:
    """A line whenever the run's round or state changes, until it is no longer running; Ctrl-C ends the watch
    (the run's state then reads as running)."""
    from nfed.common.errors import DataError
    from nfed.common.names import printable
    from nfed.runs.runfolder import ROUNDS_NAME, read_rounds
    from nfed.runs.runstatus import current_status, round_view

    shown = None
    current = {"state": "running"}
    try:
        while True:
            current = current_status(run_dir)
            seen = (current["state"], current["round"], current.get("updated"))
            if seen != shown:
                try:
                    records = read_rounds(run_dir / ROUNDS_NAME)
                except DataError:   # a history being replaced or damaged: the view goes on without it
                    records = []
                click.echo(printable(f"{run_dir}: {round_view(current, records)}"))
                shown = seen
            if current["state"] != "running":
                return current
            time.sleep(interval)
    except KeyboardInterrupt:
        click.echo(f"{run_dir}: stopped watching (the run itself goes on)", err=True)
        return {"state": "running"}
