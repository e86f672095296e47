"""Pools opened ahead of a join (Config.prepare_joins), with real peer processes: while
the master waits for the members' vote, the newcomer opens its pools to the members
(the ring named in its welcome) and every member opens one to the newcomer (the
master's "joining"). The epoch that admits it keeps all of them: neither the members'
update_topology() nor the first all-reduce over the new ring opens a connection, and
the joiner's connect() opens none beyond the prepared ones. With prepare_joins=False
the same join opens them in the admitting epoch. Counted (the engines' counters), not
timed; the all-reduces are checked exactly.

The join knock (pccl_py.wire.knock) starts the same ahead of the hello: a datagram to
the master's heartbeat port makes the members open their pools to the address it names,
and the answer names the ring. Checked with a knock sent from here for an engine of
this process (no hello ever), with and without a shared secret."""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest
from peer_workers import Cluster, checksum, make_input

import pccl_py as pccl
from pccl_py import _native
from pccl_py.wire import knock

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


def knock_at(master: pccl.Master, datagram: bytes, wait: float) -> bytes | None:
    """Sends `datagram` to the master's heartbeat port (its control port's number) and
    returns the answer, or None if none comes within `wait` seconds."""
    host, port = master.address.rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(wait)
        s.sendto(datagram, (host, int(port)))
        try:
            return s.recv(65536)
        except TimeoutError:
            return None


@pytest.mark.parametrize("secret", [None, b"knock knock"], ids=["open", "secret"])
def test_a_knock_alone_opens_the_members_pools_to_the_newcomer(secret: bytes | None) -> None:
    config: dict[str, Any] = {"connections_per_peer": 2, "secret": secret}
    with pccl.Master(secret=secret) as master, Cluster(master.address) as cluster:
        members = cluster.form([0, 1], config=config)
        before = stats(cluster, [0, 1])
        newcomer = _native.Engine(peer_id=4242, host="127.0.0.1", port=0, connections_per_peer=2, secret=secret or b"")
        try:
            sent = time.time()
            if secret is not None:  # a knock the master cannot check: no answer, no pools
                unsigned = knock.encode_knock(4242, 0, "127.0.0.1", newcomer.port, sent, None)
                assert knock_at(master, unsigned, 1.0) is None
                assert [stats(cluster, [0, 1])[i]["opened"] for i in (0, 1)] == [before[i]["opened"] for i in (0, 1)]
            datagram = knock.encode_knock(4242, 0, "127.0.0.1", newcomer.port, sent, secret)
            answer = knock_at(master, datagram, 10.0)
            assert answer is not None
            epoch, ring = knock.decode_answer(answer, secret, 4242, sent) or (None, None)
            assert ring is not None and {p[0] for p in ring} == {members[0]["peer"], members[1]["peer"]}
            assert epoch == before[0]["epoch_now"] == before[1]["epoch_now"]
            until = time.monotonic() + 20
            while True:  # each member opened its pool of 2 to the newcomer's engine
                now = stats(cluster, [0, 1])
                if all(now[i]["opened"] == before[i]["opened"] + 2 for i in (0, 1)):
                    break
                assert time.monotonic() < until, (before, now)
                time.sleep(0.05)
            assert knock_at(master, datagram, 1.0) is None  # each id knocks once
        finally:
            newcomer.close()


@pytest.mark.parametrize("datagrams", [True, False], ids=["knocks", "no_datagrams"])
def test_a_joiner_knocks_before_its_hello(tmp_path: Any, datagrams: bool) -> None:
    """A real joiner knocks as it starts to connect (the master hears the knock before
    the hello), unless heartbeat datagrams are off (UDP filtered): then it only says
    hello, and joins all the same."""
    import json

    events = tmp_path / "master.jsonl"
    config = {"heartbeat_datagrams": datagrams}
    with pccl.Master(config=pccl.Config(event_log=str(events))) as master, Cluster(master.address) as cluster:
        cluster.form([0, 1], config=config)
        cluster.start(2, config=config)
        until = time.monotonic() + 30
        while not master.status()["groups"]["0"]["pending"]:  # registered: waits for the vote
            assert time.monotonic() < until
            time.sleep(0.05)
        upd = cluster.call({0: {"cmd": "update_topology"}, 1: {"cmd": "update_topology"}})
        assert all(rec["ok"] and rec["world_now"] == 3 for rec in upd.values()), upd
        joiner = cluster.connected([2], timeout=30)[2]["peer"]
        reduce_exactly(cluster, {0: 1.0, 1: 2.0, 2: 4.0})
    records = [json.loads(line) for line in events.read_text().splitlines()]
    seen = [r["event"] for r in records if r.get("peer") == joiner and r["event"] in ("knock", "join")]
    assert seen == (["knock", "join"] if datagrams else ["join"]), seen
