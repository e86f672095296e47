"""The master's side of the heartbeat datagrams (pccl_py.wire.beats): a UDP port where
a datagram carrying a registered peer's token counts as that peer's heartbeat and is
answered, so that the peer hears the master too. A newcomer's join knock
(pccl_py.wire.knock) arrives on the same port: answered from the membership, whose
effects (the members' "joining") the server carries out."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, cast

from pccl_py.master.membership import Effect, Membership
from pccl_py.wire import beats, knock

# Carries out the membership's effects (the server's sends and logs).
CarryOut = Callable[[list[Effect]], None]

log = logging.getLogger(__name__)


class _BeatEndpoint(asyncio.DatagramProtocol):
    def __init__(self, membership: Membership, secret: bytes | None, carry_out: CarryOut | None) -> None:
        self._membership = membership
        self._secret = secret
        self._carry_out = carry_out
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)  # uvloop's does not subclass it

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self._transport is None:
            return
        if data[:4] == knock.KNOCK:
            answer = self._knock(data) if self._carry_out is not None else None
            if answer is not None:
                self._transport.sendto(answer, addr)
            return
        beat = beats.decode(data, beats.BEAT)
        if beat is None:
            return
        peer_id, token = beat
        if self._membership.beat_datagram(peer_id, token, time.monotonic()):
            self._transport.sendto(beats.encode(beats.ANSWER, peer_id, token), addr)

    def _knock(self, data: bytes) -> bytes | None:
        """A newcomer's knock (pccl_py.wire.knock): the answer, or None where its hello
        would not wait for the members' vote (or it is no valid knock)."""
        assert self._carry_out is not None
        knocked = knock.decode_knock(data, self._secret, time.time())
        if knocked is None:
            return None
        peer_id, group, host, port, sent = knocked
        found, effects = self._membership.knock(peer_id, group, host, port, time.monotonic())
        self._carry_out(effects)
        if found is None:
            return None
        epoch, members = found
        return knock.encode_answer(peer_id, epoch, members, sent, self._secret)

    def error_received(self, exc: Exception) -> None:
        pass  # an ICMP error for an answer (the peer went away): its heartbeats stop too


async def open_beats(
    membership: Membership,
    host: str,
    control_port: int,
    secret: bytes | None = None,
    carry_out: CarryOut | None = None,
) -> asyncio.DatagramTransport | None:
    """Binds the UDP port for heartbeat datagrams (on the running loop, whose thread
    owns `membership`): `control_port`'s number where it is free, else any. Sets
    membership.beat_port, which every welcome names. None (peers then beat over TCP
    only) where neither binds; the caller closes the transport. Knocks are checked with
    `secret` and their effects given to `carry_out` (None: knocks are ignored)."""
    loop = asyncio.get_running_loop()
    bind_host = "0.0.0.0" if host in ("*", "") else host.strip("[]")
    for port in (control_port, 0):
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _BeatEndpoint(membership, secret, carry_out), local_addr=(bind_host, port)
            )
        except OSError as exc:
            log.debug("heartbeat datagrams: cannot bind %s:%d (%s)", bind_host, port, exc)
            continue
        membership.beat_port = int(transport.get_extra_info("sockname")[1])
        return cast(asyncio.DatagramTransport, transport)
    log.warning("no UDP port for heartbeat datagrams: peers are judged by TCP heartbeats (+%gs)", beats.STREAM_ALLOWANCE)
    return None
