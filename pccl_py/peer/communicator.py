"""Communicator: a peer's handle on its group. Synchronous API (training loops are
synchronous) backed by a control channel thread (pccl_py.control) and the native
data-plane engine (pccl_py._native).

Every collective runs in three steps: the data plane moves and reduces the bytes
peer to peer; each participant reports its local result to the master; the master
decides one outcome for everyone (pccl_py.membership), so an op succeeds on all
survivors or fails on all of them. In-place results are committed into the caller's
buffer only after the master says success, so a failed op leaves the input intact
and can be retried.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any, Self

import numpy as np

from pccl_py import _native
from pccl_py.config import Config
from pccl_py.errors import (
    Aborted,
    AuthError,
    CollectiveMismatch,
    ConfigError,
    FailureKind,
    InvalidArgument,
    PcclError,
    Timeout,
    error_class,
    failure_kind,
)
from pccl_py.events import EventLog
from pccl_py.peer.buffers import native_view, stage_to_host
from pccl_py.peer.control import ControlChannel
from pccl_py.peer.probe import measure_bandwidth
from pccl_py.peer.session import ATTEMPT_BITS, OpKey, Session, Topology
from pccl_py.peer.shared_state import (
    SharedState,
    Source,
    SyncInfo,
    check_strategy,
    fetch_entries,
    rich_progress,
)
from pccl_py.types import Quantization, ReduceInfo, ReduceOp, SyncStrategy
from pccl_py.wire import auth, protocol

log = logging.getLogger(__name__)

# Engine step = round << 40 | step << 8 | attempt. The round changes at each topology
# vote (when every member restarts its step numbering, so joiners line up with the
# others); the attempt changes at each retry: every attempt is a distinct op.
_ATTEMPT_BITS = ATTEMPT_BITS
_STEP_BITS = 32
_FLOAT_DTYPES = (
    _native.DataType.FLOAT16,
    _native.DataType.BFLOAT16,
    _native.DataType.FLOAT32,
    _native.DataType.FLOAT64,
)
# Failures that re-running over the survivors can fix.
_RETRYABLE = (FailureKind.PEER_LOST, FailureKind.PEER_LEFT)


class AllReduceHandle:
    """An all-reduce in flight. wait() returns its ReduceInfo or raises its error."""

    def __init__(
        self, future: concurrent.futures.Future[ReduceInfo], on_slow: Callable[[], None] | None = None, slow_after: float = 0.0
    ) -> None:
        self._future = future
        self._on_slow = on_slow  # tells the master what this caller waits on (mismatch detection)
        self._slow_after = slow_after

    def wait(self, timeout: float | None = None) -> ReduceInfo:
        if self._on_slow is not None and (timeout is None or timeout > self._slow_after):
            try:
                return self._future.result(self._slow_after)
            except concurrent.futures.TimeoutError:
                self._on_slow()
            if timeout is not None:
                timeout -= self._slow_after
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise Timeout(f"all-reduce still running after {timeout}s") from None

    def done(self) -> bool:
        return self._future.done()


class Communicator:
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
        self._session = Session(self.peer_id, self.config.blocked_report_after)
        self._control: ControlChannel | None = None
        self._ring_lock = threading.Lock()
        self._engine_epoch = -1
        self._rings: dict[int, tuple[int, ...]] = {}  # epoch -> peer ids in ring order
        self._pending_index = 0
        self._seq_lock = threading.Lock()
        self._next_seq: dict[int, int] = {}
        self._round = 0
        self._pending_query = 0
        # No collective call since admission but pending_peers(): the master lets a
        # joiner's first update_topology() be the vote that admitted it.
        self._fresh = False
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    def connect(self, timeout: float | None = None) -> Communicator:
        """Registers with the master and returns once this peer is admitted (the first
        peer of a group at once; others at the group's next update_topology()) and
        connected to its ring. Raises Timeout, and AuthError when the master and this
        peer do not share the same secret (or only one of them has one)."""
        deadline = self._deadline(timeout, self.config.connect_timeout)
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
        )
        self._control = ControlChannel(
            self._master, cfg, self._session, self._rejoin_restarted_master, on_topology=self._on_topology
        )
        self._control.start(max(0.1, deadline - time.monotonic()))
        if self._secret is not None:
            try:
                self._control.authenticate(self._secret, deadline)
            except PcclError:
                self.close()  # nothing of this peer stays behind
                raise
        self._control.send(
            protocol.make(
                "hello",
                peer_id=self.peer_id,
                group=self._group,
                host=self._advertise,
                port=self._engine.port,
                name=self._name,
            )
        )
        session = self._session

        def admitted() -> Topology | None:
            refusal = session.last_error()
            if refusal is not None and not session.welcomed():
                error = AuthError if refusal["code"] == "auth" else PcclError
                raise error(f"master refused this peer: {refusal['msg']}")
            return session.admitted_topology()

        session.wait(admitted, deadline, "admission by the master")
        self._start_round()
        self._ensure_ring(deadline)
        self._fresh = True
        self._events.emit("connected", peer=self.peer_id, group=self._group, epoch=self.epoch)
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
        self._events.emit("closed", peer=self.peer_id)
        self._events.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ membership

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

    def optimize_topology(self, timeout: float | None = None) -> None:
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

    def _start_round(self) -> None:
        """Every member restarts its per-tag step numbering at the same point (admission
        or a completed vote), so peers that joined at different times agree on steps."""
        self._require()
        new_round = self._session.round()
        with self._seq_lock:
            self._round = new_round
            self._next_seq.clear()
            self._pending_index = 0

    def pending_peers(self, timeout: float | None = None) -> int:
        """Collective: the number of peers waiting for admission, the same on every
        admitted peer (use it to skip update_topology() when nobody waits)."""
        self._require()
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

    # ------------------------------------------------------------------ collectives

    def all_reduce(
        self,
        x: Any,
        op: ReduceOp = ReduceOp.SUM,
        out: Any = None,
        tag: int | None = None,
        quantization: Any = None,
        timeout: float | None = None,
        retry: bool = False,
    ) -> ReduceInfo:
        """Reduces `x` (numpy array or torch tensor; CUDA tensors are staged through
        pinned host memory) across the group, in place or into `out`. Every participant
        gets the same bytes. On a peer failure raises PeerLost on every survivor with `x`
        intact, or with retry=True re-runs over the survivors; ReduceInfo.world_size
        tells how many contributed. `timeout` bounds the whole call (default:
        config.op_timeout). `quantization`: a pccl_py.Quantization (SUM/AVG of floats;
        every peer must pass the same one), see docs/quantization.md."""
        x_host, out_host, copy_back = stage_to_host(x, out)
        args = self._prepare(x_host, op, out_host, tag, quantization)
        info = self._run_all_reduce(*args, self._deadline(timeout, self.config.op_timeout), retry, blocking=True)
        if copy_back is not None:
            copy_back()
        return info

    def all_reduce_async(
        self,
        x: Any,
        op: ReduceOp = ReduceOp.SUM,
        out: Any = None,
        tag: int | None = None,
        quantization: Any = None,
        timeout: float | None = None,
        retry: bool = False,
    ) -> AllReduceHandle:
        """Starts an all-reduce and returns a handle. Ops in flight at once need distinct
        tags; do not touch `x`/`out` until the handle is done."""
        x_host, out_host, copy_back = stage_to_host(x, out)
        args = self._prepare(x_host, op, out_host, tag, quantization)
        deadline = self._deadline(timeout, self.config.op_timeout)
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="pccl-op")

        current: list[OpKey] = []  # the key of its latest attempt, for wait()'s report

        def run() -> ReduceInfo:
            info = self._run_all_reduce(*args, deadline, retry, attempt_key=current)
            if copy_back is not None:
                copy_back()
            return info

        def on_slow() -> None:
            if current:
                self._report_blocked("all_reduce", current[-1])

        return AllReduceHandle(self._executor.submit(run), on_slow, self.config.blocked_report_after)

    # ------------------------------------------------------------------ shared state

    def sync_shared_state(
        self,
        state: SharedState,
        strategy: SyncStrategy = SyncStrategy.ENFORCE_POPULAR,
        timeout: float | None = None,
        progress: bool | Any = False,
    ) -> SyncInfo:
        """Collective: afterwards every peer holds the same bytes in every entry of
        `state` and the same revision. The master elects the content (see
        pccl_py.election); peers whose bytes differ fetch the entries from the peers
        holding the elected bytes, several at once, verified by hash. Raises
        StateMismatch (layouts or revisions that cannot be reconciled), PeerLost (an
        entry could not be obtained), Timeout. `progress`: True for a progress bar on
        large transfers, or a callable(done_bytes, total_bytes)."""
        self._require()
        session = self._session
        check_strategy(strategy)
        assert self._engine is not None
        deadline = self._deadline(timeout, self.config.op_timeout)
        self._fresh = False
        entries = state.entries()
        buffers = state.buffers()
        exposure = self._engine.expose_state(buffers)  # ready to serve before anyone is told to fetch
        rx = 0
        received = 0
        fetched: list[int] = []
        try:
            session.reset_sync()
            request = protocol.make(
                "sync",
                epoch=self.epoch,
                revision=state.revision,
                strategy=strategy.value,
                exposure=exposure.id,
                entries=[[e.name, e.dtype, list(e.shape), e.nbytes, e.hash] for e in entries],
            )
            size = len(protocol.encode(request))
            if size > self.config.max_message_bytes:
                raise InvalidArgument(
                    f"the state's description ({len(entries)} entries, {size} bytes) exceeds the "
                    f"{self.config.max_message_bytes}-byte message cap (Config.max_message_bytes): "
                    "merge small tensors into fewer entries or raise the cap on every peer and the master"
                )
            while True:
                plan = self._ask(
                    request,
                    session.sync_plan_or_result,
                    deadline,
                    "the shared-state plan",
                    call="sync_shared_state",
                )
                if plan["t"] == "sync_plan":
                    ok, kind, msg = True, "", ""
                    wanted = [(int(i), int(h), [int(p) for p in holders]) for i, h, holders in plan["fetch"]]
                    received = len(wanted)
                    fetched = [i for i, _, _ in wanted]
                    sources = {
                        int(p): Source(int(p), str(host), int(port), int(exp)) for p, host, port, exp in plan["sources"]
                    }
                    close_bar = None
                    callback = progress if callable(progress) else None
                    total = sum(int(buffers[i].nbytes) for i, _, _ in wanted)
                    if progress is True and total >= (64 << 20):
                        callback, close_bar = rich_progress()
                    try:
                        rx = fetch_entries(self._engine, buffers, wanted, sources, deadline, progress=callback)
                    except PcclError as exc:
                        ok, kind, msg = False, failure_kind(exc), str(exc)
                    finally:
                        if close_bar is not None:
                            close_bar()
                    result = self._ask(
                        protocol.make(
                            "sync_done", ok=ok, kind=kind, msg=msg[:2000], rx_bytes=rx, revision=int(plan["revision"])
                        ),
                        session.sync_result,
                        deadline,
                        "the shared-state result",
                        call="sync_shared_state",
                    )
                else:
                    result = plan
                if result["ok"] or result["kind"] != FailureKind.RETRY:
                    break
                # The master restarted during this sync and never saw it: ask again (the
                # other members do the same, so the collective forms anew).
                session.reset_sync()
        finally:
            tx = exposure.close()
        if not result["ok"]:
            raise error_class(result["kind"])(f"shared-state sync failed: {result['msg']}", epoch=self.epoch)
        state.stage_out(fetched)  # CUDA entries get the received bytes only now
        state.revision = result["revision"]
        session.set_synced_revision(state.revision)
        self._events.emit("sync", revision=state.revision, rx_bytes=rx, tx_bytes=tx, received=received)
        return SyncInfo(revision=state.revision, rx_bytes=rx, tx_bytes=tx, entries_received=received)

    def _prepare(
        self, x: Any, op: ReduceOp, out: Any, tag: int | None, quantization: Any
    ) -> tuple[Any, Any, Any, ReduceOp, int, int, Quantization | None]:
        self._require()
        self._fresh = False
        if not isinstance(op, ReduceOp):
            raise InvalidArgument(f"op must be a pccl_py.ReduceOp, got {op!r}")
        if quantization is not None and not isinstance(quantization, Quantization):
            raise InvalidArgument(f"quantization must be a pccl_py.Quantization or None, got {quantization!r}")
        src, dtype = native_view(x)
        if quantization is not None:
            if op not in (ReduceOp.SUM, ReduceOp.AVG):
                raise InvalidArgument(f"a quantized all-reduce supports SUM and AVG only, not {op.name}")
            if dtype not in _FLOAT_DTYPES:
                raise InvalidArgument(f"quantization needs a floating-point tensor, not {dtype.name.lower()}")
        if out is None or out is x:
            dst = src
        else:
            dst, out_dtype = native_view(out)
            if out_dtype != dtype or dst.nbytes != src.nbytes:
                raise InvalidArgument("out must have the dtype and size of x")
        tag = 0 if tag is None else int(tag)
        if not 0 <= tag < 2**32:
            raise InvalidArgument("tag must be in [0, 2**32)")
        with self._seq_lock:  # steps are numbered in call order, the same on every peer
            step = self._next_seq.get(tag, 0)
            self._next_seq[tag] = step + 1
            seq = (self._round << _STEP_BITS) | step
        return src, dst, dtype, op, tag, seq, quantization

    def _run_all_reduce(
        self,
        src: Any,
        dst: Any,
        dtype: Any,
        op: ReduceOp,
        tag: int,
        seq: int,
        quantization: Quantization | None,
        deadline: float,
        retry: bool,
        *,
        blocking: bool = False,
        attempt_key: list[OpKey] | None = None,
    ) -> ReduceInfo:
        """Runs (and with `retry` re-runs) one all-reduce. `blocking`: the caller's
        thread waits in it (reported to the master if it waits long: mismatch
        detection); `attempt_key` receives the key of each attempt."""
        engine = self._engine
        control = self._require()
        assert engine is not None
        in_place = dst is src
        desc = _describe(src, dtype, op, tag, seq, quantization)
        failures_in_epoch: dict[int, int] = {}  # a retry in the same epoch needs a fresh key
        attempts = 0
        while True:
            epoch = -1
            handle = None
            outcome: protocol.Message | None = None
            superseded = False  # this peer aborted the attempt: the master had moved on
            ok, kind, msg, culprit = True, "", "", -1
            try:
                epoch = self._ensure_ring(deadline)
                key = (epoch, tag, (seq << _ATTEMPT_BITS) | failures_in_epoch.get(epoch, 0))
                handle = engine.all_reduce(
                    src,
                    dst,
                    dtype,
                    op.native,
                    tag=tag,
                    seq=key[2],
                    timeout=max(0.0, deadline - time.monotonic()),
                    connect_timeout=min(self.config.connect_timeout, max(0.0, deadline - time.monotonic())),
                    defer_commit=in_place,
                    quantization=quantization.native_kind if quantization else _native.QuantKind.NONE,
                    quant_dtype=quantization.native_dtype if quantization else _native.DataType.UINT8,
                    vote=True,
                )
                self._track(key, handle, retry, desc)
                if attempt_key is not None:
                    attempt_key.append(key)
                try:
                    if blocking and not handle.wait(self.config.blocked_report_after):
                        self._report_blocked("all_reduce", key)
                    handle.result()
                finally:
                    superseded = self._untrack(key)
            except PcclError as exc:
                if epoch < 0:  # no ring to run on (evicted, closed, timed out)
                    raise
                key = (epoch, tag, (seq << _ATTEMPT_BITS) | failures_in_epoch.get(epoch, 0))
                # After voting, this peer held the whole result and another may have
                # committed it: it reports ok and the master settles the op (one
                # commit anywhere makes it a success). Before voting: a failure, and
                # provably nobody committed.
                ok = handle is not None and handle.voted
                kind = failure_kind(exc)
                if kind == FailureKind.ABORTED and superseded:
                    kind = FailureKind.PEER_LOST  # the master moved on: a consequence, not a cause
                kind, msg = (FailureKind.NONE, "") if ok else (kind, str(exc))
                culprit = exc.peer if isinstance(exc.peer, int) and exc.peer < 2**63 else -1
            else:
                # Committed: the vote came round, every participant holds the result.
                # No master round trip; the master hears of it in the next "done" batch.
                world = len(self._rings.get(key[0], ()))
                control.note_committed(key, world)
                outcome = {"ok": True, "world": world}
            if outcome is None:
                outcome = self._outcome(key, ok, kind, msg, culprit, deadline)
            attempts += 1
            if outcome["ok"]:
                if handle is not None:
                    handle.settle(True)
                self._events.emit(
                    "op", epoch=key[0], tag=tag, seq=key[2], ok=True, world=outcome["world"], ring=self.ring_of(key[0])
                )
                return ReduceInfo(
                    world_size=outcome["world"],
                    tx_bytes=handle.tx_bytes if handle is not None else 0,
                    rx_bytes=handle.rx_bytes if handle is not None else 0,
                    epoch=key[0],
                    attempts=attempts,
                    contributors=self._rings.get(key[0], ()),
                )
            if handle is not None:
                handle.settle(False)
            self._events.emit(
                "op", epoch=key[0], tag=tag, seq=key[2], ok=False, kind=outcome["kind"], ring=self.ring_of(key[0])
            )
            error = error_class(outcome["kind"])(
                f"all-reduce failed: {outcome['msg']}",
                peer=outcome["peer"] if outcome["peer"] >= 0 else None,
                epoch=key[0],
                tag=tag,
                step=seq & ((1 << _STEP_BITS) - 1),
            )
            if outcome["kind"] == FailureKind.COLLECTIVE_MISMATCH:
                self._start_round()  # every member does: numbering restarts where the master says
            retryable = outcome["kind"] == FailureKind.PEER_LEFT or (retry and outcome["kind"] in _RETRYABLE)
            failures_in_epoch[key[0]] = failures_in_epoch.get(key[0], 0) + 1
            if not retryable or attempts >= self.config.max_retries or failures_in_epoch[key[0]] >= 1 << _ATTEMPT_BITS:
                raise error
            # Re-run once the master's new ring (if the failure made one) is known here.
            next_epoch = outcome["next_epoch"]
            self._session.wait(
                functools.partial(self._session.epoch_reached, next_epoch),
                deadline,
                f"epoch {next_epoch}",
            )

    def _outcome(self, key: OpKey, ok: bool, kind: str, msg: str, culprit: int, deadline: float) -> protocol.Message:
        """Reports this peer's result for op `key` and returns the master's decision."""
        control = self._require()
        session = self._session
        control.flush_committed()  # the master weighs this report against those
        known = session.note_reported(key, ok, kind, msg[:2000])  # handed to a restarted master
        try:
            if not known:
                control.send(
                    protocol.make(
                        "op", epoch=key[0], tag=key[1], seq=key[2], ok=ok, kind=kind, msg=msg[:2000], peer=culprit
                    )
                )
            return session.wait(lambda: session.take_outcome(key), deadline, f"the outcome of op {key}")
        finally:
            session.forget_reported(key)

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
        if control is None or self._closed:
            return
        control.flush_committed()  # the master learns which of our ops are over first
        inflight = self._session.inflight()
        desc = self._session.inflight_desc(op) if op is not None else ""
        if desc is None:
            return  # that attempt is over already
        try:
            control.send(protocol.make("blocked", call=call, op=list(op) if op else [], desc=desc, inflight=inflight))
        except Aborted:
            pass

    def _rejoin_restarted_master(self) -> None:
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
            )
            control.send(rejoin)
            self._events.emit("rejoin", peer=self.peer_id, epoch=topo.epoch, pending=len(state.pending))
        except PcclError as exc:
            log.error("cannot rejoin the restarted master: %s", exc)
            self._session.mark_evicted(f"could not rejoin the restarted master: {exc}")

    def _track(self, key: OpKey, handle: Any, retry: bool, desc: str) -> None:
        if self._session.track(key, handle, retry, desc):
            handle.abort("the master already failed this op (superseded)")

    def _untrack(self, key: OpKey) -> bool:
        """Forgets op `key`; returns whether this peer aborted it as superseded."""
        return self._session.untrack(key)

    def _on_topology(self, msg: protocol.Message) -> None:
        """Control thread: a new topology (for the event log)."""
        self._events.emit("topology", epoch=msg["epoch"], ring=[p[0] for p in msg["ring"]], reason=msg["reason"])

    # ------------------------------------------------------------------ helpers

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
        evicted = self._session.evicted()
        if evicted is not None:
            raise Aborted(f"this peer was evicted by the master: {evicted}")
        with self._ring_lock:
            topo = self._topology()
            if topo is None:
                raise PcclError("no topology yet")
            rank = topo.rank_of(self.peer_id)
            if rank is None:
                reason = self._session.evicted()
                raise Aborted(f"this peer is not in the ring of epoch {topo.epoch}" + (f": {reason}" if reason else ""))
            if topo.epoch != self._engine_epoch:
                timeout = min(self.config.connect_timeout, max(0.0, deadline - time.monotonic()))
                self._engine.set_ring(topo.epoch, list(topo.ring), rank, timeout=timeout)
                self._engine_epoch = topo.epoch
                self._rings[topo.epoch] = tuple(p[0] for p in topo.ring)
                for old in [e for e in self._rings if e < topo.epoch - 8]:
                    del self._rings[old]
            return topo.epoch

    @staticmethod
    def _deadline(timeout: float | None, default: float) -> float:
        return time.monotonic() + (default if timeout is None else timeout)


def _describe(src: Any, dtype: Any, op: ReduceOp, tag: int, seq: int, quantization: Quantization | None) -> str:
    """An all-reduce's shape as the master compares it: peers in the same step must agree."""
    count = src.nbytes // _native.element_size(dtype)
    text = f"tag {tag}, step {seq & ((1 << _STEP_BITS) - 1)}, {count} x {dtype.name.lower()}, {op.name}"
    return text + (f", {quantization.kind} {quantization.dtype}" if quantization is not None else "")
