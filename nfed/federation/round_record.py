"""A round's record (one line of RUN/rounds.jsonl), its one-line echo, and what summary.json says of the
defences: the bookkeeping of the round loop, apart from the loop itself."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

from nfed.common.progress import rounds_left
from nfed.federation.client import ClientOutcome, clean_metrics


def client_entry(outcome: ClientOutcome, capped: Mapping[str, tuple], attack: str | None) -> dict:
    """A client's entry in the round record: status, times, samples, its metrics, sample cap, attacker."""
    entry = {"status": outcome.status, "seconds": round(outcome.seconds, 3)}
    if outcome.simulated_seconds is not None:
        entry["simulated_seconds"] = round(outcome.simulated_seconds, 3)
    if outcome.reason:
        entry["reason"] = outcome.reason
    result = outcome.result
    if result is not None:
        entry["num_samples"] = clean_metrics({"n": result.num_samples}).get("n")
        entry.update({k: v for k, v in clean_metrics(result.metrics).items() if k != "wall_time_s"})
    if outcome.district in capped:
        entry["weight"], entry["capped"] = capped[outcome.district]
    if attack is not None:
        entry["attacker"] = attack
    return entry


def round_record(round_number: int, selected: Sequence[str], clients: Mapping[str, dict], aggregator,
                 problem: str | None, kept_previous: bool, norm_difference: float | None) -> dict:
    """The record of a finished round, before its validation (add_validation) and timing."""
    # in the order the districts were selected, whatever order their replies arrived in (a streamed round folds
    # them as they come): the record reads the same for the same round
    accepted, chosen = set(aggregator.accepted), set(selected)
    answered = [d for d in selected if d in accepted] + [d for d in aggregator.accepted if d not in chosen]
    record = {
        "round": round_number, "selected": list(selected), "answered": list(answered), "problem": problem,
        "late": [d for d, e in clients.items() if e["status"] == "late"],
        "failed": {d: e.get("reason", "") for d, e in clients.items() if e["status"] == "failed"},
        "rejected": {d: e.get("reason", "") for d, e in clients.items() if e["status"] == "rejected"},
        "kept_previous": kept_previous, "norm_difference": norm_difference, "clients": dict(clients),
        "mean_client_val_f1": _mean([clients[d].get("val_f1") for d in answered]),
        "aggregator": aggregator.name,
    }
    if aggregator.notes:
        record["aggregation"] = aggregator.notes
    return record


def round_problems(record: Mapping) -> dict[str, str]:
    """district (or "node N") -> why it is not in the round's average as it claimed: late, failed, rejected,
    capped, or a SuperNode refused; what RUN/status.json shows for the round."""
    problems = {d: "late" for d in record.get("late", ())}
    problems.update({d: f"failed: {why}" for d, why in record.get("failed", {}).items()})
    problems.update({d: f"rejected: {why}" for d, why in record.get("rejected", {}).items()})
    problems.update({d: f"capped: {e['capped']}" for d, e in record.get("clients", {}).items() if "capped" in e})
    problems.update({f"node {n}": f"refused: {why}" for n, why in record.get("refused_nodes", {}).items()})
    return problems


def add_validation(record: dict, evaluated: Mapping[str, dict]) -> None:
    """The global model's validation per district and its means; without a federated evaluation, the means of
    the answering clients' own validation."""
    clients, answered = record["clients"], record["answered"]
    record["global_val"] = {d: {"loss": m.get("loss"), "f1": m.get("f1"), "samples": m.get("samples")}
                            for d, m in evaluated.items()}
    if evaluated:
        record["mean_val_f1"] = _mean([m.get("f1") for m in evaluated.values()])
        record["mean_val_loss"] = _weighted_mean((m.get("loss"), m.get("samples", 1) or 1)
                                                 for m in evaluated.values())
    else:
        record["mean_val_f1"] = record["mean_client_val_f1"]
        record["mean_val_loss"] = _weighted_mean((clients[d].get("val_loss"), clients[d]["num_samples"])
                                                 for d in answered)


def defence_summary(config, records: list[dict], attackers: Sequence[str]) -> dict:
    """summary.json's account of the aggregation, the privacy spent and any simulated attack."""
    summary = {"aggregator": "dp-fedavg" if config.dp_clip > 0 else config.aggregator,
               "secure_aggregation": config.secure_aggregation}
    privacy = [r["privacy"] for r in records if r.get("privacy")]
    if privacy:
        summary["privacy"] = privacy[-1]
    if attackers:
        summary["simulated_attack"] = {"kind": config.simulate_attack, "attackers": list(attackers)}
    return summary


def _weighted_mean(pairs):
    pairs = [(v, n) for v, n in pairs if v is not None and math.isfinite(v) and n > 0]
    total = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / total if total else None


def _mean(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def round_line(record: dict, budget: int, records: Sequence[Mapping] = (), stop=None) -> str:
    """The line the server echoes after a round; with the run's `records` (this one last) and its StopRules, the
    time the rounds took and what is left (time_left) unless this round ended the run."""
    clients = record["clients"]
    answered = record["answered"]
    times = [clients[d].get("simulated_seconds", clients[d]["seconds"]) for d in answered]
    parts = [f"round {record['round']}/{budget}: {len(answered)}/{len(record['selected'])} answered"]
    if times:
        parts.append(f"client time {min(times):.1f}-{max(times):.1f} s")
    if record["late"]:
        parts.append("late (dropped): " + ", ".join(
            f"{d} {clients[d].get('simulated_seconds', clients[d]['seconds']):.1f}s" for d in record["late"]))
    for key in ("failed", "rejected"):
        if record[key]:
            parts.append(f"{key}: " + ", ".join(f"{d} ({why})" for d, why in record[key].items()))
    if record.get("problem"):
        parts.append(f"{record['problem']}: previous global weights kept")
    elif record["kept_previous"]:
        parts.append("fewer responders than --min-clients: previous global weights kept")
    capped = [d for d, e in clients.items() if "capped" in e]
    if capped:
        parts.append("sample counts capped: " + ", ".join(capped))
    notes = record.get("aggregation") or {}
    if "selected" in notes:
        parts.append(f"multi-Krum kept {len(notes['selected'])}/{len(answered)}")
    if notes.get("clipped"):
        parts.append(f"clipped to {notes['bound']:.3g}: {', '.join(notes['clipped'])}")
    privacy = record.get("privacy")
    if privacy:
        epsilon = privacy["epsilon"]
        parts.append(f"privacy spent: epsilon {epsilon:.3g} at delta {privacy['delta']:.2g}"
                     if epsilon is not None and math.isfinite(epsilon) else "no DP noise: no privacy guarantee")
    if record.get("mean_val_f1") is not None:
        parts.append(f"mean val F1 {record['mean_val_f1']:.4f}")
    if record["norm_difference"] is not None:
        parts.append(f"norm diff {record['norm_difference']:.4g}")
    parts.append(f"{record['seconds']:.1f} s")
    if records and not record.get("stop"):
        parts.append(time_left(records, budget, stop))
    return "; ".join(parts)


def time_left(records: Sequence[Mapping], budget: int, stop=None) -> str:
    """What the rounds took and what is left (nfed.common.progress.rounds_left), with the stop rule's state."""
    seconds = [r["seconds"] for r in records if isinstance(r.get("seconds"), (int, float))]
    rule = {} if stop is None else {"patience": stop.patience_rounds, "stale": stop.rounds_since_best,
                                    "warmup": stop.warmup_rounds}
    return rounds_left(seconds, int(records[-1]["round"]), budget, **rule)
