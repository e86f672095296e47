"""A peer's channel to the master: a background event-loop thread that owns the
ZeroMQ DEALER socket, sends heartbeats, and records what the master says (topology,
op outcomes, answers, eviction). Callers on other threads send through send() and
wait on the recorded state with wait(), always with a deadline.

Ownership: the Communicator creates, starts and closes it; close() stops the thread,
cancels its tasks and closes the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import zmq
import zmq.asyncio

from pccl_py import auth, protocol
from pccl_py.config import Config
from pccl_py.errors import Aborted, AuthError, CollectiveMismatch, PcclError, Timeout
from pccl_py.master import new_event_loop, send_nowait

log = logging.getLogger(__name__)

T = TypeVar("T")
OpKey = tuple[int, int, int]
_MAX_KEPT_OUTCOMES = 4096
_MAX_DONE_BATCH = 1024  # committed ops per "done" message; a fuller batch goes at once


@dataclass(frozen=True)
class Topology:
    epoch: int
    ring: tuple[tuple[int, str, int], ...]  # (peer id, host, port) in ring order
    reason: str

    def rank_of(self, peer_id: int) -> int | None:
        for i, (pid, _, _) in enumerate(self.ring):
            if pid == peer_id:
                return i
        return None


class ControlChannel:
    def __init__(self, master: str, config: Config, on_message: Callable[[protocol.Message], None]) -> None:
        host, _, port = master.rpartition(":")
        if not host or not port.isdigit():
            raise PcclError(f"master address must be host:port, got {master!r}")
        self._endpoint = f"tcp://{host}:{port}"
        self._config = config
        self._on_message = on_message
        self.cond = threading.Condition()
        # State written by the loop thread (under cond), read by callers.
        self.welcome: protocol.Message | None = None
        self.topology: Topology | None = None
        self.vote_rounds = 0
        self.round = 0  # the group's op-numbering round of the latest admission/vote
        self.outcomes: OrderedDict[OpKey, protocol.Message] = OrderedDict()
        # Outcomes already taken by their op: a second copy (the master answers a report
        # that crossed its push) is dropped.
        self.consumed: OrderedDict[OpKey, None] = OrderedDict()
        self.pending_answers: dict[int, int] = {}
        self.evicted: str | None = None
        self.sync_plan: protocol.Message | None = None
        self.sync_result: protocol.Message | None = None
        self.probe: protocol.Message | None = None  # the latest probe task (optimize_topology)
        self.last_error: protocol.Message | None = None
        # Mismatched collectives: how many "mismatch" verdicts arrived, and the latest.
        self.mismatches = 0
        self.mismatch: protocol.Message | None = None
        self.auth_challenge: protocol.Message | None = None
        self.auth_ok = False
        # Master restart: the verdicts received lately (a rejoin hands them to the new
        # master), the collective request a caller still waits on (sent again once the
        # group re-formed), the incarnation we rejoin, and who builds the rejoin.
        self.recent_verdicts: deque[protocol.Message] = deque(maxlen=1024)
        # Ops committed through the commit vote, not yet reported ("done" batches).
        self._committed: list[list[int]] = []
        self.outstanding: protocol.Message | None = None
        self.recovering = False
        self.rejoin_target: int | None = None
        self.on_master_restart: Callable[[], None] | None = None
        self._rejoin_thread: threading.Thread | None = None  # owned: joined by close()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None
        self._ready = threading.Event()
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float) -> None:
        self._thread = threading.Thread(target=self._thread_main, name="pccl-control", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise Timeout("control channel did not start")

    def close(self, timeout: float = 5.0) -> None:
        """Flushes queued messages (up to a second), then stops the thread."""
        self._closed = True
        if self._loop is not None and self._stopped is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self.cond:
            self.cond.notify_all()  # a rejoin waiting on the master gives up (Aborted)
        rejoin, self._rejoin_thread = self._rejoin_thread, None
        if rejoin is not None and rejoin is not threading.current_thread():
            rejoin.join(timeout)

    def _thread_main(self) -> None:
        loop = new_event_loop()
        try:
            loop.run_until_complete(self._main())
        except Exception:
            log.exception("control channel failed")
        finally:
            loop.close()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.MAXMSGSIZE, self._config.max_message_bytes)
        # An unguessable routing id: the master binds authentication to it, and ids the
        # ROUTER would assign are sequential.
        sock.setsockopt(zmq.ROUTING_ID, b"\x01" + auth.new_nonce())
        sock.connect(self._endpoint)
        self._sock = sock
        self._ready.set()
        try:
            async with asyncio.TaskGroup() as tasks:
                receiver = tasks.create_task(self._receive_loop(sock))
                beater = tasks.create_task(self._heartbeat_loop(sock))
                reporter = tasks.create_task(self._commit_report_loop())
                await self._stopped.wait()
                receiver.cancel()
                beater.cancel()
                reporter.cancel()
        finally:
            self._sock = None
            sock.close(linger=1000)
            ctx.term()

    # ------------------------------------------------------------------ I/O

    def send(self, msg: protocol.Message) -> None:
        """Queues `msg` for the master (any thread)."""
        if self._loop is None or self._closed:
            raise Aborted("the control channel is closed")
        data = protocol.encode(msg)
        try:
            self._loop.call_soon_threadsafe(self._send_now, data)
        except RuntimeError:
            raise Aborted("the control channel is closed") from None

    def _send_now(self, data: bytes) -> None:
        if self._sock is not None:
            send_nowait(self._sock, [data])  # we are its loop's thread

    def note_committed(self, key: OpKey, world: int) -> None:
        """Op `key` committed through the commit vote (any thread): it joins the next
        "done" batch, and the verdicts a restarted master is told about."""
        with self.cond:
            self._committed.append([key[0], key[1], key[2]])
            self.recent_verdicts.append(
                {"epoch": key[0], "tag": key[1], "seq": key[2], "ok": True, "kind": "", "msg": "", "world": world}
            )
            full = len(self._committed) >= _MAX_DONE_BATCH
        if full:
            self.flush_committed()

    def flush_committed(self) -> None:
        """Sends the committed ops not reported yet (any thread; ordered before any
        message sent after it)."""
        with self.cond:
            batch, self._committed = self._committed, []
        if batch and self.welcome is not None:
            with contextlib.suppress(Aborted):
                self.send(protocol.make("done", ops=batch))

    async def _commit_report_loop(self) -> None:
        while True:
            await asyncio.sleep(self._config.commit_report_interval)
            if self._committed:
                self.flush_committed()

    async def _heartbeat_loop(self, sock: zmq.asyncio.Socket) -> None:
        beat = protocol.encode(protocol.make("hb"))
        while True:
            await asyncio.sleep(self._config.heartbeat_interval)
            if self.welcome is not None and self.evicted is None:
                with contextlib.suppress(zmq.ZMQError):
                    await sock.send(beat, flags=zmq.NOBLOCK)

    async def _receive_loop(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            data = await sock.recv()
            try:
                msg = protocol.decode(data, self._config.max_message_bytes)
            except Exception as exc:  # noqa: BLE001 - whatever sits at the master's address, this thread lives on
                log.warning("dropped a bad message from the master: %s", exc)
                continue
            try:
                self._record(msg)
                self._on_message(msg)
            except Exception:
                log.exception("error handling %s from the master", msg.get("t"))

    def _record(self, msg: protocol.Message) -> None:
        kind = msg["t"]
        with self.cond:
            if kind == "welcome":
                self.welcome = msg
            elif kind == "unknown":
                self._unknown(msg["master"])
            elif kind == "topology":
                ring = tuple((int(p[0]), str(p[1]), int(p[2])) for p in msg["ring"])
                if self.topology is None or msg["epoch"] >= self.topology.epoch:
                    self.topology = Topology(msg["epoch"], ring, msg["reason"])
                if self.recovering:
                    # The group re-formed under a restarted master: repeat the request a
                    # caller still waits on (the old master took it to its grave).
                    self.recovering = False
                    if self.outstanding is not None:
                        self._send_now(protocol.encode(self.outstanding))
                if msg["vote"]:
                    self.vote_rounds += 1
                    if self.outstanding is not None and self.outstanding["t"] == "vote":
                        self.outstanding = None  # answered: nothing to repeat
                self.round = max(self.round, msg["round"])
                # Outcomes of long-gone epochs will never be asked for.
                for key in [k for k in self.outcomes if k[0] < msg["epoch"] - 4]:
                    del self.outcomes[key]
            elif kind == "outcome":
                key = (msg["epoch"], msg["tag"], msg["seq"])
                self.recent_verdicts.append(msg)
                if key not in self.consumed:
                    self.outcomes[key] = msg
                while len(self.outcomes) > _MAX_KEPT_OUTCOMES:
                    self.outcomes.popitem(last=False)
            elif kind == "sync_plan":
                self.sync_plan = msg
                if self.outstanding is not None and self.outstanding["t"] == "sync":
                    self.outstanding = None
            elif kind == "sync_result":
                self.sync_result = msg
                if self.outstanding is not None and self.outstanding["t"] in ("sync", "sync_done"):
                    self.outstanding = None
            elif kind == "probe":
                self.probe = msg
            elif kind == "auth_challenge":
                self.auth_challenge = msg
            elif kind == "auth_ok":
                self.auth_ok = True
            elif kind == "pending_count":
                self.pending_answers[msg["query"]] = msg["count"]
                out = self.outstanding
                if out is not None and out["t"] == "pending" and out["query"] == msg["query"]:
                    self.outstanding = None
            elif kind == "mismatch":
                self.mismatches += 1
                self.mismatch = msg
                self.round = max(self.round, msg["round"])
                self.outstanding = None  # the master dropped the call: nothing to repeat
            elif kind == "evicted":
                if self.welcome is not None:
                    self.evicted = msg["reason"]
            elif kind == "error":
                self.last_error = msg
                log.warning("master error: %s: %s", msg["code"], msg["msg"])
            self.cond.notify_all()

    def _unknown(self, master: int) -> None:
        """The master does not know us (under cond): evicted, if it is the master that
        welcomed us; otherwise the master restarted, and we rejoin it (once per
        incarnation, on a thread of its own: rejoining waits for replies)."""
        if self.welcome is None or self.evicted is not None:
            return
        if master == self.welcome["master"]:
            self.evicted = "unknown peer: not registered or evicted"
            return
        if master == self.rejoin_target:
            return  # already rejoining this one
        self.rejoin_target = master
        self.recovering = True
        log.warning("the master restarted (incarnation %d); rejoining it", master)
        if self.on_master_restart is not None:
            previous = self._rejoin_thread
            if previous is not None and previous.is_alive():
                log.warning("a rejoin of an earlier master incarnation is still running")
            self._rejoin_thread = threading.Thread(target=self.on_master_restart, name="pccl-rejoin", daemon=True)
            self._rejoin_thread.start()

    # ------------------------------------------------------------------ authentication

    def authenticate(self, secret: bytes, deadline: float) -> None:
        """Mutual challenge-response with the master (pccl_py.auth); call before "hello"
        or "status". Raises AuthError when the master does not know the secret, has
        none, or refuses ours; Timeout at the deadline."""
        with self.cond:
            self.auth_challenge, self.auth_ok, self.last_error = None, False, None
        nonce = auth.new_nonce()
        self.send(protocol.make("auth_begin", nonce=nonce))

        def auth_error() -> None:
            err = self.last_error
            if err is not None and err["code"] == "auth":
                raise AuthError(f"the master at {self._endpoint} refused this client: {err['msg']}")

        def challenged() -> protocol.Message | None:
            auth_error()
            return self.auth_challenge

        challenge = self.wait(challenged, deadline, "the master's authentication challenge")
        if not challenge["proof"]:
            raise AuthError(f"the master at {self._endpoint} has no shared secret; refusing to join it with one")
        if not auth.verify(auth.master_proof(secret, nonce, challenge["nonce"]), challenge["proof"]):
            raise AuthError(f"the master at {self._endpoint} holds a different shared secret (its proof does not match)")
        self.send(protocol.make("auth", mac=auth.client_proof(secret, challenge["nonce"], nonce)))

        def accepted() -> bool | None:
            auth_error()
            return True if self.auth_ok else None

        self.wait(accepted, deadline, "the master's authentication verdict")

    # ------------------------------------------------------------------ waiting

    def wait(
        self,
        predicate: Callable[[], T | None],
        deadline: float,
        what: str,
        *,
        mismatches: int | None = None,
        on_slow: Callable[[], None] | None = None,
    ) -> T:
        """Waits until predicate() (evaluated under the lock) returns non-None; raises
        Timeout at the deadline and Aborted if this peer is evicted or closed. With
        `mismatches` (the count when the collective call began), raises
        CollectiveMismatch once the master fails the call as mismatched; `on_slow` is
        called once the wait has lasted Config.blocked_report_after."""
        slow_at = time.monotonic() + self._config.blocked_report_after if on_slow is not None else None
        with self.cond:
            while True:
                value = predicate()
                if value is not None:
                    return value
                if self.evicted is not None:
                    raise Aborted(f"this peer was evicted by the master: {self.evicted}")
                if self._closed:
                    raise Aborted("the communicator is closed")
                if mismatches is not None and self.mismatches > mismatches:
                    assert self.mismatch is not None
                    raise CollectiveMismatch(self.mismatch["msg"])
                now = time.monotonic()
                remaining = deadline - now
                if remaining <= 0:
                    raise Timeout(f"timed out waiting for {what}")
                if slow_at is not None and now >= slow_at:
                    slow_at = None
                    assert on_slow is not None
                    on_slow()
                    continue
                self.cond.wait(remaining if slow_at is None else min(remaining, slow_at - now))

    def take_outcome(self, key: OpKey) -> protocol.Message | None:
        """Removes and returns the outcome of `key` if known (call under cond)."""
        msg = self.outcomes.pop(key, None)
        if msg is not None:
            self.consumed[key] = None
            while len(self.consumed) > _MAX_KEPT_OUTCOMES:
                self.consumed.popitem(last=False)
        return msg

    def state(self) -> dict[str, Any]:
        with self.cond:
            return {
                "topology": self.topology,
                "evicted": self.evicted,
                "outcomes": len(self.outcomes),
            }
