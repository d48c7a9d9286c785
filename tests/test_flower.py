"""nfed over Flower: the app folder, the message round trip, and real SuperLink + SuperNode deployments.

The integration tests start real `flower-superlink` / `flower-supernode` processes on 127.0.0.1 (free ports,
each stopped by PID afterwards) and run `flwr run APP_DIR CONNECTION --stream`, as the README shows.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from flower_harness import FlowerDeployment, flwr_available, make_supernode_key, make_tls_files

if flwr_available():
    from nfed.federation.flower.app import serve

pytestmark = [pytest.mark.flower,
              pytest.mark.skipif(not flwr_available(), reason="flwr is not installed (pip install 'nfed[flower]')")]

DISTRICTS = ("Gangnam-gu", "Gangdong-gu", "Gwangjin-gu")
TILE = 32
WIDTH = 4


def make_tiny_packs(folder: Path, districts=DISTRICTS, counts=((4, 2, 2), (6, 2, 2), (3, 2, 2))) -> dict[str, Path]:
    """One small synthetic pack per district (the data helper's generator and pack writer)."""
    from nfed.data.packwriter import write_pack
    from nfed.data.synth import tile_rng
    from nfed.data.synthscene import generate_tile
    from nfed.data.synthstyle import district_style

    folder.mkdir(parents=True, exist_ok=True)
    packs = {}
    for district, split_counts in zip(districts, counts):
        style = district_style(district, 0)
        splits, index = {}, 0
        for split, count in zip(("train", "val", "test"), split_counts):
            tiles = [generate_tile(style, tile_rng(0, district, index + i), TILE) for i in range(count)]
            index += count
            splits[split] = (np.stack([t.past for t in tiles]), np.stack([t.current for t in tiles]),
                             np.stack([t.mask() for t in tiles]).astype(np.uint8),
                             [f"{district}_{split}_{i}" for i in range(count)])
        packs[district] = write_pack(folder / f"{district}.h5", district, splits, source="nfed synth (test)")
    return packs


def write_app(app_dir: Path, run_dir: Path, *extra: str) -> Path:
    from nfed.cli import cli

    result = CliRunner().invoke(cli, ["flower-app", "--out", str(app_dir), "--run-dir", str(run_dir),
                                      "--width", str(WIDTH), "--batch-size", "2", "--lr", "0.001",
                                      "--eps", "0", *extra])
    assert result.exit_code == 0, result.output
    return app_dir


def start_nodes(flower: FlowerDeployment, packs: dict[str, Path]) -> None:
    flower.start_superlink()
    flower.start_supernodes({name: {"pack": str(path)} for name, path in packs.items()})


def load_global(run_dir: Path) -> dict[str, np.ndarray]:
    from nfed.model.checkpoint import load_checkpoint

    return load_checkpoint(run_dir / "global.h5").model_state


# ------------------------------------------------------------------------------------------ fast tests

def test_flower_app_writes_a_valid_app_whose_config_round_trips(tmp_path):
    from flwr.common.config import get_fused_config_from_dir, validate_config

    from nfed.federation.flower.config import settings_from_run_config

    app = write_app(tmp_path / "app", tmp_path / "run", "--rounds", "3", "--deadline", "12.5",
                    "--min-clients", "2", "--server-opt", "fedadam", "--profile", "demo")
    config = tomllib.loads((app / "pyproject.toml").read_text())
    valid, errors, _ = validate_config(config, check_module=True, project_dir=app)
    assert valid, errors
    assert config["tool"]["flwr"]["app"]["components"] == {"serverapp": "nfed.federation.flower:server_app",
                                                            "clientapp": "nfed.federation.flower:client_app"}
    flat = get_fused_config_from_dir(app, {"rounds": 5, "train.lr": 0.01})
    settings = settings_from_run_config(flat)
    assert settings.run_dir == (tmp_path / "run").resolve()
    assert settings.federation_config.rounds == 5
    assert settings.federation_config.deadline == 12.5
    assert settings.federation_config.min_clients == 2
    assert settings.federation_config.server_opt == "fedadam"
    assert settings.federation_config.server_lr is None
    assert settings.train_config.width == WIDTH and settings.train_config.lr == 0.01
    assert not any(key.endswith("device") for key in flat)   # each node's own (node config `device`)


def test_flower_app_rejects_bad_options(tmp_path):
    from nfed.cli import cli

    result = CliRunner().invoke(cli, ["flower-app", "--out", str(tmp_path / "app"), "--rounds", "0"])
    assert result.exit_code == 1 and "--rounds" in result.output
    assert not (tmp_path / "app" / "pyproject.toml").exists()


def test_weights_travel_by_name_packed_as_npy_without_pickle():
    from nfed.common.errors import DataError
    from nfed.federation.flower.messages import record_to_weights, weights_to_record

    weights = {"enc.e1.conv1.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
               "enc.e1.bn1.running_var": np.ones(3, np.float32), "step": np.asarray(4, np.int64),
               "transposed": np.arange(6, dtype=np.float64).reshape(2, 3).T}
    record = weights_to_record(weights)
    assert sorted(record) == ["manifest", "packed.<f4", "packed.<f8", "packed.<i8"]
    for array in record.values():
        assert array.stype == "numpy.ndarray" and array.data[:6] == b"\x93NUMPY"
    back = record_to_weights(record)
    assert list(back) == list(weights)
    for name, value in weights.items():
        assert back[name].dtype == value.dtype and np.array_equal(back[name], value)

    del record["packed.<f8"]
    with pytest.raises(DataError, match="unreadable weights record"):
        record_to_weights(record)
    with pytest.raises(DataError, match="not numeric"):
        weights_to_record({"names": np.array(["a", "b"])})


# ------------------------------------------------------------------------------------------ in-memory grid

class LoopbackGrid:
    """A Grid double: every message goes straight to nfed.federation.flower.app's ClientApp in this process.

    Nodes are node id -> node config; ids in `silent` answer the describe query, then never again (a machine
    that dropped off after joining); ids in `dead` get no answer but, after their delay, the SuperLink's
    "Node Unavailable" error (a killed machine whose heartbeats stopped); messages to ids no longer in
    `contexts` are refused at push (a node that left and unregistered). The server code under test
    (nfed.federation.flower.app.serve) is the real one; only the SuperLink/SuperNode transport is skipped.
    """

    def __init__(self, node_configs: dict[int, dict], silent: set[int] = frozenset(), rogue: dict | None = None):
        self.contexts = {}
        for node, config in node_configs.items():
            self.add(node, config)
        self.silent = set(silent)
        self.rogue = dict(rogue or {})   # node -> f(message, honest reply) -> the reply it sends instead
        self.dead: dict[int, float] = {}  # node -> seconds after which the SuperLink reports it unavailable
        self.replies = {}
        self.unavailable = {}             # message id -> (message, when the SuperLink gives up on its node)
        self.sent = []

    def add(self, node: int, config: dict) -> None:
        """A node connects (or reconnects under a new id)."""
        from flwr.app import Context, RecordDict

        self.contexts[node] = Context(run_id=1, node_id=node, node_config=dict(config), state=RecordDict(),
                                      run_config={})

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        import time

        from nfed.federation.flower.app import client_app

        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id
            node = message.metadata.dst_node_id
            if node not in self.contexts:   # the SuperLink refuses messages to a node it no longer lists
                ids.append("")
                continue
            ids.append(message.metadata.message_id)
            self.sent.append((node, message.metadata.message_type))
            if node in self.dead:
                self.unavailable[message.metadata.message_id] = (message, time.monotonic() + self.dead[node])
            elif node not in self.silent or message.metadata.message_type == "query":
                reply = client_app(message, self.contexts[node])
                if node in self.rogue:
                    reply = self.rogue[node](message, reply)
                self.replies[message.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids):
        import time

        from flwr.app import Error, Message

        replies = [self.replies.pop(i) for i in list(message_ids) if i in self.replies]
        for i in list(message_ids):
            if i in self.unavailable and time.monotonic() >= self.unavailable[i][1]:
                replies.append(Message(Error(code=5, reason="Error: Node Unavailable"),
                                       reply_to=self.unavailable.pop(i)[0]))
        return replies


@pytest.fixture
def task_identity():
    """Messages take their run id from Flower's per-process task identity; set it as a ServerApp would."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def flat_run_config(train_config, fed_config, run_dir, **options):
    from flwr.common.config import flatten_dict

    from nfed.federation.flower.config import run_config_for

    return flatten_dict(run_config_for(train_config, fed_config, run_dir=run_dir, **options))


def test_serve_equals_in_process_federation_and_resumes(tmp_path, task_identity):
    """nfed.federation.flower.app.serve over a Grid: 1 round, then resumed to 2 = an uninterrupted in-process 2-round
    run."""
    from nfed.federation.config import FederationConfig
    from nfed.federation.server import federate
    from nfed.training.trainer import profile_config

    packs = make_tiny_packs(tmp_path / "packs", counts=((2, 1, 1), (3, 1, 1), (2, 1, 1)))
    grid = LoopbackGrid({30 + i: {"pack": str(path)} for i, path in enumerate(reversed(list(packs.values())))})
    train = profile_config("demo", width=WIDTH, batch_size=2, lr=0.001, seed=3)
    lines = []
    serve(grid, flat_run_config(train, FederationConfig(rounds=1, eps=0.0, min_clients=3, seed=3),
                                tmp_path / "flower"), echo=lines.append)
    result = serve(grid, flat_run_config(train, FederationConfig(rounds=2, eps=0.0, min_clients=3, seed=3),
                                         tmp_path / "flower", resume=True), echo=lines.append)
    assert any("resuming" in line for line in lines)
    local = federate(packs, tmp_path / "local", train, FederationConfig(rounds=2, eps=0.0, min_clients=3, seed=3))
    saved = load_global(tmp_path / "flower")
    for name, value in local.global_weights.items():
        np.testing.assert_allclose(result.global_weights[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(saved[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    flower_rounds = [json.loads(line) for line in (tmp_path / "flower" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in flower_rounds] == [1, 2]
    for mine, theirs in zip(flower_rounds, local.rounds):
        assert mine["answered"] == theirs["answered"] == list(DISTRICTS)
        assert mine["mean_val_loss"] == pytest.approx(theirs["mean_val_loss"], rel=1e-5)
    assert ((tmp_path / "flower" / "federated.csv").read_text()
            == (tmp_path / "local" / "federated.csv").read_text())


def test_serve_leaves_out_silent_and_failing_nodes(tmp_path, task_identity):
    """A node that never answers is late after the deadline, one whose training fails is failed (one line)."""
    from nfed.federation.config import FederationConfig
    from nfed.training.trainer import profile_config

    packs = make_tiny_packs(tmp_path / "packs", counts=((2, 1, 1), (2, 1, 1), (2, 1, 1)))
    grid = LoopbackGrid({1: {"pack": str(packs["Gangnam-gu"])},
                         2: {"pack": str(packs["Gangdong-gu"]), "device": "cuda:97"},
                         3: {"pack": str(packs["Gwangjin-gu"])},
                         4: {"pack": str(tmp_path / "missing.h5")}}, silent={3})
    config = flat_run_config(profile_config("demo", width=WIDTH, batch_size=2),
                             FederationConfig(rounds=1, eps=0.0, deadline=1.0, evaluate_rounds=False),
                             tmp_path / "run", connect_timeout=1.0)
    lines = []
    result = serve(grid, config, echo=lines.append)
    assert any("SuperNode 4 refused" in line and "missing.h5" in line for line in lines)
    record = result.rounds[0]
    assert record["answered"] == ["Gangnam-gu"]
    assert record["late"] == ["Gwangjin-gu"]
    assert "cuda:97" in record["failed"]["Gangdong-gu"]
    assert [row["district"] for row in result.results] == ["Gangnam-gu"]


def _rogue_replies():
    """Replies of misbehaving SuperNodes: a malformed description, a malformed train reply, an oversized
    train reply, a malformed evaluation reply (each keyed by the message type it spoils)."""
    from flwr.app import Array, ConfigRecord, Message, RecordDict

    from nfed.federation.flower.messages import RESULT_RECORD, WEIGHTS_RECORD

    def reply_with(content):
        return lambda message, honest: Message(RecordDict(content), reply_to=message)

    def only(kind, spoil):
        return lambda message, honest: spoil(message, honest) if message.metadata.message_type == kind else honest

    def spoil_evaluation(message, honest):
        """Garbled evaluation metrics, whether the evaluation came alone or with the next round's training."""
        if message.metadata.message_type == "evaluate":
            return reply_with({RESULT_RECORD: ConfigRecord({"metrics": json.dumps([])})})(message, honest)
        if message.metadata.message_type == "train" and not honest.has_error() \
                and "evaluation" in honest.content[RESULT_RECORD]:
            honest.content[RESULT_RECORD]["evaluation"] = json.dumps([])
        return honest

    def oversized(message, honest):
        record = honest.content[WEIGHTS_RECORD]
        record["packed.padding"] = Array(np.zeros(2_000_000, np.float32))
        return honest

    return {
        "describe": only("query", reply_with({RESULT_RECORD: ConfigRecord({"info": json.dumps([1, 2])})})),
        "train": only("train", reply_with({RESULT_RECORD: ConfigRecord({
            "district": json.dumps("Gwangjin-gu"), "num_samples": json.dumps("lots"),
            "metrics": json.dumps("fast")}), WEIGHTS_RECORD: ConfigRecord({"x": "y"})})),
        "oversized": only("train", oversized),
        "evaluate": spoil_evaluation,
    }


def test_rogue_supernodes_are_dropped_and_the_run_goes_on(tmp_path, task_identity):
    """Through the real ServerApp code (serve): two nodes claiming one district with different packs, one
    describing itself in nonsense, one replying garbage to train, one sending an oversized model, one garbling
    its evaluation, one serving another node's district with the same pack. Each is logged and refused or left
    out (for as long as it stays connected once it broke the protocol); the honest district federates."""
    from nfed.federation.config import FederationConfig
    from nfed.training.trainer import profile_config

    packs = make_tiny_packs(tmp_path / "packs", counts=((2, 1, 1),) * 3)
    packs.update(make_tiny_packs(tmp_path / "packs", ("Jung-gu", "Jongno-gu"), ((2, 1, 1),) * 2))
    other_gangnam = make_tiny_packs(tmp_path / "other", ("Gangnam-gu",), ((3, 1, 1),))["Gangnam-gu"]
    rogue = _rogue_replies()
    grid = LoopbackGrid({1: {"pack": str(packs["Gangnam-gu"])}, 2: {"pack": str(packs["Gangdong-gu"])},
                         3: {"pack": str(packs["Gwangjin-gu"])}, 4: {"pack": str(other_gangnam)},
                         5: {"pack": str(packs["Gangdong-gu"])}, 6: {"pack": str(packs["Jung-gu"])},
                         7: {"pack": str(packs["Jongno-gu"])}, 8: {"pack": str(packs["Gangdong-gu"])}},
                        rogue={3: rogue["train"], 5: rogue["describe"], 6: rogue["evaluate"], 7: rogue["oversized"]})
    config = flat_run_config(profile_config("demo", width=WIDTH, batch_size=2),
                             FederationConfig(rounds=2, eps=0.0, deadline=5.0), tmp_path / "run",
                             connect_timeout=1.0)
    lines = []
    result = serve(grid, config, echo=lines.append)
    # listed together, neither can be told from the other: contested, no node serves Gangnam-gu
    assert any("district Gangnam-gu contested: SuperNodes 1, 4 claim it with different packs" in line
               for line in lines), lines
    assert any("SuperNode 5 refused" in line for line in lines), lines
    assert any("SuperNode 8 (Gangdong-gu) refused for now: a duplicate of SuperNode 2" in line for line in lines), lines
    first, second = result.rounds
    assert first["selected"] == ["Gangdong-gu", "Gwangjin-gu", "Jongno-gu", "Jung-gu"]
    assert first["answered"] == ["Gangdong-gu", "Jung-gu"]
    assert "bad reply" in first["failed"]["Gwangjin-gu"]
    assert "exceeds the model's" in first["failed"]["Jongno-gu"]
    assert "Jung-gu" not in first["global_val"]            # its evaluation reply was garbage
    assert second["answered"] == ["Gangdong-gu"]
    for district in ("Gwangjin-gu", "Jung-gu", "Jongno-gu"):
        assert "was left out" in second["failed"][district], second["failed"]
    assert all(np.all(np.isfinite(v)) for v in result.global_weights.values())
    assert [row["district"] for row in result.results] == ["Gangdong-gu"]


# ------------------------------------------------------------------------------------------ integration
# Each starts a SuperLink, SuperNodes and a run: ~30-60 s on an idle 2-core machine (every Flower message
# starts a ClientApp process and a SuperNode polls every 3 s), so they run in the slow step of CI.

@pytest.mark.slow
def test_flower_run_equals_in_process_federation(tmp_path):
    """3 SuperNodes, 2 rounds: same final global weights, rounds.jsonl and federated.csv as nfed federate."""
    from nfed.federation.config import FederationConfig
    from nfed.federation.server import federate
    from nfed.training.trainer import profile_config

    packs = make_tiny_packs(tmp_path / "packs")
    app = write_app(tmp_path / "app", tmp_path / "flower-run", "--rounds", "2", "--min-clients", "3",
                    "--deadline", "120", "--no-round-eval")
    with FlowerDeployment(tmp_path / "flower") as flower:
        start_nodes(flower, packs)
        result = flower.run_app(app, timeout=150)
        assert result.returncode == 0, result.output + flower.logs()
    assert "round 2/2: 3/3 answered" in result.output, result.output

    train = profile_config("demo", width=WIDTH, batch_size=2, lr=0.001, seed=0)
    local = federate(packs, tmp_path / "in-process", train, FederationConfig(rounds=2, eps=0.0, min_clients=3,
                                                                              seed=0, evaluate_rounds=False))
    flower_weights = load_global(tmp_path / "flower-run")
    assert sorted(flower_weights) == sorted(local.global_weights)
    for name, value in local.global_weights.items():
        np.testing.assert_allclose(flower_weights[name], value, rtol=1e-5, atol=1e-6, err_msg=name)

    rounds = [json.loads(line) for line in (tmp_path / "flower-run" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert [r["answered"] for r in rounds] == [list(DISTRICTS)] * 2
    for flower_round, local_round in zip(rounds, local.rounds):
        assert flower_round["norm_difference"] == pytest.approx(local_round["norm_difference"], rel=1e-4)
        assert flower_round["mean_val_f1"] == pytest.approx(local_round["mean_val_f1"], abs=1e-6)
    csv_rows = (tmp_path / "flower-run" / "federated.csv").read_text().splitlines()
    assert csv_rows == (tmp_path / "in-process" / "federated.csv").read_text().splitlines()


def nfed_status(run_dir: Path) -> tuple[int, str]:
    from nfed.cli import cli

    result = CliRunner().invoke(cli, ["status", str(run_dir)])
    return result.exit_code, result.output


@pytest.mark.slow
def test_operating_a_deployment_restart_kill_allow_list_and_status(tmp_path):
    """Issue 17 on one real deployment (5 SuperNodes; allow-list Gangnam-gu, Gangdong-gu, Gwangjin-gu):
    - a Jung-gu node is refused (not allowed), a second Gangnam-gu node with the same pack is a standby;
    - Gangdong-gu's node is SIGKILLed once round 1 is sent: late at the deadline (the true wait recorded),
      not asked to evaluate round 1, and the run goes on;
    - Gwangjin-gu's node restarts after round 1 under a new node id and still takes part in round 3 and
      federated.csv;
    - `nfed status` exits 0 once `flwr run` ends; the run resumed for a 4th round with its ServerApp SIGKILLed:
      `nfed status` says failed (the process ended without finishing) and exits 1."""
    packs = make_tiny_packs(tmp_path / "packs", DISTRICTS + ("Jung-gu",), counts=((2, 1, 1),) * 4)
    deadline = 30.0
    app = write_app(tmp_path / "app", tmp_path / "run", "--rounds", "3", "--deadline", str(deadline),
                    "--eval-deadline", "25", "--expected-nodes", "5", "--districts", ",".join(DISTRICTS))
    killed, restarted = "Gangdong-gu", "Gwangjin-gu"
    with FlowerDeployment(tmp_path / "flower") as flower:
        flower.start_superlink()
        flower.start_supernodes({**{name: {"pack": str(path)} for name, path in packs.items()},
                                 "Gangnam-gu-twin": {"pack": str(packs["Gangnam-gu"])}})

        def operator(line: str) -> None:
            if line.startswith("sending round 1") and killed in flower.supernodes:
                flower.kill_supernode(killed)
            if line.startswith("round 1/3"):
                flower.restart_supernode(restarted)

        result = flower.run_app(app, timeout=400, on_line=operator)
        assert result.returncode == 0 and "done:" in result.output, result.output + flower.logs()
        assert nfed_status(tmp_path / "run")[0] == 0

        resumed = flower.run_app(app, run_config={"resume": True, "rounds": 4, "expected-nodes": 1}, timeout=200,
                                 until=lambda line: "(resuming)" in line and flower.kill_serverapp())
        code, output = nfed_status(tmp_path / "run")
    assert code == 1 and "ended without finishing after round 3 (killed?)" in output, output + resumed.output

    out = result.output
    assert "(Jung-gu) refused: district 'Jung-gu' is not in the allow-list (--districts)" in out, out
    assert "(Gangnam-gu) refused for now: a duplicate of SuperNode" in out, out
    rounds = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    first, second, third = rounds
    assert first["late"] == [killed] and first["answered"] == ["Gangnam-gu", restarted]
    assert deadline <= first["clients"][killed]["seconds"] <= first["seconds"]
    assert f"not asked to evaluate: in this round's training, no answer within the {deadline:g} s deadline" in out
    assert killed not in first["global_val"]
    assert third["answered"] == ["Gangnam-gu", restarted] and killed in third["failed"], third
    nodes = {line.split()[1].rstrip(":") for line in out.splitlines() if line.endswith("val 1, test 1)")
             and f": {restarted} (" in line}
    assert len(nodes) == 2, out                                 # described under its first and its new node id
    assert all(r["seconds"] < 2 * deadline + 30 for r in rounds), [r["seconds"] for r in rounds]
    rows = (tmp_path / "run" / "federated.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["Gangnam-gu", restarted]


@pytest.mark.slow
def test_flower_run_over_tls_admits_only_registered_supernodes(tmp_path):
    """TLS with a CA made here and SuperNode authentication: the SuperLink admits the two nodes whose public
    keys were registered (`flwr supernode register`); a third node with an unregistered key is refused."""
    packs = make_tiny_packs(tmp_path / "packs", counts=((3, 1, 1), (3, 1, 1), (3, 1, 1)))
    registered, intruder = list(DISTRICTS[:2]), DISTRICTS[2]
    app = write_app(tmp_path / "app", tmp_path / "run", "--rounds", "1", "--min-clients", "2",
                    "--expected-nodes", "2", "--deadline", "120", "--no-round-eval")
    tls = make_tls_files(tmp_path / "tls")
    keys = {district: make_supernode_key(tmp_path / "keys", district) for district in DISTRICTS}
    with FlowerDeployment(tmp_path / "flower", tls=tls, node_auth=True) as flower:
        flower.start_superlink()
        for district in registered:
            flower.register_supernode(keys[district][1])
        flower.start_supernodes({d: {"pack": str(path)} for d, path in packs.items()},
                                keys={d: private for d, (private, _) in keys.items()}, refused={intruder})
        result = flower.run_app(app, timeout=120)
        assert result.returncode == 0, result.output + flower.logs()
        assert "insecure" not in (tmp_path / "flower" / "flwr-home" / "config.toml").read_text()
        flower.supernodes[intruder].wait(timeout=60)   # turned away: it gives up and exits
        refused = (tmp_path / "flower" / f"supernode-{intruder}.log").read_text()
    assert "Failed to activate SuperNode" in refused, refused
    assert intruder not in result.output
    rounds = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert rounds[0]["selected"] == rounds[0]["answered"] == registered
    weights = load_global(tmp_path / "run")
    assert all(np.all(np.isfinite(v)) for v in weights.values())
    assert not math.isnan(float(rounds[0]["norm_difference"]))
