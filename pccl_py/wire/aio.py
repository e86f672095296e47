"""asyncio helpers shared by both ends of the control plane (the master's server and
a peer's control channel): the event loop they run on and the one way they send."""

from __future__ import annotations

import asyncio
from typing import Any

import zmq
import zmq.asyncio


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
