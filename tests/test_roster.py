"""nfed.federation.roster: which SuperNode serves which district as nodes come, go, restart, duplicate or were not
planned."""
from __future__ import annotations

import pytest

from nfed.common.errors import ConfigError
from nfed.federation.roster import Roster, parse_allow_list


def claim(district, fingerprint="sha256:a", tile=64, train=4):
    return {"district": district, "tile": tile, "samples": {"train": train, "val": 2, "test": 2},
            "fingerprint": fingerprint}


def served(roster):
    return {district: node.node_id for district, node in roster.serving.items()}


def test_allow_list_refuses_outsiders_and_keeps_a_same_pack_duplicate_as_standby():
    lines = []
    roster = Roster(["Jung-gu", "Mapo-gu", "Gangnam-gu"], echo=lines.append)
    roster.admit({1: claim("Jung-gu"), 2: claim("Seocho-gu"), 3: claim("Jung-gu"), 4: "pack not found"})
    assert served(roster) == {"Jung-gu": 1}
    assert "allow-list" in roster.refused[2] and roster.refused[4] == "pack not found"
    assert [n.node_id for n in roster.standby["Jung-gu"]] == [3]
    assert any("SuperNode 3 (Jung-gu) refused for now: a duplicate of SuperNode 1" in line for line in lines)
    assert roster.missing() == ["Mapo-gu", "Gangnam-gu"]
    assert roster.start() == ["Gangnam-gu", "Mapo-gu", "Jung-gu"]     # the study's table order
    assert roster.known() == {1, 2, 3, 4}


def test_claims_with_different_packs_keep_the_first_listed_and_later_ones_must_match_the_started_pack():
    roster = Roster(echo=lambda line: None)
    # listed at the same time: none can be told from the other: contested, asked again (not refused for good)
    roster.admit({1: claim("Jung-gu", "sha256:a"), 2: claim("Jung-gu", "sha256:b"), 3: claim("Mapo-gu")})
    assert served(roster) == {"Mapo-gu": 3}
    assert 1 not in roster.known() and 2 not in roster.known()
    assert "different packs" in roster.contested["Jung-gu"] and "different packs" in roster.why_unserved("Jung-gu")
    # the impostor listed after the district's node: the first one serves, the impostor is refused
    roster.admit({1: claim("Jung-gu", "sha256:a"), 2: claim("Jung-gu", "sha256:b")}, first_seen={1: 1, 2: 2, 3: 1})
    assert served(roster) == {"Mapo-gu": 3, "Jung-gu": 1} and roster.contested == {}
    assert "another pack than SuperNode 1, which connected first" in roster.refused[2]
    roster.forget_offline({2, 3})                                       # Jung-gu's node left: nobody serves it
    roster.admit({1: claim("Jung-gu", "sha256:a")}, first_seen={1: 5, 2: 2, 3: 1})
    assert served(roster) == {"Mapo-gu": 3, "Jung-gu": 1}              # back with its pack; 2 stays refused
    roster.forget_offline({1, 3})
    roster.admit({2: claim("Jung-gu", "sha256:b")})
    assert "not the one the district started the run with" in roster.refused[2]
    roster.forget_offline({3})
    roster.start()
    roster.admit({4: claim("Jung-gu")})
    assert "not one of the 1 this run started with" in roster.refused[4]
    roster.forget_offline({1, 2, 4})                                   # node 3 left
    assert served(roster) == {} and "no longer connected" in roster.why_unserved("Mapo-gu")
    roster.admit({5: claim("Mapo-gu", "sha256:other")})
    assert "not the one the district started the run with" in roster.refused[5]
    roster.admit({6: claim("Mapo-gu", tile=32)})
    assert "tile size 32" in roster.refused[6]
    roster.admit({7: claim("Mapo-gu")})                                # restarted with its pack: serves again
    assert served(roster) == {"Mapo-gu": 7} and "Mapo-gu" not in roster.lost


def test_standby_takes_over_from_a_node_that_is_gone_or_missed_a_round():
    lines = []
    roster = Roster(echo=lines.append)
    roster.admit({1: claim("Jung-gu")})
    roster.start()
    roster.admit({2: claim("Jung-gu")})                                # the restarted node, old id still listed
    assert served(roster) == {"Jung-gu": 1}
    roster.missed("Jung-gu", "no answer within the 30 s deadline")
    assert served(roster) == {"Jung-gu": 2} and [n.node_id for n in roster.standby["Jung-gu"]] == [1]
    assert "SuperNode 2 now serves Jung-gu (no answer within the 30 s deadline)" in lines
    roster.forget_offline({2})                                         # the dead one's heartbeats ran out
    assert roster.standby["Jung-gu"] == [] and served(roster) == {"Jung-gu": 2}
    roster.missed("Jung-gu", "late")                                   # no standby: it keeps serving
    assert served(roster) == {"Jung-gu": 2}
    roster.admit({3: claim("Jung-gu")})
    roster.drop("Jung-gu", 3, "bad evaluation")                       # a standby that broke the protocol
    assert served(roster) == {"Jung-gu": 2} and roster.standby["Jung-gu"] == []
    roster.drop("Jung-gu", 2, "bad reply")
    assert served(roster) == {} and roster.refused == {2: "bad reply", 3: "bad evaluation"}
    assert "SuperNode 2 was left out: bad reply" in roster.why_unserved("Jung-gu")
    roster.forget_offline(set())                                       # refused nodes that left are forgotten
    assert roster.refused == {}


@pytest.mark.parametrize("names, problem", [(["Jung-gu", "Jung-gu"], "named twice"), (["a/b"], "not a district"),
                                             ([" Jung-gu"], "not a district"), (["a,b"], "not a district"),
                                             ([], "names no district"), ([".hidden"], "not a district")])
def test_allow_list_names_are_checked(names, problem):
    with pytest.raises(ConfigError, match=problem):
        parse_allow_list(names, "--districts")
    assert parse_allow_list(["Jung-gu", "Mapo-gu"], "--districts") == ["Jung-gu", "Mapo-gu"]
