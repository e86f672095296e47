"""Pools opened ahead of a join (Config.prepare_joins), with real peer processes: while
the master waits for the members' vote, the newcomer opens its pools to the members
(the ring named in its welcome) and every member opens one to the newcomer (the
master's "joining"). The epoch that admits it keeps all of them: neither the members'
update_topology() nor the first all-reduce over the new ring opens a connection, and
the joiner's connect() opens none beyond the prepared ones. With prepare_joins=False
the same join opens them in the admitting epoch. Counted (the engines' counters), not
timed; the all-reduces are checked exactly."""

from __future__ import annotations

import time
from typing import Any

import pytest
from peer_workers import Cluster, checksum, make_input

import pccl_py as pccl

pytestmark = pytest.mark.timeout(180)

N = 50_001


def stats(cluster: Cluster, indices: list[int]) -> dict[int, dict[str, Any]]:
    r = cluster.call({i: {"cmd": "stats"} for i in indices})
    assert all(rec["ok"] for rec in r.values()), r
    return r


def reduce_exactly(cluster: Cluster, coefs: dict[int, float]) -> None:
    r = cluster.call(
        {i: {"cmd": "all_reduce", "n": N, "coef": c, "timeout": 20.0} for i, c in coefs.items()}, 60
    )
    want = checksum(make_input(N, sum(coefs.values()), "float32"))
    for rec in r.values():
        assert rec["ok"] and rec["world"] == len(coefs) and rec["crc"] == want, rec


@pytest.mark.parametrize("prepare", [True, False], ids=["prepared", "not_prepared"])
def test_the_admitting_epoch_keeps_the_pools_opened_while_the_joiner_waited(prepare: bool) -> None:
    config = {"prepare_joins": prepare, "connections_per_peer": 2}
    with pccl.Master() as master, Cluster(master.address) as cluster:
        cluster.form([0, 1], config=config)
        reduce_exactly(cluster, {0: 1.0, 1: 2.0})  # the members' pools to each other
        before = stats(cluster, [0, 1])
        cluster.start(2, config=config)  # waits in connect() for the members' vote
        if prepare:  # each member opens its pool to the newcomer while it waits
            until = time.monotonic() + 30
            while True:
                now = stats(cluster, [0, 1])
                if all(now[i]["opened"] == before[i]["opened"] + 2 for i in (0, 1)):
                    break
                assert time.monotonic() < until, (before, now)
                time.sleep(0.05)
        else:
            time.sleep(1.0)  # time enough to open anything: nothing is
            now = stats(cluster, [0, 1])
            assert [now[i]["opened"] for i in (0, 1)] == [before[i]["opened"] for i in (0, 1)], (before, now)
        prepared = stats(cluster, [0, 1])
        upd = cluster.call({0: {"cmd": "update_topology"}, 1: {"cmd": "update_topology"}})
        assert all(rec["ok"] and rec["world_now"] == 3 for rec in upd.values()), upd
        joined = cluster.connected([2], timeout=30)[2]
        assert joined["world_now"] == 3
        reduce_exactly(cluster, {0: 1.0, 1: 2.0, 2: 4.0})
        after = stats(cluster, [0, 1, 2])
        assert after[2]["opened"] == 4, after  # a pool of 2 to each member, either way
        for i in (0, 1):
            opened = after[i]["opened"] - prepared[i]["opened"]
            kept = after[i]["kept"] - prepared[i]["kept"]
            if prepare:
                assert opened == 0, (prepared, after)  # the pool to the joiner was kept
                assert kept == 4, (prepared, after)  # and the one to the other member
            else:
                assert opened == 2, (prepared, after)  # the pool to the joiner, now
                assert kept == 2, (prepared, after)
            assert after[i]["padding"] == 0  # loopback: a round trip too short to warm
        # The joiner kept its prepared pools too: connect() opened nothing more.
        assert after[2]["kept"] == (4 if prepare else 0), after
