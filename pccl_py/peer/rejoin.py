"""Master restart, mixed into the Communicator: what the control channel's rejoin
thread runs when a new master incarnation answers. The peer registers with the new
master as a member of its group and hands it what it needs to take the group over."""

from __future__ import annotations

import logging
import time

from pccl_py.errors import (
    PcclError,
)
from pccl_py.peer import transport
from pccl_py.peer.contract import PeerCore
from pccl_py.wire import protocol

log = logging.getLogger(__name__)


class RejoinCalls:
    def _rejoin_restarted_master(self: PeerCore) -> None:
        """Control's rejoin thread: the master restarted; register with the new one as a
        member of our group, with what it needs to take the group over (epoch, ring, op
        round, last synced revision, ops awaiting a verdict, verdicts received)."""
        control = self._control
        engine = self._engine
        if control is None or engine is None or self._closed:
            return
        try:
            if self._secret is not None:
                control.authenticate(self._secret, time.monotonic() + self.config.connect_timeout)
            state = self._session.rejoin_state()
            topo = state.topology
            if topo is None or topo.rank_of(self.peer_id) is None:
                # Not admitted yet: register again; admission goes on as before.
                hello = protocol.make(
                    "hello", peer_id=self.peer_id, group=self._group, host=self._advertise,
                    port=engine.port, name=self._name,
                )
                self._session.stop_recovering()
                control.send(hello)
                control.send(transport.report(engine))
                return
            rejoin = protocol.make(
                "rejoin",
                peer_id=self.peer_id,
                group=self._group,
                host=self._advertise,
                port=engine.port,
                name=self._name,
                epoch=topo.epoch,
                ring=[p[0] for p in topo.ring],
                round=state.round,
                revision=-1 if state.revision is None else state.revision,
                pending=state.pending,
                decided=state.decided,
                waiting=state.waiting,
                answered=state.answered,
                rsag=topo.rsag,
            )
            control.send(rejoin)
            control.send(transport.report(engine))
            self._events.emit("rejoin", peer=self.peer_id, epoch=topo.epoch, pending=len(state.pending))
        except PcclError as exc:
            log.error("cannot rejoin the restarted master: %s", exc)
            self._session.mark_evicted(f"could not rejoin the restarted master: {exc}")
