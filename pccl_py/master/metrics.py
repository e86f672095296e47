"""Prometheus metrics of the master: peers, epochs, collective outcomes, recoveries,
shared-state syncs and bytes, authentication failures.

The master feeds every membership log record to `MasterMetrics.observe` (on its event
loop thread); the HTTP endpoint (`serve`) runs prometheus-client's own server thread.
Each Master owns a CollectorRegistry, so several masters in one process do not clash.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class MasterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.peers = Gauge("pccl_peers", "Registered peers by group and phase", ["group", "phase"], registry=r)
        self.epoch = Gauge("pccl_epoch", "Current epoch of each group", ["group"], registry=r)
        self.ring_size = Gauge("pccl_ring_size", "Peers in the current ring of each group", ["group"], registry=r)
        self.joins = Counter("pccl_joins", "Peers that registered", registry=r)
        self.leaves = Counter("pccl_leaves", "Peers that left gracefully", registry=r)
        self.evictions = Counter("pccl_evictions", "Peers evicted (crash, hang, protocol)", ["cause"], registry=r)
        self.epochs = Counter("pccl_epochs", "Epoch changes (new rings)", registry=r)
        self.recoveries = Counter(
            "pccl_recoveries", "Evictions followed by a new ring of the survivors", registry=r
        )
        self.collectives = Counter(
            "pccl_collectives", "Collective outcomes decided by the master", ["result", "error"], registry=r
        )
        self.syncs = Counter("pccl_syncs", "Shared-state synchronisations", ["result"], registry=r)
        self.state_bytes = Counter(
            "pccl_state_transfer_bytes", "Shared-state bytes peers reported receiving", registry=r
        )
        self.auth_failures = Counter(
            "pccl_auth_failures", "Control-plane requests refused for failed authentication", registry=r
        )
        self._peer_series: set[tuple[str, str]] = set()
        self._outcome_series: dict[tuple[bool, str], Any] = {}
        self._recovering: set[Any] = set()  # groups with an eviction not yet followed by a ring
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ feeding

    def observe(self, kind: str, fields: Mapping[str, Any]) -> None:
        """Counts one membership log record (pccl_py.membership.Log)."""
        if kind == "join":
            self.joins.inc()
        elif kind == "leave":
            self.leaves.inc()
        elif kind == "evict":
            self.evictions.labels(cause=str(fields.get("cause", ""))).inc()
            self._recovering.add(fields.get("group"))
        elif kind == "epoch":
            group = fields.get("group")
            self.epochs.inc()
            self.epoch.labels(group=str(group)).set(fields.get("epoch", 0))
            self.ring_size.labels(group=str(group)).set(len(fields.get("ring", ())))
            if group in self._recovering and fields.get("ring"):
                self._recovering.discard(group)
                self.recoveries.inc()
        elif kind == "outcome":
            ok = bool(fields.get("ok"))
            error = str(fields.get("kind", ""))
            series = self._outcome_series.get((ok, error))  # one per collective: skip the label lookup
            if series is None:
                series = self._outcome_series[(ok, error)] = self.collectives.labels(
                    result="ok" if ok else "failed", error=error
                )
            series.inc()
        elif kind == "sync":
            self.syncs.labels(result="ok" if fields.get("ok") else "failed").inc()

    def set_peers(self, status: Mapping[str, Any]) -> None:
        """Sets the peer gauges from Membership.status()."""
        counts: dict[tuple[str, str], int] = {}
        for peer in status.get("peers", {}).values():
            key = (str(peer["group"]), str(peer["phase"]))
            counts[key] = counts.get(key, 0) + 1
        # Zero the series that emptied rather than removing them (a scrape never sees a gap).
        for labels in list(self._peer_series):
            if labels not in counts:
                self.peers.labels(group=labels[0], phase=labels[1]).set(0)
        for (group, phase), n in counts.items():
            self.peers.labels(group=group, phase=phase).set(n)
            self._peer_series.add((group, phase))

    # ------------------------------------------------------------------ serving

    def serve(self, host: str, port: int) -> int:
        """Starts the HTTP endpoint (/metrics) on its own thread; returns the bound port."""
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
