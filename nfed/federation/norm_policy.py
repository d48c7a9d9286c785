"""Which tensors a district shares with the federation: the norm policy (districts whose images differ in look).

- shared: every tensor, BatchNorm included, is averaged (the study's FedAvg);
- fedbn: every BatchNorm scale, shift and running statistic stays with its district, never sent, never averaged
  (Li et al., "FedBN", ICLR 2021);
- silobn: BatchNorm running statistics stay with the district, scale and shift are averaged (Andreux et al.,
  "Siloed federated learning for multi-centric histopathology", 2020).

By name: a BatchNorm tensor is `<module>.bn<K>.<weight|bias|running_mean|running_var>`. The server's model holds
every name, but only the shared ones are aggregated and compared by the stop rules; a district trains and is scored
with merge(global shared, its own local), and the global model's local tensors keep their initial values.
"""
from __future__ import annotations

import re
from typing import Mapping

from nfed.federation.aggregator import is_statistic

NORM_POLICIES = ("shared", "fedbn", "silobn")
NORM_POLICY_KEY = "norm_policy"   # in a round's set-up: which part of the update a DP client clips

_BATCHNORM = re.compile(r"(^|\.)bn\d+\.(weight|bias|running_mean|running_var)$")


def is_local(name: str, policy: str) -> bool:
    """True for a tensor that stays with its district under `policy`."""
    if policy == "shared" or not _BATCHNORM.search(name):
        return False
    return policy == "fedbn" or is_statistic(name)


def split(weights: Mapping[str, object], policy: str) -> tuple[dict, dict]:
    """(shared, local): what travels and is averaged, and what stays with the district."""
    shared, local = {}, {}
    for name, value in weights.items():
        (local if is_local(name, policy) else shared)[name] = value
    return shared, local


def merge(shared: Mapping[str, object], local: Mapping[str, object] | None) -> dict:
    """The district's model: the shared tensors with its own local ones in place (None: the shared as they are)."""
    return {**shared, **(local or {})}


def shared_bytes(weights: Mapping[str, object], policy: str) -> int:
    """Bytes of the tensors one client sends per round under `policy`."""
    return sum(int(value.nbytes) for name, value in weights.items() if not is_local(name, policy))
