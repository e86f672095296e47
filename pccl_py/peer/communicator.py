"""Communicator: a peer's handle on its group, the public facade. Synchronous API
(training loops are synchronous) over the peer's Session (what it knows of the master,
pccl_py.peer.session), its control channel (pccl_py.peer.control) and the native
data-plane engine (pccl_py._native). The calls live beside it: attempts (the loop every
data-plane collective runs), allreduce, gather (all-gather, reduce-scatter, broadcast),
sync, optimize and rejoin; membership calls (connect, update_topology, pending_peers,
close) and the ring are here.
"""

from __future__ import annotations

import concurrent.futures
import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any, Self

from pccl_py import _native
from pccl_py.config import Config
from pccl_py.errors import (
    Aborted,
    AuthError,
    CollectiveMismatch,
    ConfigError,
    PcclError,
)
from pccl_py.events import EventLog
from pccl_py.peer import transport
from pccl_py.peer.allreduce import AllReduceCalls, AllReduceHandle
from pccl_py.peer.attempts import AttemptCalls
from pccl_py.peer.control import ControlChannel
from pccl_py.peer.gather import GatherCalls
from pccl_py.peer.optimize import OptimizeCalls
from pccl_py.peer.p2p import P2PHandle, PointToPointCalls
from pccl_py.peer.rejoin import RejoinCalls
from pccl_py.peer.session import OpKey, Session, Topology
from pccl_py.peer.state_fetch import ReceiveWindow, measure_while_warming
from pccl_py.peer.sync import SyncCalls
from pccl_py.wire import auth, knock, protocol

log = logging.getLogger(__name__)

# The most padding one connection sends ahead of a join (Config.join_warmup): enough
# for TCP to leave slow start on a 1 Gbit/s, 300 ms path.
JOIN_WARMUP_BYTES = 128 << 20
# How long opening pools ahead of a join may take (a few round trips on any link): it
# only saves the epoch that needs them the opening; close() waits for it to end.
JOIN_PREPARE_TIMEOUT = 3.0

__all__ = ["AllReduceHandle", "Communicator", "P2PHandle"]


class Communicator(
    AttemptCalls, AllReduceCalls, GatherCalls, SyncCalls, OptimizeCalls, RejoinCalls, PointToPointCalls
):
    """A peer of a group. Create, connect(), run collectives, close().

    `master` is "host:port". `host`/`port` are this peer's data-plane listen address
    (port 0: any free port); `advertise_host` is the address other peers and the
    master use to reach it (defaults to `host`).
    """

    def __init__(
        self,
        master: str,
        group: int = 0,
        secret: str | bytes | None = None,
        *,
        config: Config | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise_host: str | None = None,
        name: str = "",
    ) -> None:
        if group < 0:
            raise ConfigError("group must be >= 0")
        self.config = config or Config()
        # The shared secret (default: config.secret, i.e. PCCL_SECRET with Config.from_env()).
        self._secret = auth.normalize_secret(secret if secret is not None else self.config.secret)
        self._master = master
        self._group = group
        self._host = host
        self._port = port
        self._advertise = advertise_host or host
        self._name = name
        self.peer_id = secrets.randbits(63)
        self._events = EventLog(self.config.event_log, f"peer-{self.peer_id}")
        self._engine: _native.Engine | None = None
        # What this peer knows of the master and of its ops in flight: the session owns
        # it (one lock); the control channel does the talking.
        self._session = Session(self.peer_id, self.config.blocked_report_after, self.config.heartbeat_interval)
        self._control: ControlChannel | None = None
        self._ring_lock = threading.Lock()
        self._engine_epoch = -1
        self._rings: dict[int, tuple[int, ...]] = {}  # epoch -> peer ids in ring order
        self._ring_only: set[int] = set()  # epochs whose larger all-reduces keep to the ring (the master says)
        self._pending_index = 0
        self._seq_lock = threading.Lock()
        self._next_seq: dict[int, int] = {}
        self._round = 0
        self._pending_query = 0
        # No collective call since admission but pending_peers(): the master lets a
        # joiner's first update_topology() be the vote that admitted it.
        self._fresh = False
        # What this peer's state connections may advertise together when it receives
        # shared state, measured by each fetch and kept for the next (state_fetch).
        self._receive_window = ReceiveWindow()
        # A joiner measures it on its members' padding too, until its first op or sync
        # (_bound_warmup): held while it does, set to end it.
        self._warmup_lock = threading.Lock()
        self._warmup_over = threading.Event()
        # This peer's last vote admitted peers: their first update_topology() waits
        # until the master sees what the members do next (protocol.md, "Joining"), so
        # the next blocking data-plane call tells it at once, not after
        # blocked_report_after.
        self._joiners_wait = False
        self._mismatches_seen = 0  # "mismatch" verdicts this peer's numbering has caught up with
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._prepares: list[threading.Thread] = []  # pools opened ahead of a join (_on_prepare)
        self._closed = False

    def connect(self, timeout: float | None = None) -> Communicator:
        """Registers with the master and returns once this peer is admitted (the first
        peer of a group at once; others at the group's next update_topology()) and
        connected to its ring. Raises Timeout, and AuthError when the master and this
        peer do not share the same secret (or only one of them has one)."""
        deadline = self._deadline(timeout, self.config.connect_timeout)
        t_start = time.monotonic()
        cfg = self.config
        self._engine = _native.Engine(
            peer_id=self.peer_id,
            host=self._host,
            port=self._port,
            connections_per_peer=cfg.connections_per_peer,
            segment_bytes=cfg.segment_bytes,
            socket_buffer_bytes=cfg.socket_buffer_bytes,
            mailbox_limit_bytes=cfg.mailbox_limit_bytes,
            secret=self._secret or b"",
            zero_copy=cfg.zero_copy,
            prefault=cfg.prefault,
            shared_memory=cfg.shared_memory,
            congestion_control=transport.engine_congestion_control(cfg.congestion_control),
        )
        transport.log_facts(self._engine)
        knocked = time.time()
        self._control = ControlChannel(
            self._master,
            cfg,
            self._session,
            self._rejoin_restarted_master,
            on_topology=self._on_topology,
            on_prepare=self._on_prepare,
            # Pools open while this peer registers (pccl_py.wire.knock): a datagram.
            knock=(
                knock.encode_knock(self.peer_id, self._group, self._advertise, self._engine.port, knocked, self._secret),
                lambda data: self._on_knock_answer(data, knocked),
            )
            if cfg.prepare_joins and cfg.heartbeat_datagrams
            else None,
        )
        self._control.start(max(0.1, deadline - time.monotonic()))
        hello = protocol.make(
            "hello", peer_id=self.peer_id, group=self._group, host=self._advertise, port=self._engine.port, name=self._name
        )
        if self._secret is not None:
            try:  # the hello goes right behind this peer's proof: one round trip less
                self._control.authenticate(self._secret, deadline, then=hello)
            except PcclError:
                self.close()  # nothing of this peer stays behind
                raise
        else:
            self._control.send(hello)
        self._control.send(transport.report(self._engine))
        session = self._session
        t_hello = time.monotonic()

        def admitted() -> Topology | None:
            refusal = session.last_error()
            if refusal is not None and not session.welcomed():
                error = AuthError if refusal["code"] == "auth" else PcclError
                raise error(f"master refused this peer: {refusal['msg']}")
            return session.admitted_topology()

        session.wait(admitted, deadline, "admission by the master")
        t_admitted = time.monotonic()
        self._start_round()
        self._ensure_ring(deadline)
        self._fresh = True
        # Where connect() spent its time: reaching the master (and authenticating),
        # waiting to be admitted, opening the data-plane pools of the first ring.
        self._events.emit(
            "connected",
            peer=self.peer_id,
            group=self._group,
            epoch=self.epoch,
            control_s=round(t_hello - t_start, 4),
            admission_s=round(t_admitted - t_hello, 4),
            ring_s=round(time.monotonic() - t_admitted, 4),
        )
        return self

    def close(self) -> None:
        """Leaves the group gracefully (the others re-form without an error) and frees
        every resource. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._control is not None:
            try:
                self._control.flush_committed()
                self._control.send(protocol.make("leave"))
            except Aborted:
                pass
        # The engine fails the ops it runs and the control channel the waits on the
        # master, so the executor's threads (async all-reduces) end and are joined.
        if self._engine is not None:
            self._engine.close()
        if self._control is not None:
            self._control.close()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        self._warmup_over.set()
        for thread in self._prepares:  # ended by their own short timeout at the latest
            thread.join()
        self._events.emit("closed", peer=self.peer_id)
        self._events.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def epoch(self) -> int:
        topo = self._topology()
        return topo.epoch if topo else -1

    @property
    def world_size(self) -> int:
        topo = self._topology()
        return len(topo.ring) if topo else 0

    @property
    def rank(self) -> int:
        topo = self._topology()
        rank = topo.rank_of(self.peer_id) if topo else None
        return -1 if rank is None else rank

    def ring_of(self, epoch: int) -> tuple[int, ...]:
        """Peer ids of the ring of a recent epoch this peer ran ops in, in ring order
        (empty when unknown): who took part in that epoch's collectives."""
        return self._rings.get(epoch, ())

    def update_topology(self, timeout: float | None = None) -> None:
        """Collective of the admitted peers: when all have called it, the master admits
        the pending peers and every peer moves to the new epoch's ring.

        A peer admitted by a vote took part in it: if it calls update_topology() before
        any other collective (pending_peers() aside), that call returns at once, so a
        joiner that runs the same loop as the members lines up with them. Raises
        CollectiveMismatch when the members are blocked in other collectives."""
        self._require()
        session = self._session
        deadline = self._deadline(timeout, self.config.connect_timeout)
        fresh, self._fresh = self._fresh, False
        rounds = session.vote_rounds()
        before = self._topology()
        self._ask(
            protocol.make("vote", epoch=self.epoch, fresh=fresh),
            lambda: True if session.vote_rounds() > rounds else None,
            deadline,
            "the topology vote",
            call="update_topology",
            waiting=["vote", session.round()],
        )
        self._start_round()
        self._ensure_ring(deadline)
        after = self._topology()
        if before is not None and after is not None:
            self._joiners_wait = bool({p[0] for p in after.ring} - {p[0] for p in before.ring})

    def _start_round(self) -> None:
        """Every member restarts its per-tag step numbering at the same point (admission
        or a completed vote), so peers that joined at different times agree on steps."""
        self._require()
        new_round = self._session.round()
        self._mismatches_seen = self._session.mismatches()
        with self._seq_lock:
            self._round = new_round
            self._next_seq.clear()
            self._pending_index = 0

    def _catch_up_round(self) -> None:
        """After a "mismatch" verdict every member restarts its numbering at the round it
        names, before its next numbered call, however its own calls ended."""
        if self._session.mismatches() != self._mismatches_seen:
            self._start_round()

    def pending_peers(self, timeout: float | None = None) -> int:
        """Collective: the number of peers waiting for admission, the same on every
        admitted peer (use it to skip update_topology() when nobody waits)."""
        self._require()
        self._catch_up_round()
        deadline = self._deadline(timeout, self.config.connect_timeout)
        self._pending_query += 1
        query = self._pending_query
        # (round, index in round) names this query alike on every member: a restarted
        # master answers a member the old one could not answer with what the others got.
        self._pending_index += 1
        name = (self._round, self._pending_index)
        session = self._session
        count = self._ask(
            protocol.make("pending", epoch=self.epoch, query=query, fresh=self._fresh),
            lambda: session.take_pending_answer(query),
            deadline,
            "pending_peers()",
            call="pending_peers",
            waiting=["pending", name[0], name[1], query],
        )
        session.set_answered([name[0], name[1], count])
        return count

    def _ask(
        self,
        request: protocol.Message,
        answer: Callable[[], Any],
        deadline: float,
        what: str,
        call: str,
        waiting: list[Any] | None = None,
    ) -> Any:
        """Sends the request of collective `call` and waits for its answer; a request
        still waiting when the master restarts is sent again once the group has
        re-formed. A wait that lasts is reported to the master, which raises
        CollectiveMismatch here when the members wait in calls that cannot match."""
        control = self._require()
        session = self._session
        control.flush_committed()  # the master sees this peer's ops before its next request
        mismatches = session.begin_request(request, waiting)
        try:
            control.send(request)
            return session.wait(
                answer, deadline, what, mismatches=mismatches, on_slow=lambda: self._report_blocked(call)
            )
        except CollectiveMismatch:
            self._start_round()  # every member does: numbering restarts where the master says
            raise
        finally:
            session.end_request(request)

    def _report_blocked(self, call: str, op: OpKey | None = None) -> None:
        """Tells the master this peer's caller has waited a while in `call` (and on op
        `op`), with the data-plane ops it has in flight: the master's mismatch rule."""
        control = self._control
        if control is None or self._closed or self._session.recovering():
            return  # (a master re-forming the group hears the next report)
        control.flush_committed()  # the master learns which of our ops are over first
        inflight = self._session.inflight()
        desc = self._session.inflight_desc(op) if op is not None else ""
        if desc is None:
            return  # that attempt is over already
        try:
            control.send(protocol.make("blocked", call=call, op=list(op) if op else [], desc=desc, inflight=inflight))
        except Aborted:
            pass

    def _on_topology(self, msg: protocol.Message) -> None:
        """Control thread: a new topology (for the event log)."""
        self._events.emit("topology", epoch=msg["epoch"], ring=[p[0] for p in msg["ring"]], reason=msg["reason"])

    def _on_knock_answer(self, data: bytes, knocked: float) -> bool:
        """Control thread: a datagram where the master's answer to this peer's knock may
        come (pccl_py.wire.knock). The pools to the ring it names open at once."""
        answer = knock.decode_answer(data, self._secret, self.peer_id, knocked)
        if answer is None:
            return False
        epoch, members = answer
        if members and not self._session.welcomed():  # else the welcome named the ring already
            self._on_prepare(members, epoch, len(members))
        return True

    def _on_prepare(self, peers: list[tuple[int, str, int]], epoch: int | None, sharers: int) -> None:
        """Control thread: a join ahead (the master's "welcome" to a newcomer that waits
        for the members' vote, or its "joining" to a member). The pools open on a thread
        of their own: connecting takes round trips, and the control thread must not wait."""
        cfg = self.config
        engine = self._engine
        if not cfg.prepare_joins or engine is None or self._closed:
            return
        # A member opens its pool in its engine's current epoch (the epoch that admits
        # the joiner keeps pools of older ones); a joiner, whose engine has none yet, in
        # the group's.
        joiner = epoch is not None
        if epoch is None:
            epoch = self._engine_epoch
        if epoch < 0:
            return
        # A knock, then the welcome or "joining", name the same peers: the engine opens
        # each pool once (a peer it is still opening one to is left to that call).

        def prepare() -> None:
            try:
                engine.prepare(
                    peers,
                    epoch,
                    sharers,
                    timeout=min(cfg.connect_timeout, JOIN_PREPARE_TIMEOUT),
                    warm_seconds=cfg.join_warmup,
                    warm_bytes=JOIN_WARMUP_BYTES,
                    warm_min_rtt=cfg.rsag_min_rtt,
                )
            except PcclError as exc:  # the epoch that needs them opens them, as without this
                log.info("opening pools ahead of a join failed: %s", exc)
            else:
                self._events.emit("prepared", peers=[p[0] for p in peers], epoch=epoch)
                if joiner:
                    self._bound_warmup([p[0] for p in peers], cfg.join_warmup)

        thread = threading.Thread(target=prepare, name="pccl-prepare", daemon=True)
        self._prepares = [t for t in self._prepares if t.is_alive()] + [thread]
        thread.start()

    def _bound_warmup(self, members: list[int], seconds: float) -> None:
        """Prepare thread of a joiner: measures the bound on its receive windows on the
        padding its members send while it is admitted (state_fetch.measure_while_warming),
        for up to `seconds` or until its first op or sync (_end_warmup), once."""
        engine = self._engine
        if engine is None or self._receive_window.bytes is not None or not self._warmup_lock.acquire(blocking=False):
            return
        try:
            until = time.monotonic() + seconds
            measure_while_warming(engine, members, self._receive_window, until, self._warmup_over)
        except PcclError:
            pass  # closed
        finally:
            self._warmup_lock.release()

    def _end_warmup(self) -> None:
        """Before a data-plane call (an op, a sync, a probe): its bytes are not padding."""
        if not self._warmup_over.is_set():
            self._warmup_over.set()
            with self._warmup_lock:
                pass

    def _op_executor(self) -> concurrent.futures.ThreadPoolExecutor:
        """The threads async all-reduces run on (created at the first; joined by close())."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="pccl-op")
        return self._executor

    def _require(self) -> ControlChannel:
        if self._closed:
            raise Aborted("the communicator is closed")
        if self._control is None or self._engine is None:
            raise PcclError("call connect() first")
        return self._control

    def _topology(self) -> Topology | None:
        return self._session.topology()

    def _ensure_ring(self, deadline: float) -> int:
        """Moves the data plane to the master's latest ring; returns its epoch."""
        self._require()
        assert self._engine is not None
        evicted = self._session.eviction_error()
        if evicted is not None:
            raise evicted
        with self._ring_lock:
            topo = self._topology()
            if topo is None:
                raise PcclError("no topology yet")
            rank = topo.rank_of(self.peer_id)
            if rank is None:
                reason = self._session.evicted()
                raise Aborted(f"this peer is not in the ring of epoch {topo.epoch}" + (f": {reason}" if reason else ""))
            if topo.epoch != self._engine_epoch:
                cfg = self.config
                timeout = min(self.config.connect_timeout, max(0.0, deadline - time.monotonic()))
                # With the direct algorithms every all-reduce of the epoch needs a pool
                # to every peer: open them all now, at once, not at the first op.
                direct = cfg.direct_allreduce_max_bytes > 0 or (topo.rsag and cfg.rsag_min_bytes > 0)
                self._engine.set_ring(topo.epoch, list(topo.ring), rank, timeout=timeout, connect_all=direct)
                self._engine_epoch = topo.epoch
                self._rings[topo.epoch] = tuple(p[0] for p in topo.ring)
                if not topo.rsag:
                    self._ring_only.add(topo.epoch)
                for old in [e for e in self._rings if e < topo.epoch - 8]:
                    del self._rings[old]
                    self._ring_only.discard(old)
            return topo.epoch

    @staticmethod
    def _deadline(timeout: float | None, default: float) -> float:
        return time.monotonic() + (default if timeout is None else timeout)
