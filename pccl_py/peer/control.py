"""A peer's channel to the master: a background event-loop thread that owns the
ZeroMQ DEALER socket, sends heartbeats and the "done" batches, and hands what the
master says to the peer's Session (pccl_py.session), which owns that state. Callers
on other threads send through send().

Ownership: the Communicator creates, starts and closes it; close() stops the thread,
cancels its tasks, closes the socket and joins the rejoin thread it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from pccl_py.config import Config
from pccl_py.errors import Aborted, AuthError, PcclError, Timeout
from pccl_py.peer.session import OpKey, Session
from pccl_py.wire import auth, beats, protocol
from pccl_py.wire.aio import monitor_connections, new_event_loop, send_nowait, watch_connections

log = logging.getLogger(__name__)

# How long the channel listens for the answer to its join knock (the welcome, which
# comes after 3.5 round trips, brings the same).
KNOCK_WAIT = 10.0
KNOCK_RESOLVE = 1.0  # the most the knock waits for the master's name to resolve


class ControlChannel:
    def __init__(
        self,
        master: str,
        config: Config,
        session: Session,
        on_master_restart: Callable[[], None],
        on_topology: Callable[[protocol.Message], None] | None = None,
        on_prepare: Callable[[list[tuple[int, str, int]], int | None, int], None] | None = None,
        knock: tuple[bytes, Callable[[bytes], bool]] | None = None,
    ) -> None:
        host, _, port = master.rpartition(":")
        if not host or not port.isdigit():
            raise PcclError(f"master address must be host:port, got {master!r}")
        self._endpoint = f"tcp://{host}:{port}"
        self._config = config
        self._session = session
        self._on_master_restart = on_master_restart  # run on a rejoin thread this channel owns
        self._on_topology = on_topology
        self._on_prepare = on_prepare  # a join ahead: (peers, epoch or None, sharers); must not block
        # The join knock (pccl_py.wire.knock): the datagram, and what takes a datagram
        # that comes back (True: it was the answer); sent once as the channel starts.
        self._knock = knock
        self._knock_endpoint: asyncio.DatagramTransport | None = None
        self._master_port = int(port)
        self._rejoin_thread: threading.Thread | None = None  # owned: joined by close()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None
        self._ready = threading.Event()
        self._closed = False
        # The loop thread's view of the master: when it last said anything (it answers
        # every heartbeat) over TCP, and whether the TCP connection to it is up.
        self._heard = time.monotonic()
        self._link_up = False
        # Heartbeat datagrams (pccl_py.wire.beats): the endpoint, where it sends to
        # ((port, peer id, token) of the welcome), and whether one of the master's answers arrived.
        self._master_host = host.strip("[]")
        self._beats: asyncio.DatagramTransport | None = None
        self._beat_target: tuple[int, int, bytes] | None = None
        self._beat_address: Any = None  # the master's beat port, resolved
        self._beats_answered = False
        self._heard_datagram = 0.0  # when the last answer came
        self._beats_since = 0.0
        self._beats_warned = False

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
        self._session.close()  # every wait ends, a rejoin waiting on the master too (Aborted)
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
        # The knock goes before the control connection starts, so that it arrives first.
        knock_answered = await self._send_knock(*self._knock) if self._knock is not None else None
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.MAXMSGSIZE, self._config.max_message_bytes)
        # An unguessable routing id: the master binds authentication to it, and ids the
        # ROUTER would assign are sequential.
        sock.setsockopt(zmq.ROUTING_ID, b"\x01" + auth.new_nonce())
        monitor = monitor_connections(sock)  # before connect: the first connection is seen too
        sock.connect(self._endpoint)
        self._sock = sock
        self._ready.set()
        try:
            async with asyncio.TaskGroup() as tasks:
                loops = [
                    tasks.create_task(self._receive_loop(sock)),
                    tasks.create_task(self._heartbeat_loop(sock)),
                    tasks.create_task(self._commit_report_loop()),
                    tasks.create_task(watch_connections(sock, monitor, self._on_link)),
                ]
                if knock_answered is not None:
                    loops.append(tasks.create_task(self._await_knock_answer(knock_answered)))
                await self._stopped.wait()
                for task in loops:
                    task.cancel()
        finally:
            self._sock = None
            if self._beats is not None:
                self._beats.close()
                self._beats = None
            self._close_knock()
            monitor.close(linger=0)  # its task may never have run: ctx.term() waits for every socket
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
        if self._session.note_committed(key, world):
            self.flush_committed()

    def flush_committed(self) -> None:
        """Sends the committed ops not reported yet (any thread; ordered before any
        message sent after it)."""
        batch = self._session.take_committed()
        if batch:
            with contextlib.suppress(Aborted):
                self.send(protocol.make("done", ops=batch))

    async def _commit_report_loop(self) -> None:
        while True:
            await asyncio.sleep(self._config.commit_report_interval)
            if self._session.has_committed():
                self.flush_committed()

    async def _heartbeat_loop(self, sock: zmq.asyncio.Socket) -> None:
        """Sends a heartbeat every interval, over the control connection and as a
        datagram, and watches the master's answers: a master silent for its timeout
        over a connection that stayed up means this peer is cut off (the master evicts
        it within the same bound)."""
        beat = protocol.encode(protocol.make("hb"))
        ticked = time.monotonic()
        while True:
            liveness = self._session.liveness()  # the master's pace, once it welcomed us
            interval = min(self._config.heartbeat_interval, liveness[0]) if liveness else self._config.heartbeat_interval
            await asyncio.sleep(interval)
            now = time.monotonic()
            if now - ticked > 2 * interval:
                # This process did not run meanwhile (stopped, or starved): that silence
                # is its own, not the master's.
                self._heard = max(self._heard, now - interval)
                self._heard_datagram = max(self._heard_datagram, now - interval)
            ticked = now
            if liveness is not None and self._session.evicted() is None:
                with contextlib.suppress(zmq.ZMQError):
                    await sock.send(beat, flags=zmq.NOBLOCK)
                await self._send_beat(now, liveness[1])
                self._check_master(now, liveness[1])

    async def _send_beat(self, now: float, timeout: float) -> None:
        """One heartbeat datagram to the master (pccl_py.wire.beats), opening the
        endpoint on the first, and again when a new welcome names another target."""
        target = self._session.beat_target() if self._config.heartbeat_datagrams else None
        if target != self._beat_target:
            if self._beats is not None:
                self._beats.close()
                self._beats = None
            self._beat_target, self._beats_answered, self._beats_since = target, False, now
            if target is not None:
                # Not connected: a master on a host with several addresses may answer
                # from another one than we sent to (the token, not the address, tells).
                loop = asyncio.get_running_loop()
                try:
                    family, _, _, _, self._beat_address = (
                        await loop.getaddrinfo(self._master_host, target[0], type=socket.SOCK_DGRAM)
                    )[0]
                    self._beats, _ = await loop.create_datagram_endpoint(lambda: _Datagrams(self._beat_answered), family=family)
                except OSError as exc:
                    log.warning("heartbeat datagrams to %s:%d: %s; TCP heartbeats only", self._master_host, target[0], exc)
        if self._beats is None or self._beat_target is None:
            return
        _, peer_id, token = self._beat_target
        self._beats.sendto(beats.encode(beats.BEAT, peer_id, token), self._beat_address)
        if not self._beats_answered and not self._beats_warned and now - self._beats_since > timeout:
            self._beats_warned = True
            log.warning(
                "the master answers none of this peer's heartbeat datagrams (UDP port %d of %s): is UDP "
                "filtered on the way? Partitions are then detected over TCP, %gs later",
                self._beat_target[0], self._master_host, beats.STREAM_ALLOWANCE,
            )

    async def _send_knock(self, datagram: bytes, on_answer: Callable[[bytes], bool]) -> asyncio.Event | None:
        """Knocks once at the master's heartbeat port (its control port's number); what
        comes back goes to `on_answer`. Returns the event set once it took an answer, or
        None where no knock could go (a name that does not resolve within a second).
        Nothing depends on it: the welcome brings the same."""
        loop = asyncio.get_running_loop()
        answered = asyncio.Event()

        def received(data: bytes) -> None:
            if on_answer(data):
                answered.set()

        try:
            resolved = loop.getaddrinfo(self._master_host, self._master_port, type=socket.SOCK_DGRAM)
            family, _, _, _, address = (await asyncio.wait_for(resolved, KNOCK_RESOLVE))[0]
            self._knock_endpoint, _ = await loop.create_datagram_endpoint(lambda: _Datagrams(received), family=family)
        except (OSError, TimeoutError) as exc:
            log.debug("no join knock to %s:%d: %r", self._master_host, self._master_port, exc)
            return None
        self._knock_endpoint.sendto(datagram, address)
        return answered

    async def _await_knock_answer(self, answered: asyncio.Event) -> None:
        """Listens for the knock's answer until it came or KNOCK_WAIT passed."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(answered.wait(), KNOCK_WAIT)
        self._close_knock()

    def _close_knock(self) -> None:
        if self._knock_endpoint is not None:
            self._knock_endpoint.close()
            self._knock_endpoint = None

    def _beat_answered(self, data: bytes) -> None:
        answer = beats.decode(data, beats.ANSWER)
        target = self._beat_target
        if answer is None or target is None or answer[0] != target[1] or not beats.same_token(answer[1], target[2]):
            return
        self._heard_datagram = time.monotonic()
        self._beats_answered = True

    def _check_master(self, now: float, timeout: float) -> None:
        """The master's own rule (Membership.silent), from this side: nothing heard
        either way for the timeout, once its datagram answers arrive; nothing over TCP
        for the timeout plus a retransmission's wait."""
        if not self._link_up:
            # A connection that is down is a master that stopped or restarted (its
            # host refused or reset it): peers wait for it to come back (rejoin.py).
            return
        stream_limit = timeout + beats.STREAM_ALLOWANCE
        either = now - max(self._heard, self._heard_datagram)
        if now - self._heard > stream_limit:
            silent, limit, how = now - self._heard, stream_limit, "over TCP "
        elif self._beats_answered and either > timeout:
            silent, limit, how = either, timeout, ""
        else:
            return
        reason = (
            f"nothing heard from the master {how}for {silent:.1f}s (the limit is {limit:g}s) "
            "while the connection to it stayed up: a silent network partition, or a hung master; "
            "the master evicts a peer it cannot hear"
        )
        doomed = self._session.cut_off(reason)
        log.warning("cut off from the group: %s", reason)
        for handle in doomed:
            handle.abort("this peer is cut off from the master")
        # If the link heals before the master gave up on us, it hears that we left.
        self._send_now(protocol.encode(protocol.make("leave")))

    def _on_link(self, up: bool) -> None:
        self._link_up = up
        if up:
            self._heard = time.monotonic()  # a new connection: the master's silence starts now

    async def _receive_loop(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            data = await sock.recv()
            self._heard = time.monotonic()
            try:
                msg = protocol.decode(data, self._config.max_message_bytes)
            except Exception as exc:  # noqa: BLE001 - whatever sits at the master's address, this thread lives on
                log.warning("dropped a bad message from the master: %s", exc)
                continue
            try:
                self._handle(msg)
            except Exception:
                log.exception("error handling %s from the master", msg.get("t"))

    def _handle(self, msg: protocol.Message) -> None:
        """Records `msg` in the session, then does what that asks for: stop data-plane
        ops the master has given up on, repeat a request, rejoin a restarted master."""
        reaction = self._session.record(msg)
        if reaction.resend is not None:
            self._send_now(protocol.encode(reaction.resend))
        for handle in reaction.abort:
            handle.abort(f"superseded by the master ({msg['t']})", keep_idle_to=reaction.keep_idle_to)
        if reaction.rejoin:
            log.warning("the master restarted (incarnation %d); rejoining it", msg["master"])
            previous = self._rejoin_thread
            if previous is not None and previous.is_alive():
                log.warning("a rejoin of an earlier master incarnation is still running")
            self._rejoin_thread = threading.Thread(target=self._on_master_restart, name="pccl-rejoin", daemon=True)
            self._rejoin_thread.start()
        if reaction.prepare and self._on_prepare is not None:
            self._on_prepare(reaction.prepare, reaction.prepare_epoch, reaction.prepare_sharers)
        if msg["t"] == "error":
            log.warning("master error: %s: %s", msg["code"], msg["msg"])
        elif msg["t"] == "topology" and self._on_topology is not None:
            self._on_topology(msg)

    # ------------------------------------------------------------------ authentication

    def authenticate(self, secret: bytes, deadline: float, then: protocol.Message | None = None) -> None:
        """Mutual challenge-response with the master (pccl_py.auth); call before "hello"
        or "status". Raises AuthError when the master does not know the secret, has
        none, or refuses ours; Timeout at the deadline. `then` (a hello) is sent right
        behind this peer's proof, without waiting for the verdict: the master, proven
        already, handles both in order on this connection and refuses it if the proof
        fails."""
        session = self._session
        session.reset_auth()
        nonce = auth.new_nonce()
        self.send(protocol.make("auth_begin", nonce=nonce))

        def auth_error() -> None:
            err = session.last_error()
            if err is not None and err["code"] == "auth":
                raise AuthError(f"the master at {self._endpoint} refused this client: {err['msg']}")

        def challenged() -> protocol.Message | None:
            auth_error()
            return session.auth_challenge()

        challenge = session.wait(challenged, deadline, "the master's authentication challenge")
        if not challenge["proof"]:
            raise AuthError(f"the master at {self._endpoint} has no shared secret; refusing to join it with one")
        if not auth.verify(auth.master_proof(secret, nonce, challenge["nonce"]), challenge["proof"]):
            raise AuthError(f"the master at {self._endpoint} holds a different shared secret (its proof does not match)")
        self.send(protocol.make("auth", mac=auth.client_proof(secret, challenge["nonce"], nonce)))
        if then is not None:
            self.send(then)

        def accepted() -> bool | None:
            auth_error()
            return session.auth_ok()

        session.wait(accepted, deadline, "the master's authentication verdict")


class _Datagrams(asyncio.DatagramProtocol):
    """A datagram endpoint that hands each datagram to `on_datagram`: the master's
    answers to heartbeats, or to the join knock."""

    def __init__(self, on_datagram: Callable[[bytes], None]) -> None:
        self._on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr: object) -> None:
        self._on_datagram(data)

    def error_received(self, exc: Exception) -> None:
        pass  # e.g. ICMP port unreachable while the master restarts: the next beat tries again
