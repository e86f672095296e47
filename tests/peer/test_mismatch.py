"""Peers blocked in different collectives get a typed error at once, not a timeout
(docs/protocol.md, "Mismatched collectives"). Real peer processes around an
in-process master; every call is given 20 s, so a mismatch that is not detected
shows as an elapsed time far over the 1 s bar."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from peer_workers import Cluster, checksum, make_input

import pccl_py as pccl

pytestmark = pytest.mark.timeout(180)

N = 10_000
CALLS: dict[str, dict[str, Any]] = {
    "all_reduce": {"cmd": "all_reduce", "n": N, "coef": 1.0, "timeout": 20.0},
    "sync": {"cmd": "sync", "n": 1000, "timeout": 20.0},
    "update_topology": {"cmd": "update_topology", "timeout": 20.0},
    "pending": {"cmd": "pending_once", "timeout": 20.0},
}
NAMES = {"all_reduce": "all_reduce(", "sync": "sync_shared_state()", "update_topology": "update_topology()",
         "pending": "pending_peers()"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with pccl.Master() as master, Cluster(master.address) as c:
        c.form([0, 1, 2])
        yield c


def matched_all_reduce_is_exact(cluster: Cluster, peers: list[int]) -> None:
    r = cluster.call({i: {"cmd": "all_reduce", "n": N, "coef": 1.0 + i, "timeout": 20.0} for i in peers})
    expected = checksum(make_input(N, sum(1.0 + i for i in peers)))
    for rec in r.values():
        assert rec["ok"] and rec["world"] == len(peers) and rec["crc"] == expected, rec


@pytest.mark.parametrize(
    "calls",
    [
        ("all_reduce", "sync", "sync"),
        ("update_topology", "sync", "sync"),
        ("update_topology", "all_reduce", "all_reduce"),
        ("pending", "all_reduce", "update_topology"),
    ],
    ids=lambda c: "-".join(c),
)
def test_mismatched_calls_fail_everywhere_within_a_second(cluster: Cluster, calls: tuple[str, ...]) -> None:
    commands = {i: dict(CALLS[call]) for i, call in enumerate(calls)}
    for i, cmd in commands.items():
        if cmd["cmd"] == "all_reduce":
            cmd["coef"] = 1.0 + i
    results = cluster.call(commands, timeout=60)
    print("mismatch", "-".join(calls), "elapsed", [round(results[i].get("elapsed", -1), 3) for i in sorted(results)])
    for i, rec in results.items():
        assert not rec["ok"] and rec["error"] == "CollectiveMismatch", rec
        assert rec["elapsed"] < 1.0, rec
        for call in set(calls):
            assert NAMES[call] in rec["message"], rec["message"]
        if calls[i] == "all_reduce":
            assert rec["intact"], rec  # the input is the caller's, ready for a retry
    assert results[0]["world_now"] == 3
    # The group stays usable: matched calls succeed, exactly.
    matched_all_reduce_is_exact(cluster, [0, 1, 2])
    votes = cluster.call({i: {"cmd": "update_topology"} for i in range(3)})
    assert all(rec["ok"] for rec in votes.values()), votes
    matched_all_reduce_is_exact(cluster, [0, 1, 2])


def test_a_peer_that_waits_on_an_async_all_reduce_the_others_also_run_is_no_mismatch(cluster: Cluster) -> None:
    """Peer 0 waits on all_reduce_async handles; 1 and 2 run the same ops blocking: all
    of them are one collective (in flight everywhere), so they complete."""
    r = cluster.call(
        {
            0: {"cmd": "async_tags", "n": N, "tags": [[5, 1.0], [6, 2.0]]},
            1: {"cmd": "async_tags", "n": N, "tags": [[5, 3.0], [6, 4.0]]},
            2: {"cmd": "async_tags", "n": N, "tags": [[5, 5.0], [6, 6.0]]},
        }
    )
    assert all(rec["ok"] for rec in r.values()), r
