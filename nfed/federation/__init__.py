"""Federated learning: the client, the aggregators (FedAvg and the robust ones), privacy (DP-FedAvg, secure
aggregation), attack simulation, the in-process server with its round loop, worker processes, and Flower.

May import every lower layer: nfed.common, nfed.gpu, nfed.core, nfed.model, nfed.data, nfed.runs, nfed.training.
"""
