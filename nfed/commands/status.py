"""`nfed status RUN`: how a federated run stands (running, finished, failed and why), with an exit status that
scripts can test: `flwr run` exits 0 whatever became of the run, this command does not."""
from __future__ import annotations

from pathlib import Path

import click

from nfed.common import strict_json

EXIT_FINISHED, EXIT_FAILED, EXIT_RUNNING = 0, 1, 3


@click.command("status")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print RUN/status.json's fields as one JSON object")
def status(run_dir, as_json):
    """Print the state of the federated run in RUN_DIR (nfed federate or the Flower ServerApp): finished
    (exit 0), failed with the one-line reason (exit 1; also when the run's process was killed) or still
    running (exit 3)."""
    from nfed.common.names import printable
    from nfed.runs.runstatus import current_status, status_line

    current = current_status(run_dir)   # its reasons quote what nodes and files said: shown escaped
    click.echo(printable(strict_json.dumps(current, sort_keys=True), json_text=True) if as_json
               else printable(f"{run_dir}: {status_line(current)}"))
    click.get_current_context().exit({"finished": EXIT_FINISHED, "failed": EXIT_FAILED}.get(current["state"],
                                                                                             EXIT_RUNNING))
