"""Flower (flwr 1.42): the ServerApp and ClientApp (app), the message format (messages), the exchange of one
batch of messages (exchange), the transport the federation server drives (transport), secure aggregation under
SecAgg+ (secagg), the run config (config), the app folder `nfed flower-app` writes (appdir) and the Fleet gateway
that is a SuperLink's one public door (gateway).

The rest of nfed.federation never imports this package (Flower is an optional extra); it may import the layers
below and nfed.federation. Only app, exchange, messages, secagg and transport import flwr: config, appdir and
gateway load without it.

App folders written before this package existed name `nfed.federation.flower:server_app` and `...:client_app`;
those names are this package's (imported from app when first read), so such a folder still runs.
"""
from __future__ import annotations

import importlib

# Flower checks an app folder's object references by reading this file (an assignment or __all__ must name them)
__all__ = ["server_app", "client_app"]


def __getattr__(name: str):
    """server_app / client_app of app folders written before the package: nfed.federation.flower.app's."""
    if name in __all__:
        return getattr(importlib.import_module("nfed.federation.flower.app"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
