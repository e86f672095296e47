"""asyncio helpers shared by both ends of the control plane (the master's server and
a peer's control channel): the event loop they run on and the one way they send."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

# Linux >= 6.15: the cap on a socket's retransmission timeout (the stdlib may not name
# it yet). native/src/transport/tcp.cpp sets the same cap on the data plane's sockets.
TCP_RTO_MAX_MS = getattr(socket, "TCP_RTO_MAX_MS", 44)
RTO_MAX_MS = 1000  # the smallest value the kernel accepts


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop when uvloop is installed, else asyncio's default."""
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop()


def send_nowait(sock: zmq.asyncio.Socket, frames: list[bytes]) -> None:
    """A non-blocking send from the socket's own loop thread (a message that cannot go
    now is dropped, as a lost message would be). It goes through pyzmq's asyncio
    wrapper on purpose: the socket's file descriptor is edge-triggered, a send can
    consume the edge of a message that arrived meanwhile, and the wrapper then re-checks
    the socket's events. A raw zmq.Socket.send does not, and that message would wait
    for the next unrelated event (up to a heartbeat interval)."""
    try:
        future: Any = sock.send_multipart(frames, flags=zmq.NOBLOCK)  # an asyncio future (pyzmq's stubs say Awaitable)
    except zmq.ZMQError:  # closed meanwhile
        return
    if future.done():
        _retrieve(future)
    else:
        future.add_done_callback(_retrieve)


def _retrieve(future: Any) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: a failed send is not logged as never retrieved


def cap_retransmit_backoff(fd: int) -> bool:
    """Caps the retransmission timeout of TCP socket `fd` (one ZeroMQ opened) at 1 s.
    Exponential backoff otherwise leaves the next retransmission seconds away when a
    silent link heals: a 2.5 s outage would keep heartbeats from arriving for 4-5 s.
    Returns False where the kernel refuses (older than 6.15) or `fd` is not TCP."""
    try:
        dup = socket.socket(fileno=os.dup(fd))  # the same socket: its options are shared
    except OSError:
        return False  # closed meanwhile
    with dup:
        if dup.family not in (socket.AF_INET, socket.AF_INET6) or dup.type != socket.SOCK_STREAM:
            return False
        try:
            dup.setsockopt(socket.IPPROTO_TCP, TCP_RTO_MAX_MS, RTO_MAX_MS)
        except OSError:
            return False
    return True


def monitor_connections(sock: zmq.asyncio.Socket) -> zmq.asyncio.Socket:
    """The monitor watch_connections() reads; take it before `sock` connects or binds,
    or the first connection's events may be gone before anyone listens."""
    monitor: zmq.asyncio.Socket = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
    return monitor


async def watch_connections(
    sock: zmq.asyncio.Socket, monitor: zmq.asyncio.Socket, on_change: Callable[[bool], None] | None = None
) -> None:
    """Runs until cancelled: caps the retransmission backoff of every TCP connection
    `sock` makes or accepts, and tells `on_change` when a connection comes up (True) or
    goes down (False). ZeroMQ has no option for the cap; its monitor (from
    monitor_connections) hands over each new connection's file descriptor."""
    try:
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            if event["event"] in (zmq.EVENT_CONNECTED, zmq.EVENT_ACCEPTED):
                cap_retransmit_backoff(int(event["value"]))
                if on_change is not None:
                    on_change(True)
            elif on_change is not None:
                on_change(False)
    finally:
        with contextlib.suppress(zmq.ZMQError):
            sock.disable_monitor()
        monitor.close(linger=0)


# struct tcp_info (linux/tcp.h): eight one-byte fields, then u32s, tcpi_rtt (the
# smoothed round trip, microseconds) the 16th of them.
_TCPI_RTT_OFFSET = 8 + 15 * 4


def tcp_round_trip(sock: Any) -> float | None:
    """The kernel's smoothed round-trip estimate of a connected TCP socket (seconds), or
    None where the platform does not say (not Linux) or has no sample yet."""
    tcp_info = getattr(socket, "TCP_INFO", None)
    if tcp_info is None or sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, tcp_info, 104)
    except OSError:
        return None
    if len(raw) < _TCPI_RTT_OFFSET + 4:
        return None
    micros = int.from_bytes(raw[_TCPI_RTT_OFFSET : _TCPI_RTT_OFFSET + 4], sys.byteorder)  # host order
    return micros * 1e-6 if micros > 0 else None

