"""The master's side of the heartbeat datagrams (pccl_py.wire.beats): a UDP port where
a datagram carrying a registered peer's token counts as that peer's heartbeat and is
answered, so that the peer hears the master too. Newcomers' knocks (pccl_py.wire.knock)
arrive on the same port and go to the server."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, cast

from pccl_py.master.membership import Membership
from pccl_py.wire import beats, knock

# A knock's handler: the datagram in, the answer to send back (None: none).
KnockHandler = Callable[[bytes], "bytes | None"]

log = logging.getLogger(__name__)


class _BeatEndpoint(asyncio.DatagramProtocol):
    def __init__(self, membership: Membership, on_knock: KnockHandler | None) -> None:
        self._membership = membership
        self._on_knock = on_knock
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)  # uvloop's does not subclass it

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self._transport is None:
            return
        if data[:4] == knock.KNOCK:
            answer = self._on_knock(data) if self._on_knock is not None else None
            if answer is not None:
                self._transport.sendto(answer, addr)
            return
        beat = beats.decode(data, beats.BEAT)
        if beat is None:
            return
        peer_id, token = beat
        if self._membership.beat_datagram(peer_id, token, time.monotonic()):
            self._transport.sendto(beats.encode(beats.ANSWER, peer_id, token), addr)

    def error_received(self, exc: Exception) -> None:
        pass  # an ICMP error for an answer (the peer went away): its heartbeats stop too


async def open_beats(
    membership: Membership, host: str, control_port: int, on_knock: KnockHandler | None = None
) -> asyncio.DatagramTransport | None:
    """Binds the UDP port for heartbeat datagrams (on the running loop, whose thread
    owns `membership`): `control_port`'s number where it is free, else any. Sets
    membership.beat_port, which every welcome names. None (peers then beat over TCP
    only) where neither binds; the caller closes the transport."""
    loop = asyncio.get_running_loop()
    bind_host = "0.0.0.0" if host in ("*", "") else host.strip("[]")
    for port in (control_port, 0):
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _BeatEndpoint(membership, on_knock), local_addr=(bind_host, port)
            )
        except OSError as exc:
            log.debug("heartbeat datagrams: cannot bind %s:%d (%s)", bind_host, port, exc)
            continue
        membership.beat_port = int(transport.get_extra_info("sockname")[1])
        return cast(asyncio.DatagramTransport, transport)
    log.warning(
        "no UDP port for heartbeat datagrams: peers are judged by TCP heartbeats (+%gs)",
        beats.STREAM_ALLOWANCE,
    )
    return None
