"""Secure aggregation over Flower: Flower's own SecAgg+ driven from nfed's round loop.

nfed's ServerApp runs nfed.federation.server's round loop, not a Flower strategy; Flower's SecAggPlusWorkflow is a
callable (grid, LegacyContext) that asks the context's strategy for each node's FitIns and hands the unmasked
aggregate to the strategy's aggregate_fit. `secure_round` gives it a one-round strategy that only forwards
nfed's set-up, so Flower's protocol runs inside an nfed round (one fix: see `_Workflow`) (Bonawitz et al. 2017 with the
SecAgg+ neighbour graph; here every sampled node is every other's neighbour, and the key shares of a node
that drops out after sharing its keys are recovered from 2/3 of the others).

Each node's ClientApp answers the protocol's four train messages through Flower's `secaggplus_mod`: on the
third it trains (nfed.federation.client.train_round, DP clipping included) and turns its delta from the global weights
(one float vector, every coordinate clipped to +-range) into a masked, quantised vector; its sample count
and metrics travel in clear. The ServerApp's code sees only the replies' key material, the masked vectors and
the aggregate Flower reconstructs: the weighted mean delta sum_i n_i d_i / sum_i n_i, within the quantisation
error (2 range / 2^22 per coordinate and client). `AuditingGrid` counts what the replies carry into the round
record (`aggregation.individual_array_bytes` is 0 when no reply held an update in clear).

Under --norm-policy fedbn / silobn the vector holds the shared tensors alone: each node trains from them with its own
BatchNorm kept in its context state (nfed.federation.flower.app), so the sum never includes a district's BatchNorm.

Trade-offs: the server cannot clip, cap or robustly combine what it cannot see, so secure aggregation runs
with --aggregator fedavg, the clients clip (--dp-clip) and weigh themselves; a claimed sample count other
than the node's description discards the round's aggregate. Flower's masks come from NumPy's Mersenne Twister
seeded with 32 bits folded from each 32-byte key (flwr 1.42 secaggplus_utils.pseudo_rand_gen): sound against
an honest-but-curious server, but weaker than the 256-bit keys suggest against one that searches seeds.
"""
from __future__ import annotations

import json
import logging
from typing import Callable, Mapping, Sequence

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import (Code, FitIns, FitRes, Parameters, Status, bytes_to_ndarray, ndarray_to_bytes,
                         ndarrays_to_parameters)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from nfed.common import strict_json
from nfed.common.errors import DataError, one_line
from nfed.federation.client import ClientOutcome, ClientResult, ClientTask, clean_metrics, train_round
from nfed.federation.privacy import SecureAggregate
from nfed.federation.round_setup import RoundSetup

log = logging.getLogger(__name__)

RECONSTRUCTION_THRESHOLD = 2 / 3   # share of the nodes whose key shares rebuild a dropped node's masks
QUANTISATION_RANGE = 1 << 22       # Flower's defaults: 22-bit quantisation, masks modulo 2^32
MODULUS_RANGE = 1 << 32
SETUP_KEY, MANIFEST_KEY, METRICS_KEY, RANGE_KEY = "nfed.setup", "nfed.manifest", "nfed.core.metrics", "nfed.range"


def is_secure_message(message: Message) -> bool:
    """True for a SecAgg+ stage message (the workflow's config record is present)."""
    return RECORD_KEY_CONFIGS in message.content.config_records


# ------------------------------------------------------------------------------------------ flat vectors

def manifest_of(weights: Mapping[str, np.ndarray]) -> list[list]:
    """[[name, shape], ...] in order: how a flat float vector maps back to named arrays."""
    manifest = []
    for name, value in weights.items():
        if np.asarray(value).dtype.kind != "f":
            raise DataError(f"secure aggregation sums float arrays only; '{name}' is {np.asarray(value).dtype}")
        manifest.append([str(name), list(np.shape(value))])
    return manifest


def flatten(weights: Mapping[str, np.ndarray], manifest: Sequence, dtype=np.float64) -> np.ndarray:
    return np.concatenate([np.asarray(weights[name], dtype=dtype).ravel() for name, _ in manifest])


def unflatten(vector: np.ndarray, manifest: Sequence, dtypes: Mapping[str, np.dtype] | None = None) -> dict:
    sizes = [int(np.prod(shape, dtype=np.int64)) for _, shape in manifest]
    if vector.ndim != 1 or vector.size != sum(sizes):
        raise DataError(f"a flat vector of {vector.size} values does not fit the model's {sum(sizes)}")
    out, offset = {}, 0
    for (name, shape), size in zip(manifest, sizes):
        part = vector[offset:offset + size].reshape(shape)
        out[name] = part.astype(dtypes[name]) if dtypes else part.copy()
        offset += size
    return out


# ------------------------------------------------------------------------------------------ ClientApp side

def secure_train(message: Message, context: Context, pack_of: Callable, env_of: Callable) -> Message:
    """A ClientApp's answer to one SecAgg+ stage (Flower's secaggplus_mod around nfed's training)."""
    def train(msg: Message, ctx: Context) -> Message:
        fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        manifest = strict_json.loads(str(fitins.config[MANIFEST_KEY]))
        setup = RoundSetup.from_dict(strict_json.loads(str(fitins.config[SETUP_KEY])))
        bound = float(fitins.config[RANGE_KEY])
        global_vector = bytes_to_ndarray(fitins.parameters.tensors[0])
        global_weights = unflatten(global_vector, manifest, {name: np.float32 for name, _ in manifest})
        from nfed.federation.flower.app import keep_own_tensors, with_own_tensors

        result = train_round(with_own_tensors(global_weights, setup, ctx, setup.round - 1), setup,
                             pack_of(ctx), env=env_of(ctx))
        keep_own_tensors(result, setup, ctx)
        delta = flatten(result.weights, manifest) - global_vector.astype(np.float64)
        metrics = dict(result.metrics, secagg_clipped=int(np.count_nonzero(np.abs(delta) > bound)))
        weight = 1 if setup.dp_clip else int(result.num_samples)   # DP-FedAvg: every client weighs 1
        from nfed.runs.packs import describe_pack

        metrics["district"] = describe_pack(pack_of(ctx))["district"]
        fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([delta]), weight,
                        {METRICS_KEY: strict_json.dumps(metrics, sort_keys=True)})
        return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)

    return secaggplus_mod(message, context, train)


# ------------------------------------------------------------------------------------------ ServerApp side

class AuditingGrid:
    """The server's grid, counting what every reply carries: ArrayRecord bytes (an update in clear) and
    masked vectors. The workflow sees the same replies."""

    def __init__(self, grid):
        self.grid = grid
        self.array_bytes = 0
        self.masked_vectors = 0
        self.replies = 0

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            self.replies += 1
            if reply.has_error():
                continue
            self.array_bytes += sum(len(array.data) for record in reply.content.array_records.values()
                                    for array in record.values())
            configs = reply.content.config_records.get(RECORD_KEY_CONFIGS, {})
            self.masked_vectors += int(SecAggKey.MASKED_PARAMETERS in configs)
        return replies


class _OneRound(Strategy):
    """The legacy strategy SecAggPlusWorkflow asks: nfed's FitIns per node in, the aggregate out."""

    def __init__(self, fit_ins: Mapping[int, FitIns], grid):
        self.fit_ins = dict(fit_ins)
        self.grid = grid
        self.aggregate = None
        self.results: list = []

    def configure_fit(self, server_round, parameters, client_manager):
        return [(GridClientProxy(node, self.grid, 0), fit_ins) for node, fit_ins in self.fit_ins.items()]

    def aggregate_fit(self, server_round, results, failures):
        self.results = list(results)
        self.aggregate = results[0][1].parameters if results else None
        return self.aggregate, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class _Workflow(SecAggPlusWorkflow):
    """SecAggPlusWorkflow that forgets nodes gone before they shared their keys, and says when the masked
    vectors (the training) are requested.

    flwr 1.42 keeps a node that never answered the setup or key-sharing stage among the sampled nodes: the
    unmask stage then asks the others for key shares they never received and the round halts. Such a node is
    in no one's masks, so it is dropped from the sampled nodes and from every neighbourhood; a node that leaves
    later (while training) is still recovered by the protocol from the others' shares."""

    def __init__(self, *args, echo: Callable[[str], None], **kwargs):
        super().__init__(*args, **kwargs)
        self.echo = echo

    def setup_stage(self, grid, context, state):
        return super().setup_stage(grid, context, state) and self._forget_silent(state)

    def share_keys_stage(self, grid, context, state):
        return super().share_keys_stage(grid, context, state) and self._forget_silent(state)

    def _forget_silent(self, state) -> bool:
        active = set(state.active_node_ids)
        gone = state.sampled_node_ids - active
        if gone:
            state.sampled_node_ids = active
            state.nid_to_neighbours = {node: neighbours & active for node, neighbours in state.nid_to_neighbours.items()
                                       if node in active}
            self.echo(f"secure aggregation: {len(gone)} node(s) left before sharing their keys")
        return self._check_threshold(state)

    def collect_masked_vectors_stage(self, grid, context, state):
        self.echo(f"secure aggregation: {len(state.active_node_ids)} node(s) train and send masked updates")
        return super().collect_masked_vectors_stage(grid, context, state)


def secure_round(grid, nodes: Mapping[str, int], global_weights: Mapping[str, np.ndarray],
                 tasks: Sequence[ClientTask], *, timeout: float | None, bound: float, expected_weight: Mapping,
                 echo: Callable[[str], None]) -> tuple[list[ClientOutcome], SecureAggregate]:
    """One round of training under SecAgg+: the outcomes and what the protocol revealed (the weighted mean
    delta, or None with the reason: the protocol halted, or a node weighed itself other than expected)."""
    manifest = manifest_of(global_weights)
    tensors = [ndarray_to_bytes(flatten(global_weights, manifest, np.float32))]
    fit_ins = {}
    for task in tasks:
        config = {SETUP_KEY: strict_json.dumps(task.setup.to_dict(), sort_keys=True),
                  MANIFEST_KEY: json.dumps(manifest), RANGE_KEY: float(bound)}
        fit_ins[nodes[task.district]] = FitIns(Parameters(tensors, "numpy.ndarray"), config)
    audited = AuditingGrid(grid)
    strategy = _OneRound(fit_ins, audited)
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            config=ServerConfig(num_rounds=1), strategy=strategy, client_manager=SimpleClientManager())
    round_number = tasks[0].setup.round if tasks else 0
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: round_number})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    problem = None
    if len(fit_ins) < 2:
        problem = "secure aggregation needs at least 2 clients in a round"
    else:
        workflow = _Workflow(1.0, RECONSTRUCTION_THRESHOLD, timeout=timeout, echo=echo,
                                       max_weight=float(max(expected_weight[t.district] for t in tasks)),
                                       clipping_range=float(bound), quantization_range=QUANTISATION_RANGE,
                                       modulus_range=MODULUS_RANGE)
        workflow(audited, context)
        if strategy.aggregate is None:
            problem = "secure aggregation halted (too few nodes answered to unmask the sum)"
    district_of = {node: district for district, node in nodes.items()}
    answered = {district_of[proxy.node_id]: fitres for proxy, fitres in strategy.results}
    outcomes = []
    for task in tasks:
        fitres = answered.get(task.district)
        if fitres is None:
            outcomes.append(ClientOutcome(task.district, "late" if problem is None else "failed",
                                          float(timeout or 0.0), reason=problem or "dropped out of the round"))
            continue
        try:
            metrics = clean_metrics(strict_json.loads(str(fitres.metrics.get(METRICS_KEY, "{}"))))
        except ValueError as exc:
            metrics = {"metrics_problem": one_line(exc)[:100]}
        weight = int(fitres.num_examples)
        outcomes.append(ClientOutcome(task.district, "ok", float(metrics.get("wall_time_s", 0.0)),
                                      result=ClientResult({}, weight, metrics)))
        if weight != expected_weight[task.district] and problem is None:
            problem = (f"secure aggregate discarded: {task.district} weighed itself {weight}, "
                       f"expected {expected_weight[task.district]}")
    notes = {"individual_array_bytes": audited.array_bytes, "masked_vectors": audited.masked_vectors,
             "replies": audited.replies}
    if problem is not None:
        return outcomes, SecureAggregate(None, notes=notes, problem=problem)
    clients = [task.district for task in tasks if task.district in answered]
    mean = bytes_to_ndarray(strategy.aggregate.tensors[0]).astype(np.float64)
    total = float(sum(int(answered[d].num_examples) for d in clients))
    return outcomes, SecureAggregate(unflatten(mean, manifest), total, clients, notes)
