"""Which SuperNode serves which district in a Flower run, kept current round by round (no Flower imports here).

SuperNodes come and go: a restarted node registers under a new node id, a killed one stays listed by the
SuperLink until its heartbeats run out (up to a minute), an operator may start a second node for a district or
one for a district nobody planned. Before every round the ServerApp lists the connected nodes and has each new
one describe its pack (nfed.federation.flower.app); the Roster decides what to do with it and logs a reason for
every node it does not use:

- a district outside the allow-list (`--districts`), or, without one, outside the districts the run started
  with, is refused; so is a pack other than the one its district started the run with (sha256), or another
  tile size;
- new nodes that claim one district with different packs are all refused: none of them can be trusted;
- a node for a district that a connected node serves with the same pack is a duplicate: refused for now and
  kept as a standby, which takes over when the serving node is gone or missed a round (most often the standby
  is the restarted node and the serving one its dead predecessor, still listed).
A refused node is not asked again while it stays connected; once the SuperLink no longer lists it, it is
forgotten, so a node that reconnects is described afresh. Nothing here fails the run: a district without a
node is reported by the round (failed: why) and takes part again once a node serves it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from nfed.common.errors import ConfigError
from nfed.common.names import NAME_RULE, printable, safe_name
from nfed.data.districts import district_order_key


def valid_district_name(name) -> bool:
    """A district name a node may claim and a run folder may hold: the one rule of nfed.common.names."""
    return safe_name(name)


def parse_allow_list(names: Iterable[str], source: str) -> list[str]:
    """The districts of an allow-list, checked (ConfigError naming `source` for a bad or repeated name)."""
    allowed: list[str] = []
    for name in names:
        if not safe_name(name):
            raise ConfigError(f"{source}: '{printable(name[:40])}' is not a district name ({NAME_RULE})")
        if name in allowed:
            raise ConfigError(f"{source}: district '{name}' is named twice")
        allowed.append(name)
    if not allowed:
        raise ConfigError(f"{source}: names no district")
    return allowed


def read_allow_list(names: str | None, path: Path | None) -> list[str] | None:
    """The districts of --districts or --districts-file (None when neither is given)."""
    if names is not None and path is not None:
        raise ConfigError("--districts and --districts-file: give one of them")
    if names is not None:
        return parse_allow_list([name.strip() for name in names.split(",") if name.strip()], "--districts")
    if path is None:
        return None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConfigError(f"--districts-file: {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--districts-file: {path} is unreadable ({str(exc)[:120]})") from None
    return parse_allow_list([line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()],
                            f"--districts-file {path}")


@dataclass
class Node:
    """A SuperNode as it described itself: its district, tile size, split sizes and pack hash."""

    node_id: int
    district: str
    tile: int
    samples: dict = field(default_factory=dict)
    fingerprint: str | None = None

    def summary(self) -> str:
        return f"tile {self.tile}, " + ", ".join(f"{split} {n}" for split, n in self.samples.items())


class AnnouncedCounts(Mapping):
    """district -> the training samples its pack announced when its first node joined (live: districts that
    join later appear as they join); the most a round's claim may weigh."""

    def __init__(self, roster: "Roster"):
        self._roster = roster

    def __getitem__(self, district: str) -> int:
        return int(self._roster.reference[district].samples.get("train", 0))

    def __iter__(self):
        return iter(self._roster.reference)

    def __len__(self) -> int:
        return len(self._roster.reference)


class Roster:
    """district -> the SuperNode serving it, with standbys and the refused nodes (see the module docstring)."""

    def __init__(self, allowed: Sequence[str] | None = None, echo: Callable[[str], None] = print):
        self.allowed = list(allowed) if allowed else None
        self.echo = echo
        self.serving: dict[str, Node] = {}
        self.standby: dict[str, list[Node]] = {}
        self.refused: dict[int, str] = {}        # node id -> why it is not used
        self.lost: dict[str, str] = {}           # district -> why no node serves it now
        self.reference: dict[str, Node] = {}     # district -> the node whose pack the district started with
        self.districts: list[str] | None = None  # the run's districts, fixed by start()
        self.tile: int | None = None
        self.contested: dict[str, str] = {}      # district -> why no node serves it (nodes asked again)

    # -- queries
    def known(self) -> set[int]:
        """Node ids already decided on (serving, standby or refused): not to be described again."""
        ids = set(self.refused) | {node.node_id for node in self.serving.values()}
        return ids | {node.node_id for nodes in self.standby.values() for node in nodes}

    def node_of(self, district: str) -> Node | None:
        return self.serving.get(district)

    def why_unserved(self, district: str) -> str:
        return self.lost.get(district, "no SuperNode serves it")

    def missing(self) -> list[str]:
        """Allow-listed districts that no node serves yet."""
        return [d for d in self.allowed or () if d not in self.serving]

    def start(self) -> list[str]:
        """Fix the run's districts (the allow-list, else those served now), in the study's table order."""
        self.districts = sorted(self.allowed or self.serving, key=district_order_key)
        return list(self.districts)

    # -- changes
    def forget_offline(self, online: Iterable[int]) -> None:
        """Nodes the SuperLink no longer lists: a serving one gives way to a standby (or leaves its district
        without a node), standbys and refused ones are forgotten."""
        online = set(online)
        self.refused = {node_id: why for node_id, why in self.refused.items() if node_id in online}
        self.standby = {d: [n for n in nodes if n.node_id in online] for d, nodes in self.standby.items()}
        for district, node in list(self.serving.items()):
            if node.node_id not in online:
                self._replace(district, f"SuperNode {node.node_id} is no longer connected")

    def missed(self, district: str, why: str) -> None:
        """The serving node did not answer: a standby, if there is one, takes over (the node becomes one)."""
        node = self.serving.get(district)
        if node is not None and self.standby.get(district):
            self._replace(district, why)
            self.standby[district].append(node)

    def drop(self, district: str, node_id: int, why: str) -> None:
        """A node of the district broke the protocol: refused while it stays connected; if it was the serving
        one, a standby may take over."""
        if node_id in self.refused:
            return
        self.refused[node_id] = why
        self.standby[district] = [node for node in self.standby.get(district, []) if node.node_id != node_id]
        self.echo(f"SuperNode {node_id} ({district}) left out: {why}")
        node = self.serving.get(district)
        if node is not None and node.node_id == node_id:
            self._replace(district, f"SuperNode {node_id} was left out: {why}")

    def admit(self, claims: Mapping[int, dict | str], first_seen: Mapping[int, int] | None = None) -> None:
        """Decide on newly described nodes: node id -> its checked description, or why it gave none.
        `first_seen`: node id -> when the SuperLink first listed it (a poll count): of nodes that claim one
        district with different packs, the one listed first serves and the later ones are refused."""
        by_district: dict[str, list[Node]] = {}
        self.contested = {}
        for node_id, claim in sorted(claims.items()):
            if isinstance(claim, str):
                self._refuse(node_id, None, claim)
                continue
            node = Node(node_id, claim["district"], claim["tile"], dict(claim["samples"]), claim.get("fingerprint"))
            reason = self._policy(node)
            if reason:
                self._refuse(node_id, node.district, reason)
            else:
                by_district.setdefault(node.district, []).append(node)
        for district, nodes in by_district.items():
            current = self.serving.get(district)
            packs = {node.fingerprint for node in nodes}
            if current is None and len(nodes) > 1 and (len(packs) > 1 or None in packs):
                nodes = self._first_of_contested(district, nodes, first_seen or {})
                if not nodes:
                    continue
            if current is None:
                current = nodes.pop(0)
                self._serve(current)
            for node in nodes:
                self.standby.setdefault(district, []).append(node)
                self.echo(f"SuperNode {node.node_id} ({district}) refused for now: a duplicate of SuperNode "
                          f"{current.node_id}, which serves {district} with the same pack (kept as a standby)")

    def _first_of_contested(self, district: str, nodes: list[Node], first_seen: Mapping[int, int]) -> list[Node]:
        """Nodes that claim an unserved district with different packs: the one the SuperLink listed first is
        kept and the later ones refused as impostors. Listed at the same time, none can be told from the
        other: none serves, the district is contested (its round says so) and they are asked again next round."""
        never = max(first_seen.values(), default=0) + 1
        earliest = min(first_seen.get(node.node_id, never) for node in nodes)
        first = [node for node in nodes if first_seen.get(node.node_id, never) == earliest]
        if len(first) > 1 and (len({node.fingerprint for node in first}) > 1 or None in {n.fingerprint for n in first}):
            ids = ", ".join(str(node.node_id) for node in nodes)
            self.contested[district] = f"SuperNodes {ids} claim it with different packs (none serves it until " \
                                       "the impostor is removed)"
            self.lost[district] = self.contested[district]
            self.echo(f"district {district} contested: {self.contested[district]}")
            return []
        keeper = first[0]
        for node in nodes:
            if node.fingerprint != keeper.fingerprint or node.fingerprint is None and node is not keeper:
                self._refuse(node.node_id, district, f"claims district '{district}' with another pack than "
                                                     f"SuperNode {keeper.node_id}, which connected first")
        return [keeper] + [node for node in nodes if node is not keeper and node.node_id not in self.refused]

    def _policy(self, node: Node) -> str | None:
        """Why a node may not serve its district (None: it may)."""
        if self.allowed is not None and node.district not in self.allowed:
            return f"district '{node.district}' is not in the allow-list (--districts)"
        if self.allowed is None and self.districts is not None and node.district not in self.districts:
            return (f"district '{node.district}' is not one of the {len(self.districts)} this run started with "
                    "(plan the districts with --districts)")
        reference = self.reference.get(node.district)
        if reference is not None and None not in (reference.fingerprint, node.fingerprint) \
                and reference.fingerprint != node.fingerprint:
            return f"its pack of {node.district} is not the one the district started the run with (other sha256)"
        if self.tile is not None and node.tile != self.tile:
            return f"its tile size {node.tile} is not the run's {self.tile}"
        current = self.serving.get(node.district)
        if current is not None and None in (current.fingerprint, node.fingerprint):
            return f"SuperNode {current.node_id} already serves {node.district}"
        return None

    def _serve(self, node: Node) -> None:
        self.serving[node.district] = node
        self.reference.setdefault(node.district, node)
        self.tile = self.tile if self.tile is not None else node.tile
        self.lost.pop(node.district, None)
        self.echo(f"SuperNode {node.node_id}: {node.district} ({node.summary()})")

    def _replace(self, district: str, why: str) -> None:
        self.serving.pop(district, None)
        if self.standby.get(district):
            node = self.standby[district].pop(0)
            self.serving[district] = node
            self.echo(f"SuperNode {node.node_id} now serves {district} ({why})")
        else:
            self.lost[district] = why

    def _refuse(self, node_id: int, district: str | None, why: str) -> None:
        self.refused[node_id] = why
        self.echo(f"SuperNode {node_id}" + (f" ({district})" if district else "") + f" refused: {why}")
