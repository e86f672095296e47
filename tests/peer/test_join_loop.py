"""A joiner that runs the same loop as everyone (tests/loop_workers.py) never freezes
the group: its first update_topology() is the vote that admitted it (docs/protocol.md,
"Joining"). Real peer processes around an in-process master; a member is SIGKILLed and
a fresh peer takes its place, as on rented machines that come and go."""

from __future__ import annotations

import multiprocessing as mp
import time
from collections import defaultdict
from typing import Any

import pytest
from loop_workers import user_loop_worker
from peer_workers import Cluster

import pccl_py as pccl

pytestmark = pytest.mark.timeout(240)


def steps_of(history: list[dict[str, Any]], index: int) -> list[dict[str, Any]]:
    return [r for r in history if r.get("index") == index and "step" in r]


def test_a_joiner_running_the_members_loop_takes_part_at_once_and_nobody_stalls() -> None:
    stop = mp.get_context("spawn").Event()
    with pccl.Master() as master, Cluster(master.address, target=user_loop_worker, stop=stop) as cluster:
        # The group forms through the same loop: peers 1-3 join peer 0 one by one.
        cluster.start(0)
        cluster.connected([0])
        for i in (1, 2, 3):
            cluster.start(i)
        connected = cluster.connected([1, 2, 3])
        index_of = {r["peer"]: r["index"] for r in connected.values()}
        index_of[next(r["peer"] for r in cluster.history if r.get("event") == "started" and r["index"] == 0)] = 0

        def all_at(world: int, count: int, since: float) -> Any:
            return lambda h: all(
                sum(1 for r in steps_of(h, i) if r.get("world") == world and r["t_start"] >= since) >= count
                for i in live
            )

        live = [0, 1, 2, 3]
        cluster.collect(all_at(4, 10, 0.0), 60, "ten steps of the group of four")
        formed = time.time()

        cluster.kill(1)
        killed = time.time()
        live = [0, 2, 3]
        cluster.collect(all_at(3, 5, killed), 30, "five steps of the three survivors")

        cluster.start(4)  # a fresh peer, same script
        joined = cluster.connected([4], timeout=60)[4]
        index_of[joined["peer"]] = 4
        live = [0, 2, 3, 4]
        cluster.collect(all_at(4, 10, joined["t"]), 60, "ten steps of the group with the joiner")
        stopped = time.time()
        stop.set()
        cluster.collect(
            lambda h: all(any(r.get("event") == "done" and r["index"] == i for r in h) for i in live), 60, "done"
        )
        history = cluster.history

    # The joiner's first all-reduce with all four, within 2 s of starting its loop.
    first = next(r for r in steps_of(history, 4) if r.get("ok") and r["world"] == 4)
    assert first["t_end"] - joined["t"] <= 2.0, (first, joined)

    stalls, failures, wrong = [], [], []
    by_revision: dict[int, set[int]] = defaultdict(set)
    for i in (0, 2, 3, 4):
        for r in steps_of(history, i):
            if r["t_end"] >= stopped:
                continue  # peers stop one by one: the last steps see the others leave
            if r["t_start"] >= formed and r["t_end"] - r["t_start"] > 1.0:
                stalls.append(r)
            if not r.get("ok"):
                failures.append(r)
                continue
            by_revision[r["revision"]].add(r["state_hash"])
            expected = sum(index_of[p] + 1 for p in r["contributors"])
            if r["value"] != expected or not r["uniform"] or len(r["contributors"]) != r["world"]:
                wrong.append(r)
    longest = max(r["t_end"] - r["t_start"] for i in (0, 2, 3, 4) for r in steps_of(history, i)
                  if formed <= r["t_start"] and r["t_end"] < stopped)
    print(f"joiner: first 4-peer all-reduce {first['t_end'] - joined['t']:.3f}s after its loop began; "
          f"longest step {longest:.3f}s")
    assert not stalls, f"steps that took over 1 s: {stalls}"
    assert not wrong, f"inexact all-reduce results: {wrong}"
    assert all(len(h) == 1 for h in by_revision.values()), "peers at one revision hold different state"
    # Only the kill may fail a call (a sync that was fetching from the killed peer).
    assert all(r["error"] == "PeerLost" and killed <= r["t_end"] <= killed + 1.0 for r in failures), failures


def test_a_graceful_leave_while_the_others_vote_completes_their_vote() -> None:
    with pccl.Master() as master, Cluster(master.address) as cluster:
        cluster.form([0, 1, 2])
        cid = cluster.send({0: {"cmd": "update_topology"}, 1: {"cmd": "update_topology"}})
        time.sleep(0.3)  # both wait for peer 2's vote
        assert cluster.call({2: {"cmd": "close"}})[2]["ok"]
        votes = cluster.results(cid, [0, 1], timeout=10)
        for rec in votes.values():
            assert rec["ok"] and rec["world_now"] == 2, rec
            assert rec["elapsed"] < 1.5, rec
        r = cluster.call({i: {"cmd": "all_reduce", "n": 1000, "coef": 1.0 + i} for i in (0, 1)})
        assert all(rec["ok"] and rec["world"] == 2 for rec in r.values()), r
