"""Federated learning: the client, the aggregators (FedAvg and the robust ones), privacy (DP-FedAvg, secure
aggregation), attack simulation, the in-process server (options: config, runners, resume checks, round records,
the round loop: server), worker processes, and Flower (the package nfed.federation.flower: the app, its messages,
exchange, transport, secure aggregation, run config, the app folder `nfed flower-app` writes, and the Fleet gateway
that is a SuperLink's one public door; nothing else here imports it).

May import every lower layer: nfed.common, nfed.gpu, nfed.core, nfed.model, nfed.data, nfed.runs, nfed.training.
"""

# FederationConfig's fields declare the ranges of the federation's numbers (LIMITS["rounds"], ["eps"], ...), which
# the stop rules, server optimisers and clients check: they are known once any federation module is imported.
from nfed.federation import config  # noqa: F401
