"""Heartbeat datagrams: liveness that a silent link cannot delay once it heals.

Heartbeats over the control connection (ZeroMQ's TCP) queue behind retransmissions: a
0.8 s outage can leave the master hearing nothing for up to outage + 1 s (the capped
retransmission timer, pccl_py.wire.aio.cap_retransmit_backoff), so a timeout under about
2 s evicts peers for outages shorter than itself. A UDP datagram is never retransmitted:
after an outage the next one arrives within a heartbeat interval. So each peer also
sends one datagram per interval to the master's UDP port (the port number of its
control port where free, else the one the welcome names), and the master answers each.
Either side gives up on the other when it has heard nothing either way for the timeout
(once datagrams get through), or nothing over TCP for the timeout plus STREAM_ALLOWANCE:
all there is where datagrams do not (UDP filtered on the path, or turned off).

A datagram carries the peer id and the random token the master gave that peer in its
welcome (over the authenticated control channel); the master's answer carries it back.
Neither side believes a datagram without the token, so a party off the path can neither
keep a dead peer alive nor make a cut-off peer believe it still hears the master.

Layout (big-endian): 4-byte magic (b"PCHB" from a peer, b"PCHA" from the master),
1-byte version, 8-byte peer id, TOKEN_BYTES token.
"""

from __future__ import annotations

import hmac
import secrets
import struct

from pccl_py.wire.aio import RTO_MAX_MS

TOKEN_BYTES = 16
VERSION = 1
BEAT = b"PCHB"
ANSWER = b"PCHA"
_LAYOUT = struct.Struct(f">4sBQ{TOKEN_BYTES}s")
SIZE = _LAYOUT.size

# Added to the heartbeat timeout for a peer whose heartbeats only travel over TCP: the
# longest a healed connection may wait for its next retransmission.
STREAM_ALLOWANCE = RTO_MAX_MS / 1000.0


def new_token() -> bytes:
    return secrets.token_bytes(TOKEN_BYTES)


def encode(magic: bytes, peer_id: int, token: bytes) -> bytes:
    return _LAYOUT.pack(magic, VERSION, peer_id, token)


def decode(data: bytes, magic: bytes) -> tuple[int, bytes] | None:
    """(peer id, token) of a well-formed datagram of kind `magic`, else None."""
    if len(data) != SIZE:
        return None
    kind, version, peer_id, token = _LAYOUT.unpack(data)
    if kind != magic or version != VERSION:
        return None
    return peer_id, token


def same_token(a: bytes, b: bytes) -> bool:
    return len(a) == TOKEN_BYTES and hmac.compare_digest(a, b)
