"""Choosing the direct reduce-scatter + all-gather (Config.rsag_min_bytes,
pccl_py.peer.allreduce.choose_algorithm) and running it through the Communicator:
above the direct limit, ops of at least rsag_min_bytes go rsag, every peer agrees and
holds the exact result; a peer configured differently makes the op fail with
ProtocolError on every peer, inputs intact."""

from __future__ import annotations

import time

import numpy as np
import pytest
from threads import run_parallel

import pccl_py as pccl
from pccl_py import _native
from pccl_py.errors import ConfigError, ProtocolError
from pccl_py.peer.allreduce import choose_algorithm
from pccl_py.testing import join_group

pytestmark = pytest.mark.timeout(180)

DIRECT = _native.AllReduceAlgorithm.DIRECT
RSAG = _native.AllReduceAlgorithm.DIRECT_RSAG
RING = _native.AllReduceAlgorithm.RING
FAST = pccl.Config(heartbeat_interval=0.1, heartbeat_timeout=1.0, rsag_min_bytes=0)  # off unless a test turns it on
# A master that allows rsag at any round trip (on loopback it would keep to the ring).
ANY_RTT = FAST.replace(rsag_min_rtt=0.0)


@pytest.mark.parametrize(
    ("nbytes", "world", "direct_max", "rsag_min", "want"),
    [
        (1 << 20, 4, 256 << 10, 0, RING),  # off by default
        (1 << 20, 4, 256 << 10, 1 << 20, RSAG),  # exactly at the threshold
        ((1 << 20) - 4, 4, 256 << 10, 1 << 20, RING),
        (1024, 4, 256 << 10, 4, DIRECT),  # the direct limit comes first
        (1024, 4, 0, 4, RSAG),  # direct off: rsag for everything
        (64 << 20, 8, 256 << 10, 4, RSAG),
        (64 << 20, 1, 256 << 10, 4, RING),  # alone: nothing to exchange
    ],
)
def test_choose_algorithm(nbytes: int, world: int, direct_max: int, rsag_min: int,
                          want: _native.AllReduceAlgorithm) -> None:
    assert choose_algorithm(nbytes, world, direct_max, rsag_min) == want


def test_a_negative_threshold_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        pccl.Config(rsag_min_bytes=-1)


def _group(master: pccl.Master, configs: list[pccl.Config]) -> list[pccl.Communicator]:
    comms = [pccl.Communicator(master.address, config=c) for c in configs]
    results = run_parallel([lambda c=c: join_group(c.connect(timeout=20), len(comms), 20) for c in comms])
    for r in results:
        assert not isinstance(r, BaseException), results
    return comms


def test_large_ops_go_rsag_small_ones_direct_with_exact_results() -> None:
    """Three peers with rsag from 256 KiB: 10001 float32 go direct, 100001 (400 KB) and
    an odd 65537 float64 rsag, in place and out of place; exact everywhere."""
    config = FAST.replace(rsag_min_bytes=256 << 10)
    with pccl.Master(config=ANY_RTT) as master:
        comms = _group(master, [config] * 3)
        try:
            for count, algo in ((10_001, "direct"), (100_001, "direct_rsag")):
                xs = [np.arange(count, dtype=np.float32) * (i + 1) for i in range(3)]
                infos = run_parallel([lambda c=comms[i], x=xs[i]: c.all_reduce(x, timeout=30) for i in range(3)])
                for info in infos:
                    assert isinstance(info, pccl.ReduceInfo), infos
                    assert (info.algorithm, info.world_size) == (algo, 3), (count, infos)
                for x in xs:
                    np.testing.assert_array_equal(x, np.arange(count, dtype=np.float32) * 6)
            xs = [np.full(65_537, float(i + 1), np.float64) for i in range(3)]
            outs = [np.zeros_like(x) for x in xs]
            infos = run_parallel(
                [
                    lambda c=comms[i], x=xs[i], o=outs[i]: c.all_reduce(x, op=pccl.ReduceOp.AVG, out=o, timeout=30)
                    for i in range(3)
                ]
            )
            assert all(isinstance(r, pccl.ReduceInfo) and r.algorithm == "direct_rsag" for r in infos), infos
            for out in outs:
                np.testing.assert_array_equal(out, np.full(65_537, 2.0))
            assert [x[0] for x in xs] == [1.0, 2.0, 3.0]
        finally:
            for c in comms:
                c.close()


def test_peers_configured_differently_fail_with_protocol_error_and_intact_inputs() -> None:
    """One peer leaves rsag off (the ring) where the others run rsag: every peer raises
    ProtocolError, fast, inputs intact; ops both choose alike still work."""
    config = FAST.replace(rsag_min_bytes=256 << 10)
    with pccl.Master(config=ANY_RTT) as master:
        comms = _group(master, [config, config, FAST])
        try:
            xs = [np.full(200_001, float(i + 1), np.float32) for i in range(3)]
            start = time.monotonic()
            results = run_parallel([lambda i=i: comms[i].all_reduce(xs[i], timeout=20) for i in range(3)])
            for r in results:
                assert isinstance(r, ProtocolError), results
            assert time.monotonic() - start < 10, "the mismatch was found only by a timeout"
            for i, x in enumerate(xs):
                np.testing.assert_array_equal(x, np.full(200_001, float(i + 1), np.float32))
            small = [np.full(1000, float(i + 1), np.float32) for i in range(3)]  # direct for all three
            infos = run_parallel([lambda i=i: comms[i].all_reduce(small[i], timeout=30) for i in range(3)])
            assert all(isinstance(r, pccl.ReduceInfo) and r.algorithm == "direct" for r in infos), infos
            for s in small:
                np.testing.assert_array_equal(s, np.full(1000, 6.0, np.float32))
        finally:
            for c in comms:
                c.close()


@pytest.mark.parametrize(("master_min_rtt", "want"), [(None, "ring"), (0.0, "direct_rsag")])
def test_the_master_keeps_loopback_groups_on_the_ring(master_min_rtt: float | None, want: str) -> None:
    """Peers that would run rsag above the direct limit (Config's default) run the ring
    when the master measured loopback round trips (Config.rsag_min_rtt, 2 ms by default)
    and rsag when the master allows it at any round trip; every peer alike, exact."""
    peer_config = pccl.Config(heartbeat_interval=0.1, heartbeat_timeout=1.0)  # rsag_min_bytes: the default
    master_config = peer_config if master_min_rtt is None else peer_config.replace(rsag_min_rtt=master_min_rtt)
    with pccl.Master(config=master_config) as master:
        comms = _group(master, [peer_config] * 3)
        try:
            xs = [np.full(300_001, float(i + 1), np.float32) for i in range(3)]  # 1.2 MB: above the direct limit
            infos = run_parallel([lambda i=i: comms[i].all_reduce(xs[i], timeout=30) for i in range(3)])
            assert [getattr(r, "algorithm", r) for r in infos] == [want] * 3, infos
            for x in xs:
                np.testing.assert_array_equal(x, np.full(300_001, 6.0, np.float32))
        finally:
            for c in comms:
                c.close()

