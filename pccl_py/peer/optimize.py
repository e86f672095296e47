"""optimize_topology(), mixed into the Communicator: probe rounds the master schedules
(each peer serves a probe buffer and measures the pairs it is given), then the new
ring in a new epoch."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from pccl_py.errors import (
    CollectiveMismatch,
    PcclError,
)
from pccl_py.peer.contract import PeerCore
from pccl_py.peer.probe import measure_bandwidth
from pccl_py.wire import protocol

log = logging.getLogger(__name__)


class OptimizeCalls:
    def optimize_topology(self: PeerCore, timeout: float | None = None) -> None:
        """Collective of the admitted peers: reorders the ring by measured bandwidth.

        When every admitted peer has called it, the master has the peers measure the
        directed pairs it has no fresh measurement of (Config.bandwidth_ttl), peer to
        peer, in rounds where each peer sends and receives at most one probe
        (Config.probe_bytes each), then solves the ring whose slowest hop is fastest
        (pccl_py.topology) and moves the group to a new epoch with it (reason
        "optimized"). Returns once this peer is on the new ring. Pending peers stay
        pending (admit them with update_topology()).

        A peer that fails meanwhile is evicted as usual and the call completes with
        the survivors; a probe that fails leaves its pair unmeasured. Raises Timeout
        (default: config.op_timeout) and Aborted (this peer evicted or closed)."""
        control = self._require()
        engine = self._engine
        assert engine is not None
        deadline = self._deadline(timeout, self.config.op_timeout)
        self._fresh = False
        self._end_warmup()  # the probes are fetches of their own
        session = self._session
        mismatches = session.mismatches()
        probe_buffer = np.zeros(self.config.probe_bytes, np.uint8)  # its content is irrelevant
        exposure = engine.expose_state([probe_buffer])  # served before anyone is told to probe
        probes = 0
        try:
            rounds = session.vote_rounds()
            session.reset_probe()
            control.send(
                protocol.make("optimize", epoch=self.epoch, exposure=exposure.id, probe_bytes=probe_buffer.nbytes)
            )
            handled = 0

            def next_step() -> protocol.Message | bool | None:
                if session.vote_rounds() > rounds:
                    return True
                return session.probe_after(handled)

            while True:
                try:
                    step = session.wait(
                        next_step,
                        deadline,
                        "the topology optimisation",
                        mismatches=mismatches,
                        on_slow=lambda: self._report_blocked("optimize_topology"),
                    )
                except CollectiveMismatch:
                    self._start_round()
                    raise
                if step is True:
                    break
                assert isinstance(step, dict)
                handled = step["round"]
                results: list[list[Any]] = []
                for sender, host, port, exp, nbytes in step["fetch"]:
                    limit = min(self.config.probe_timeout, max(0.0, deadline - time.monotonic()))
                    try:
                        rate = measure_bandwidth(engine, int(sender), str(host), int(port), int(exp), int(nbytes), limit)
                    except PcclError as exc:
                        log.warning("bandwidth probe of peer %d failed: %s", sender, exc)
                        rate = 0.0
                    probes += 1
                    results.append([int(sender), rate])
                control.send(protocol.make("probe_done", round=handled, results=results))
        finally:
            exposure.close()
        self._start_round()
        self._ensure_ring(deadline)
        self._events.emit("optimized", epoch=self.epoch, probes=probes)
