"""RUN/status.json: is a federated run running, finished or failed, and why; read by `nfed status RUN`.

`flwr run` exits 0 whatever became of the run, and a killed ServerApp says nothing: the run folder is the one
place that knows. The federation (nfed.federation.server, in-process or over Flower) writes this file atomically
when the run starts, after every round, once federated.csv is written (finished), and with the one-line reason
when it fails. A process killed outright cannot write "failed", so a file that still says "running" while no
process holds the run folder's lock (nfed.runs.runlock) is read as failed: the run ended without finishing.

    {"state": "running" | "finished" | "failed", "round": last finished round, "rounds": round budget,
     "reason": why it failed (or null), "stop_reason": why the rounds ended (or null),
     "best_round": the round whose model is scored (or null), "updated": ISO time, "process": "pid N on host",
     "round_problems": {district or "node N": why it is not in the last round's average} (only when any)}
"""
from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path

from nfed.common import strict_json
from nfed.common.atomic import write_json_atomic
from nfed.common.errors import DataError
from nfed.common.paths import read_own_text
from nfed.runs.runlock import lock_holder

STATUS_NAME = "status.json"
STATES = ("running", "finished", "failed")
MAX_REASON = 500
MAX_NAME = 100


def write_status(run_dir: str | os.PathLike, state: str, *, round_number: int, rounds: int,
                 reason: str | None = None, stop_reason: str | None = None, best_round: int | None = None,
                 problems: dict | None = None) -> dict:
    """Write RUN/status.json atomically; returns what was written. `problems`: what went wrong in the last
    round (district or node -> why it is not in the average), so a run that goes on despite it says so."""
    if state not in STATES:
        raise ValueError(f"unknown run state {state!r}")
    status = {"state": state, "round": int(round_number), "rounds": int(rounds),
              "reason": None if reason is None else str(reason)[:MAX_REASON], "stop_reason": stop_reason,
              "best_round": best_round,
              "updated": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "process": f"pid {os.getpid()} on {socket.gethostname()}"}
    if problems:
        status["round_problems"] = {str(k)[:MAX_NAME]: str(v)[:MAX_REASON] for k, v in list(problems.items())[:100]}
    write_json_atomic(Path(run_dir) / STATUS_NAME, status)
    return status


def read_status(run_dir: str | os.PathLike) -> dict:
    """RUN/status.json as written, checked (DataError naming the file when missing or malformed)."""
    path = Path(run_dir) / STATUS_NAME
    if not Path(run_dir).is_dir():
        raise DataError(f"{run_dir}: run folder not found")
    try:
        status = strict_json.loads(read_own_text(path))   # never through a link planted in the run folder
    except FileNotFoundError:
        raise DataError(f"{path}: not found (no federated run was started in this folder, or one by an nfed "
                        "older than status files)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: unreadable ({str(exc)[:200]})") from None
    if not isinstance(status, dict) or status.get("state") not in STATES \
            or not isinstance(status.get("round"), int) or isinstance(status.get("round"), bool):
        raise DataError(f"{path}: not a run status (expected state {', '.join(STATES)} and a round number)")
    return status


def current_status(run_dir: str | os.PathLike) -> dict:
    """The run's status as it stands: a "running" file whose writer no longer holds the run folder is failed."""
    status = read_status(run_dir)
    if status["state"] == "running" and lock_holder(run_dir) is None:
        status = {**status, "state": "failed",
                  "reason": f"the run's process ({status.get('process') or 'unknown'}) ended without finishing "
                            f"after round {status['round']} (killed?); resume it to continue"}
    return status


def status_line(status: dict) -> str:
    """One line for the operator: state, rounds done of the budget, and why it stopped or failed."""
    line = f"{status['state']}: round {status['round']}/{status.get('rounds', '?')}"
    if status.get("best_round"):
        line += f", best round {status['best_round']}"
    if status["state"] == "failed" and status.get("reason"):
        line += f"; {status['reason']}"
    elif status.get("stop_reason"):
        line += f"; {status['stop_reason']}"
    problems = status.get("round_problems")
    if isinstance(problems, dict) and problems:
        shown = ", ".join(f"{k} ({v})" for k, v in list(problems.items())[:3])
        line += f"; round {status['round']} left out {len(problems)}: {shown}" + (" ..." if len(problems) > 3 else "")
    return line + f" (updated {status.get('updated', '?')})"


def round_view(status: dict, records: list) -> str:
    """`nfed status --follow`'s line for the last round: answered and late districts, mean validation F1, time
    per round and what is left (an upper bound: the round budget). `records`: RUN/rounds.jsonl as it stands;
    fields that are missing or not of their type are left out, so a hostile or older file cannot stop the view."""
    from nfed.common.progress import rounds_left

    line = f"{status['state']}: round {status['round']}/{status.get('rounds', '?')}"
    last = records[-1] if records and isinstance(records[-1], dict) else {}
    answered, selected, late = (last.get(key) for key in ("answered", "selected", "late"))
    if isinstance(answered, list) and isinstance(selected, list):
        line += f", {len(answered)}/{len(selected)} answered"
    if isinstance(late, list) and late:
        line += f", late: {', '.join(str(d)[:MAX_NAME] for d in late[:5])}" + (" ..." if len(late) > 5 else "")
    f1 = last.get("mean_val_f1")
    if _number(f1):
        line += f", mean val F1 {f1:.4f}"
    seconds = [r["seconds"] for r in records if isinstance(r, dict) and _number(r.get("seconds"))]
    budget = status.get("rounds")
    if seconds and status["state"] == "running" and _number(budget):
        line += f", {sum(seconds[-5:]) / len(seconds[-5:]):.1f} s a round; "
        line += rounds_left(seconds, status["round"], int(budget))
    problems = status.get("round_problems")
    if isinstance(problems, dict) and problems:
        line += f"; left out {len(problems)}: " + ", ".join(f"{k} ({v})" for k, v in list(problems.items())[:3])
    if status["state"] == "failed" and status.get("reason"):
        line += f"; {status['reason']}"
    elif status.get("stop_reason"):
        line += f"; {status['stop_reason']}"
    return line


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value \
        and abs(value) != float("inf")
