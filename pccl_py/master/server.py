"""The master: a soft-state coordinator (peers, groups, epochs, rings, votes, op
outcomes). It never touches tensor bytes.

I/O only; every decision is made by pccl_py.membership. The master listens on a ZeroMQ
ROUTER socket (msgpack messages, pccl_py.protocol) and watches each peer's liveness two
ways: heartbeats (a hung or partitioned peer goes silent) and a TCP connection the
master opens to the peer's data-plane port (a crashed peer's kernel closes it, so a
crash is seen at once; an orderly close says goodbye first).

Use it in-process as a context manager (`with Master() as m: m.address`), or run it
with `pccl master`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Self

import zmq
import zmq.asyncio

from pccl_py import _native
from pccl_py.config import Config
from pccl_py.errors import PcclError, ProtocolError, Timeout
from pccl_py.events import EventLog
from pccl_py.master.beats import open_beats
from pccl_py.master.election import EntryMeta, Submission, SyncStrategy
from pccl_py.master.membership import Effect, Log, Membership, RejoinInfo, RejoinRefused, Send
from pccl_py.master.metrics import MasterMetrics
from pccl_py.wire import auth, protocol
from pccl_py.wire.aio import (
    monitor_connections,
    new_event_loop,
    send_nowait,
    tcp_round_trip,
    watch_connections,
)

log = logging.getLogger(__name__)

# The id the master uses in data-plane handshakes (never a real peer's id).
MASTER_PEER_ID = 2**64 - 2
_TICK_SECONDS = 0.05
# Outstanding challenges and authenticated routing ids kept (oldest dropped first), so
# a flood of unauthenticated clients cannot grow the master's memory.
_MAX_AUTH_ENTRIES = 4096
_HEARTBEAT = protocol.make("hb")


class Master:
    """The coordinator. `secret` (default: config.secret) authenticates every peer and
    status client by challenge-response, and the master's own connections to the peers'
    data ports; without one, anyone who can reach the port may join. `metrics_port`
    (0: any free port) serves Prometheus metrics at http://metrics_host:port/metrics."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        secret: str | bytes | None = None,
        *,
        config: Config | None = None,
        metrics_port: int | None = None,
        metrics_host: str | None = None,
    ) -> None:
        self.config = config or Config()
        self._secret = auth.normalize_secret(secret if secret is not None else self.config.secret)
        self.metrics = MasterMetrics()
        self._metrics_port = metrics_port
        self._metrics_host = metrics_host or host
        self.metrics_address: str | None = None
        self._challenges: OrderedDict[bytes, tuple[bytes, bytes]] = OrderedDict()  # rid -> (client, master nonce)
        self._authed: OrderedDict[bytes, None] = OrderedDict()
        self._host = host
        self._port = port
        self._bound_port: int | None = None
        self._membership = Membership(
            self.config.heartbeat_interval,
            self.config.heartbeat_timeout,
            self.config.failure_grace,
            bandwidth_ttl=self.config.bandwidth_ttl,
            solve_seconds=self.config.topology_solve_seconds,
            incarnation=secrets.randbits(63),
            hold_first_admission_until=time.monotonic() + self.config.startup_grace,
            mismatch_grace=self.config.mismatch_grace,
            rsag_min_rtt=self.config.rsag_min_rtt,
        )
        self._events = EventLog(self.config.event_log, "master")
        self._routes: dict[int, bytes] = {}  # peer id -> ZeroMQ routing id
        self._ids: dict[bytes, int] = {}
        self._watchers: dict[int, asyncio.Task[None]] = {}  # tasks of serve()'s TaskGroup
        self._tasks: asyncio.TaskGroup | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def address(self) -> str:
        if self._bound_port is None:
            raise PcclError("master is not listening yet")
        return f"{self._host}:{self._bound_port}"

    def start(self, timeout: float = 10.0) -> Self:
        """Runs the master on a background thread; returns once it is listening."""
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._thread_main, name="pccl-master", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise Timeout(f"master did not start within {timeout}s")
        if self._failure is not None:
            raise self._failure
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stops the master and releases its sockets (also from a signal handler of the
        loop serve() runs on)."""
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._events.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _thread_main(self) -> None:
        loop = new_event_loop()
        try:
            loop.run_until_complete(self.serve())
        except BaseException as exc:  # noqa: BLE001 - surfaced to start()
            self._failure = exc
            self._ready.set()
        finally:
            loop.close()

    async def serve(self, on_ready: Callable[[str], None] | None = None) -> None:
        """Serves until close() (or cancellation). Binds first; `address` is valid once
        the master is ready, when `on_ready(address)` is called."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        monitor = monitor_connections(sock)
        beat_transport: asyncio.DatagramTransport | None = None
        try:
            sock.bind(f"tcp://{self._host}:{self._port or '*'}")
            endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            self._bound_port = int(endpoint.rsplit(":", 1)[1])
            self._sock = sock
            beat_transport = await open_beats(self._membership, self._host, self._bound_port, self._secret, self._carry_out)
            if self._metrics_port is not None:
                bound = self.metrics.serve(self._metrics_host, self._metrics_port)
                self.metrics_address = f"{self._metrics_host}:{bound}"
                log.info("metrics at http://%s/metrics", self.metrics_address)
            if self._secret is None and not auth.is_loopback(self._host):
                log.warning(
                    "INSECURE: the master listens on %s without a shared secret: anyone who reaches "
                    "this port can join the run or disrupt it. Set --secret-file or PCCL_SECRET.", self._host
                )
            log.info("master listening on %s", self.address)
            self._events.emit("master_start", address=self.address)
            self._ready.set()
            if on_ready is not None:
                on_ready(self.address)
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks  # the liveness watchers are its tasks too
                loops = [
                    tasks.create_task(self._receive_loop()),
                    tasks.create_task(self._tick_loop()),
                    # Caps each peer connection's retransmission backoff: after a
                    # short outage, answers reach the peer within a second.
                    tasks.create_task(watch_connections(sock, monitor)),
                ]
                await self._stop.wait()
                for task in loops:
                    task.cancel()
                for watcher in list(self._watchers.values()):
                    watcher.cancel()
        finally:
            self._tasks = None
            self._watchers.clear()
            monitor.close(linger=0)  # its task may never have run: ctx.term() waits for every socket
            if beat_transport is not None:
                beat_transport.close()
            sock.close(linger=0)
            ctx.term()
            self._sock = None
            self.metrics.close()

    # ------------------------------------------------------------------ inputs

    async def _receive_loop(self) -> None:
        assert self._sock is not None
        while True:
            frames = await self._sock.recv_multipart(copy=True)
            try:
                await self._handle(frames)
            except Exception:  # the master never dies of its input
                log.exception("error handling a message")

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(_TICK_SECONDS)
            await self._apply(self._membership.tick(time.monotonic()))

    async def _handle(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            return  # not a DEALER message: drop
        rid, data = frames
        try:
            msg = protocol.decode(data, self.config.max_message_bytes)
        except ProtocolError as exc:
            await self._send_raw(rid, protocol.make("error", code="bad_message", msg=str(exc)))
            return
        kind = msg["t"]
        now = time.monotonic()
        if kind == "auth_begin":
            await self._auth_begin(rid, msg)
            return
        if kind == "auth":
            await self._auth(rid, msg)
            return
        if kind in ("status", "hello", "rejoin") and self._secret is not None and rid not in self._authed:
            self.metrics.auth_failures.inc()
            await self._send_raw(rid, protocol.make("error", code="auth", msg="this master requires the shared secret"))
            return
        if kind == "status":
            await self._send_raw(rid, protocol.make("status_reply", state=self._status()))
            return
        if kind == "hello":
            self._authed.pop(rid, None)  # from now on the routing id is a registered peer
            await self._hello(rid, msg, now)
            return
        if kind == "rejoin":
            self._authed.pop(rid, None)
            await self._rejoin(rid, msg, now)
            return
        peer_id = self._ids.get(rid)
        if peer_id is None:
            # A peer this master does not know: evicted, or registered with a previous
            # master (it compares the incarnation with its welcome's and rejoins).
            await self._send_raw(rid, protocol.make("unknown", master=self._membership.incarnation))
            return
        try:
            if kind == "hb":
                self._membership.heartbeat(peer_id, now)
                # Answered, so that a peer can tell when it no longer hears the master.
                await self._send_raw(rid, _HEARTBEAT)
            elif kind == "vote":
                await self._apply(self._membership.vote_topology(peer_id, now, msg["fresh"]))
            elif kind == "pending":
                await self._apply(self._membership.query_pending(peer_id, msg["query"], now, msg["fresh"]))
            elif kind == "blocked":
                op, inflight = _blocked(msg)
                await self._apply(self._membership.report_blocked(peer_id, msg["call"], op, msg["desc"], inflight, now))
            elif kind == "op":
                key = (msg["epoch"], msg["tag"], msg["seq"])
                self._membership.heartbeat(peer_id, now)
                await self._apply(
                    self._membership.report_op(peer_id, key, msg["ok"], msg["kind"], msg["msg"], msg["peer"], now)
                )
            elif kind == "done":
                keys = _op_keys(msg["ops"])
                self._membership.heartbeat(peer_id, now)
                await self._apply(self._membership.report_committed(peer_id, keys, now))
            elif kind == "transport":
                self._membership.set_transport(peer_id, {k: v for k, v in msg.items() if k not in ("t", "v")})
            elif kind == "leave":
                await self._apply(self._membership.leave(peer_id, now))
            elif kind == "sync":
                submission = _submission(peer_id, msg)
                await self._apply(self._membership.request_sync(peer_id, submission, msg["exposure"], now))
            elif kind == "sync_done":
                if msg["ok"] and msg["rx_bytes"] > 0:
                    self.metrics.state_bytes.inc(msg["rx_bytes"])
                await self._apply(self._membership.sync_done(peer_id, msg["ok"], msg["kind"], msg["msg"], now, msg["revision"]))
            elif kind == "optimize":
                if not 0 < msg["probe_bytes"] <= 1 << 30:
                    raise ProtocolError("optimize: probe_bytes must be in (0, 1 GiB]")
                await self._apply(self._membership.request_optimize(peer_id, msg["exposure"], msg["probe_bytes"], now))
            elif kind == "probe_done":
                results = _probe_results(msg)
                await self._apply(self._membership.probe_done(peer_id, msg["round"], results, now))
            else:
                await self._send_raw(rid, protocol.make("error", code="unexpected", msg=f"{kind} is not a request"))
        except PermissionError as exc:
            await self._send_raw(rid, protocol.make("error", code="not_admitted", msg=str(exc)))
        except ProtocolError as exc:
            await self._send_raw(rid, protocol.make("error", code="bad_message", msg=str(exc)))

    # ------------------------------------------------------------------ authentication

    async def _auth_begin(self, rid: bytes, msg: protocol.Message) -> None:
        """Answers a challenge request: our nonce, and our proof (empty without a secret,
        which a client with a secret refuses)."""
        nonce_client = msg["nonce"]
        if len(nonce_client) != auth.NONCE_BYTES:
            await self._send_raw(rid, protocol.make("error", code="auth", msg="bad nonce length"))
            return
        nonce_master = auth.new_nonce()
        proof = b"" if self._secret is None else auth.master_proof(self._secret, nonce_client, nonce_master)
        self._challenges[rid] = (nonce_client, nonce_master)
        self._challenges.move_to_end(rid)
        while len(self._challenges) > _MAX_AUTH_ENTRIES:
            self._challenges.popitem(last=False)
        await self._send_raw(rid, protocol.make("auth_challenge", nonce=nonce_master, proof=proof))

    async def _auth(self, rid: bytes, msg: protocol.Message) -> None:
        """Checks a client's answer. A challenge answers once: a replay finds none."""
        challenge = self._challenges.pop(rid, None)
        if self._secret is None:
            await self._send_raw(rid, protocol.make("auth_ok"))
            return
        if challenge is None or not auth.verify(auth.client_proof(self._secret, challenge[1], challenge[0]), msg["mac"]):
            self.metrics.auth_failures.inc()
            self._authed.pop(rid, None)
            log.warning("refused a client: %s", "no challenge outstanding" if challenge is None else "wrong secret")
            why = "no challenge outstanding (replayed?)" if challenge is None else "wrong shared secret"
            await self._send_raw(rid, protocol.make("error", code="auth", msg=f"authentication failed: {why}"))
            return
        self._authed[rid] = None
        self._authed.move_to_end(rid)
        while len(self._authed) > _MAX_AUTH_ENTRIES:
            self._authed.popitem(last=False)
        await self._send_raw(rid, protocol.make("auth_ok"))

    # ------------------------------------------------------------------ registration

    async def _hello(self, rid: bytes, msg: protocol.Message, now: float) -> None:
        if rid in self._ids:
            await self._send_raw(rid, protocol.make("error", code="duplicate_hello", msg="already registered"))
            return
        if not 0 < msg["port"] < 65536 or msg["group"] < 0:
            await self._send_raw(rid, protocol.make("error", code="bad_hello", msg="invalid port or group"))
            return
        peer_id = msg["peer_id"]
        try:
            effects = self._membership.register(peer_id, msg["group"], msg["host"], msg["port"], msg["name"], now)
        except ValueError as exc:
            await self._send_raw(rid, protocol.make("error", code="bad_hello", msg=str(exc)))
            return
        self._routes[peer_id] = rid
        self._ids[rid] = peer_id
        self._start_watcher(peer_id, msg["host"], msg["port"])
        await self._apply(effects)

    async def _rejoin(self, rid: bytes, msg: protocol.Message, now: float) -> None:
        """A member of a group run by a previous master (this master restarted)."""
        if rid in self._ids:
            await self._send_raw(rid, protocol.make("error", code="duplicate_hello", msg="already registered"))
            return
        try:
            if not 0 < msg["port"] < 65536 or msg["group"] < 0:
                raise ValueError("invalid port or group")
            info = RejoinInfo(
                epoch=int(msg["epoch"]),
                ring=tuple(int(p) for p in msg["ring"]),
                round=int(msg["round"]),
                revision=None if msg["revision"] < 0 else int(msg["revision"]),
                pending=tuple(((int(e), int(t), int(q)), bool(ok), str(k), str(m)) for e, t, q, ok, k, m in msg["pending"]),
                decided=tuple(
                    ((int(e), int(t), int(q)), bool(ok), str(k), str(m), int(w)) for e, t, q, ok, k, m, w in msg["decided"]
                ),
                waiting=_waiting(msg["waiting"]),
                answered=tuple(int(x) for x in msg["answered"]) if len(msg["answered"]) == 3 else (),
                rsag=bool(msg["rsag"]),
            )
        except (ValueError, TypeError) as exc:
            await self._send_raw(rid, protocol.make("error", code="bad_hello", msg=f"malformed rejoin: {exc}"))
            return
        peer_id = msg["peer_id"]
        try:
            effects = self._membership.rejoin(peer_id, msg["group"], msg["host"], msg["port"], msg["name"], info, now)
        except RejoinRefused as exc:
            await self._send_raw(rid, protocol.make("evicted", reason=str(exc)))
            return
        self._routes[peer_id] = rid
        self._ids[rid] = peer_id
        self._start_watcher(peer_id, msg["host"], msg["port"])
        await self._apply(effects)

    # ------------------------------------------------------------------ liveness

    def _start_watcher(self, peer_id: int, host: str, port: int) -> None:
        assert self._tasks is not None, "peers register only while serve() runs"
        self._watchers[peer_id] = self._tasks.create_task(self._watch_guarded(peer_id, host, port))

    async def _watch_guarded(self, peer_id: int, host: str, port: int) -> None:
        """A watcher's own bug ends that watcher (heartbeats still cover the peer), never
        the master: an exception in a TaskGroup task would cancel every task."""
        try:
            await self._watch(peer_id, host, port)
        except asyncio.CancelledError:
            raise
        except Exception:  # logged; the master serves on
            log.exception("liveness watcher of peer %d failed", peer_id)

    async def _watch(self, peer_id: int, host: str, port: int) -> None:
        """Holds a TCP connection to the peer's data port; EOF without a goodbye means the
        process died."""
        writer: asyncio.StreamWriter | None = None
        graceful = False
        try:
            reader, opened = await asyncio.wait_for(asyncio.open_connection(host, port), self.config.connect_timeout)
            writer = opened
            # The connection's handshake gave the kernel a round-trip sample: which
            # algorithm this peer's epochs use (pccl_py.master.algorithm).
            await self._apply(self._membership.note_rtt(peer_id, tcp_round_trip(opened.get_extra_info("socket"))))
            try:
                # epoch 2**64-1: a connection tied to no epoch, never retired by a new ring.
                await asyncio.wait_for(
                    auth.data_handshake(reader, opened, MASTER_PEER_ID, peer_id, 2**64 - 1, self._secret),
                    self.config.connect_timeout,
                )
            except PcclError as exc:
                log.warning("peer %d refused the liveness connection: %s", peer_id, exc)
                return
            while True:
                header = await reader.readexactly(_native.FRAME_HEADER_SIZE)
                if header[4] == _native.FRAME_TYPE_GOODBYE:
                    graceful = True
        except asyncio.CancelledError:
            raise
        except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
            if writer is None:
                log.warning("cannot reach peer %d's data port %s:%d (%s); relying on heartbeats", peer_id, host, port, exc)
                await self._apply(self._membership.note_rtt(peer_id, None))
                return
            if not graceful and peer_id in self._membership.peers:
                self._watchers.pop(peer_id, None)
                await self._apply(
                    self._membership.evict(peer_id, "crashed", "its connection closed", time.monotonic())
                )
        finally:
            if writer is not None:
                writer.close()

    # ------------------------------------------------------------------ effects

    async def _apply(self, effects: list[Effect]) -> None:
        self._carry_out(effects)

    def _carry_out(self, effects: list[Effect]) -> None:
        """Carries out the effects (sends never wait: send_nowait)."""
        for effect in effects:
            if isinstance(effect, Send):
                rid = self._routes.get(effect.to)
                if rid is not None:
                    self._send_now(rid, effect.msg)
            elif isinstance(effect, Log):
                self._events.emit(effect.kind, **effect.fields)
                self.metrics.observe(effect.kind, effect.fields)
                if effect.kind in ("join", "admit", "evict", "leave"):
                    self.metrics.set_peers(self._membership.status())
                if effect.kind in ("evict", "leave"):
                    self._forget(effect.fields["peer"], effect.kind == "evict", effect.fields.get("detail", ""))
                log.info("%s %s", effect.kind, effect.fields)

    def _forget(self, peer_id: int, evicted: bool, reason: str) -> None:
        rid = self._routes.pop(peer_id, None)
        if rid is not None:
            self._ids.pop(rid, None)
            if evicted and self._sock is not None:
                # Tell it, in case it is alive (a hung peer that wakes up).
                send_nowait(self._sock, [rid, protocol.encode(protocol.make("evicted", reason=reason))])
        watcher = self._watchers.pop(peer_id, None)
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()

    async def _send_raw(self, rid: bytes, msg: protocol.Message) -> None:
        self._send_now(rid, msg)

    def _send_now(self, rid: bytes, msg: protocol.Message) -> None:
        assert self._sock is not None
        send_nowait(self._sock, [rid, protocol.encode(msg)])

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        """A snapshot of what `pccl status` shows (peers, groups with their epoch, ring,
        pending peers, votes and measured bandwidths), taken on the master's own thread
        so it is consistent; plus this master's incarnation. Raises Timeout if the
        master does not answer within `timeout`."""
        loop = self._loop
        if loop is None or loop.is_closed():
            raise PcclError("the master is not running")

        async def take() -> dict[str, Any]:
            return self._status()

        future = asyncio.run_coroutine_threadsafe(take(), loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise Timeout(f"the master did not answer within {timeout}s") from None

    def _status(self) -> dict[str, Any]:
        state = self._membership.status()
        state["address"] = self.address
        state["incarnation"] = self._membership.incarnation
        return state


def _op_keys(raw: list[Any]) -> list[tuple[int, int, int]]:
    """The keys of a "done" batch; anything else in it is a protocol error."""
    keys = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 3 and all(type(v) is int and 0 <= v < 2**64 for v in item)):
            raise ProtocolError("done: every op must be [epoch, tag, seq] of unsigned integers")
        keys.append((item[0], item[1], item[2]))
    return keys


_BLOCKED_CALLS = ("update_topology", "pending_peers", "sync_shared_state", "optimize_topology", *protocol.DATA_CALLS)
_MAX_INFLIGHT = 1024


def _is_key(item: Any) -> bool:
    return len(item) == 3 and all(type(v) is int and 0 <= v < 2**64 for v in item)


def _blocked(msg: protocol.Message) -> tuple[tuple[int, int, int] | None, list[tuple[tuple[int, int, int], str]]]:
    """Checks and converts a "blocked" message: (its op or None, [(op, desc), ...])."""
    if msg["call"] not in _BLOCKED_CALLS:
        raise ProtocolError(f"blocked: unknown call {msg['call']!r}")
    raw = msg["op"]
    if raw and not _is_key(raw):
        raise ProtocolError("blocked: op must be [epoch, tag, seq] of unsigned integers or []")
    op = (raw[0], raw[1], raw[2]) if raw else None
    if msg["call"] in protocol.DATA_CALLS and op is None:
        raise ProtocolError(f"blocked: an {msg['call']} names its op")
    if len(msg["inflight"]) > _MAX_INFLIGHT:
        raise ProtocolError(f"blocked: more than {_MAX_INFLIGHT} ops in flight")
    inflight = []
    for item in msg["inflight"]:
        if not (isinstance(item, list) and len(item) == 4 and _is_key(item[:3]) and isinstance(item[3], str)):
            raise ProtocolError("blocked: every op in flight must be [epoch, tag, seq, desc]")
        inflight.append(((item[0], item[1], item[2]), item[3]))
    return op, inflight


def _waiting(raw: list[Any]) -> tuple[Any, ...]:
    if len(raw) == 4 and raw[0] == "pending":
        return ("pending", int(raw[1]), int(raw[2]), int(raw[3]))
    if len(raw) == 2 and raw[0] == "vote":
        return ("vote", int(raw[1]))
    return ()


def _submission(peer_id: int, msg: protocol.Message) -> Submission:
    """Checks and converts the entries of a "sync" message (ProtocolError if malformed)."""
    try:
        strategy = SyncStrategy(msg["strategy"])
        entries = []
        for item in msg["entries"]:
            name, dtype, shape, nbytes, digest = item
            if not (isinstance(name, str) and isinstance(dtype, str) and isinstance(nbytes, int)
                    and isinstance(digest, int) and isinstance(shape, list)
                    and all(isinstance(d, int) and not isinstance(d, bool) for d in shape)):
                raise TypeError
            entries.append(EntryMeta(name, dtype, tuple(shape), nbytes, digest))
    except (ValueError, TypeError):
        raise ProtocolError("sync: malformed strategy or entries") from None
    return Submission(peer_id, msg["revision"], strategy, tuple(entries))


def _probe_results(msg: protocol.Message) -> list[tuple[int, float]]:
    """Checks and converts the results of a "probe_done" message (ProtocolError if
    malformed): [[sender peer id, bytes per second], ...]."""
    results = []
    for item in msg["results"]:
        if not (isinstance(item, list) and len(item) == 2 and type(item[0]) is int
                and isinstance(item[1], (int, float)) and not isinstance(item[1], bool)):
            raise ProtocolError("probe_done: malformed results")
        results.append((item[0], float(item[1])))
    return results
