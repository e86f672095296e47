"""The master's side of the heartbeat datagrams (pccl_py.wire.beats): a UDP port where
a datagram carrying a registered peer's token counts as that peer's heartbeat and is
answered, so that the peer hears the master too."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, cast

from pccl_py.master.membership import Membership
from pccl_py.wire import beats

log = logging.getLogger(__name__)


class _BeatEndpoint(asyncio.DatagramProtocol):
    def __init__(self, membership: Membership) -> None:
        self._membership = membership
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)  # uvloop's does not subclass it

    def datagram_received(self, data: bytes, addr: Any) -> None:
        beat = beats.decode(data, beats.BEAT)
        if beat is None or self._transport is None:
            return
        peer_id, token = beat
        if self._membership.beat_datagram(peer_id, token, time.monotonic()):
            self._transport.sendto(beats.encode(beats.ANSWER, peer_id, token), addr)

    def error_received(self, exc: Exception) -> None:
        pass  # an ICMP error for an answer (the peer went away): its heartbeats stop too


async def open_beats(membership: Membership, host: str, control_port: int) -> asyncio.DatagramTransport | None:
    """Binds the UDP port for heartbeat datagrams (on the running loop, whose thread
    owns `membership`): `control_port`'s number where it is free, else any. Sets
    membership.beat_port, which every welcome names. None (peers then beat over TCP
    only) where neither binds; the caller closes the transport."""
    loop = asyncio.get_running_loop()
    bind_host = "0.0.0.0" if host in ("*", "") else host.strip("[]")
    for port in (control_port, 0):
        try:
            transport, _ = await loop.create_datagram_endpoint(lambda: _BeatEndpoint(membership), local_addr=(bind_host, port))
        except OSError as exc:
            log.debug("heartbeat datagrams: cannot bind %s:%d (%s)", bind_host, port, exc)
            continue
        membership.beat_port = int(transport.get_extra_info("sockname")[1])
        return cast(asyncio.DatagramTransport, transport)
    log.warning("no UDP port for heartbeat datagrams: peers are judged by TCP heartbeats (+%gs)", beats.STREAM_ALLOWANCE)
    return None
