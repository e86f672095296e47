"""The master's Prometheus endpoint: scraped over HTTP, its counters follow what
happens to the group (joins, collectives, syncs and their bytes, an eviction and the
recovery ring, refused authentication)."""

from __future__ import annotations

import time
import urllib.request

import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from threads import run_parallel

import pccl_py as pccl
from pccl_py.testing import join_group

SECRET = b"metrics test secret"
FAST = pccl.Config(heartbeat_interval=0.1, heartbeat_timeout=1.0)


def scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_endpoint_counts_what_happens() -> None:
    with pccl.Master(secret=SECRET, config=FAST, metrics_port=0) as master:
        assert master.metrics_address is not None
        before = scrape(master.metrics_address)
        assert value(before, "pccl_joins_total") == 0
        assert value(before, "pccl_collectives_total", result="ok", error="") == 0

        comms = [pccl.Communicator(master.address, secret=SECRET, config=FAST) for _ in range(2)]
        try:
            assert run_parallel([lambda c=c: join_group(c.connect(timeout=20), 2, 20) for c in comms]) == [None, None]
            calls = [lambda c=c: c.all_reduce(np.ones(256, np.float32), timeout=20) for c in comms]
            for _ in range(3):
                run_parallel(calls)
            sender = pccl.SharedState({"w": np.arange(1 << 16, dtype=np.float32)}, revision=1)
            receiver = pccl.SharedState({"w": np.zeros(1 << 16, dtype=np.float32)}, revision=0)
            infos = run_parallel([
                lambda: comms[0].sync_shared_state(sender, strategy=pccl.SyncStrategy.SEND_ONLY, timeout=20),
                lambda: comms[1].sync_shared_state(receiver, strategy=pccl.SyncStrategy.RECEIVE_ONLY, timeout=20),
            ])
            assert infos[1].rx_bytes == (1 << 16) * 4

            mid = scrape(master.metrics_address)
            assert value(mid, "pccl_joins_total") == 2
            assert value(mid, "pccl_peers", group="0", phase="admitted") == 2
            # 3 all-reduces, each reported by both peers, decided once.
            assert value(mid, "pccl_collectives_total", result="ok", error="") == 3
            assert value(mid, "pccl_syncs_total", result="ok") == 1
            assert value(mid, "pccl_state_transfer_bytes_total") == (1 << 16) * 4
            assert value(mid, "pccl_epoch", group="0") == comms[0].epoch
            assert value(mid, "pccl_recoveries_total") == 0

            # Peer 1 goes silent (its control channel stops: no heartbeats, as if hung):
            # the master evicts it and re-rings the survivor.
            comms[1]._control.close()
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and comms[0].world_size != 1:
                time.sleep(0.05)
            assert comms[0].world_size == 1
            after = scrape(master.metrics_address)
            assert sum(v for (n, _), v in after.items() if n == "pccl_evictions_total") == 1
            assert value(after, "pccl_recoveries_total") == 1
            assert value(after, "pccl_peers", group="0", phase="admitted") == 1
            assert value(after, "pccl_epoch", group="0") == value(mid, "pccl_epoch", group="0") + 1

            # A refused client is counted.
            intruder = pccl.Communicator(master.address)
            try:
                intruder.connect(timeout=5)
            except pccl.AuthError:
                pass
            finally:
                intruder.close()
            assert value(scrape(master.metrics_address), "pccl_auth_failures_total") == 1
        finally:
            for c in comms:
                c.close()


def test_two_masters_in_one_process_have_separate_metrics() -> None:
    with pccl.Master(metrics_port=0) as a, pccl.Master(metrics_port=0) as b:
        with pccl.Communicator(a.address).connect(timeout=20):
            pass
        assert value(scrape(a.metrics_address), "pccl_joins_total") == 1
        assert value(scrape(b.metrics_address), "pccl_joins_total") == 0
