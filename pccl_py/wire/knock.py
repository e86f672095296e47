"""The join knock: one datagram that lets a newcomer's pools open while it registers.

Registering over the control channel takes 3.5 round trips before the master hears
the hello (TCP, then ZeroMQ's greeting and READY), and only then could the members and
the newcomer start opening pools to each other. So a newcomer that has a master to
join also sends one datagram, a knock, to the master's UDP port (the heartbeat port:
the number of its control port, see pccl_py.wire.beats) as it starts to connect. A
master that would make it wait for the members' vote answers with the group's ring and
epoch, and tells every member ("joining"), half a round trip after the knock left:
both sides open their pools three round trips sooner, and warm them meanwhile.

A knock is a hint. It registers nothing; a lost or ignored one (an old master, UDP
filtered, a group with no members yet) changes nothing but the time: the welcome names
the ring too, and "joining" follows the hello as well. What it may cause is bounded:
each peer id knocks once, for a peer id not registered, and an address that does not
answer as that peer id fails the data-plane handshake (pools are opened to a peer id,
checked at the handshake). With a shared secret, both datagrams carry an HMAC-SHA256
of the rest, and a knock also its sending time, which the master refuses when it is
more than KNOCK_MAX_AGE seconds from its own clock.

Layout: 4-byte magic (b"PCKN" from a newcomer, b"PCKA" from the master), 1-byte
version, 1-byte flags (bit 0: a MAC follows the body), 2-byte body length (big-endian),
the body (a msgpack map), then the 32-byte MAC where flagged. Knock body: peer, group,
host, port, time. Answer body: peer, epoch, members ([[peer id, host, port]]), time
(the knock's, so a MAC binds the answer to its knock).
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from pccl_py.wire import auth

KNOCK = b"PCKN"
ANSWER = b"PCKA"
VERSION = 1
KNOCK_MAX_AGE = 60.0
_HEAD = struct.Struct(">4sBBH")
_MAC_BYTES = 32
_FLAG_MAC = 1
_LABEL = b"pccl knock v1 "
_MAX_BODY = 60000  # one datagram


def _encode(magic: bytes, body: dict[str, Any], secret: bytes | None) -> bytes:
    packed = msgpack.packb(body, use_bin_type=True)
    if len(packed) > _MAX_BODY:
        raise ValueError(f"a knock body of {len(packed)} bytes does not fit a datagram")
    head = _HEAD.pack(magic, VERSION, _FLAG_MAC if secret is not None else 0, len(packed))
    return head + packed + (auth.mac(secret, _LABEL, head, packed) if secret is not None else b"")


def _decode(data: bytes, magic: bytes, secret: bytes | None) -> dict[str, Any] | None:
    """The body of a well-formed datagram of kind `magic` whose MAC checks (exactly
    when `secret` is set), else None."""
    if len(data) < _HEAD.size:
        return None
    kind, version, flags, length = _HEAD.unpack_from(data)
    if kind != magic or version != VERSION or flags & ~_FLAG_MAC:
        return None
    signed = bool(flags & _FLAG_MAC)
    if signed != (secret is not None) or len(data) != _HEAD.size + length + (_MAC_BYTES if signed else 0):
        return None
    head, body = data[: _HEAD.size], data[_HEAD.size : _HEAD.size + length]
    if secret is not None and not auth.verify(auth.mac(secret, _LABEL, head, body), data[_HEAD.size + length :]):
        return None
    try:
        decoded = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception:  # noqa: BLE001 - msgpack raises several unrelated types on garbage
        return None
    return decoded if isinstance(decoded, dict) else None


def encode_knock(peer_id: int, group: int, host: str, port: int, sent: float, secret: bytes | None) -> bytes:
    """`sent`: wall-clock seconds (time.time())."""
    return _encode(KNOCK, {"peer": peer_id, "group": group, "host": host, "port": port, "time": sent}, secret)


def decode_knock(data: bytes, secret: bytes | None, now: float) -> tuple[int, int, str, int, float] | None:
    """(peer id, group, host, port, sent) of a valid knock, else None. `now`: wall-clock
    seconds; a signed knock sent more than KNOCK_MAX_AGE from it is refused."""
    body = _decode(data, KNOCK, secret)
    if body is None:
        return None
    peer, group, host, port, sent = (body.get(k) for k in ("peer", "group", "host", "port", "time"))
    if not (
        isinstance(peer, int) and isinstance(group, int) and isinstance(host, str) and isinstance(port, int)
    ):
        return None
    if not isinstance(sent, (int, float)) or isinstance(sent, bool) or len(body) != 5:
        return None
    if not (0 <= peer < 2**63 and group >= 0 and 0 < port < 65536 and host):
        return None
    if secret is not None and abs(now - sent) > KNOCK_MAX_AGE:
        return None
    return peer, group, host, port, float(sent)


def encode_answer(
    peer_id: int, epoch: int, members: list[list[Any]], sent: float, secret: bytes | None
) -> bytes:
    """`sent`: the knock's own time, echoed."""
    return _encode(ANSWER, {"peer": peer_id, "epoch": epoch, "members": members, "time": sent}, secret)


def decode_answer(
    data: bytes, secret: bytes | None, peer_id: int, sent: float
) -> tuple[int, list[tuple[int, str, int]]] | None:
    """(epoch, members) of the answer to this peer's knock sent at `sent`, else None."""
    body = _decode(data, ANSWER, secret)
    if body is None or body.get("peer") != peer_id or body.get("time") != sent:
        return None
    epoch, raw = body.get("epoch"), body.get("members")
    if not isinstance(epoch, int) or epoch < 0 or not isinstance(raw, list):
        return None
    members: list[tuple[int, str, int]] = []
    for item in raw:
        if not (
            isinstance(item, list)
            and len(item) == 3
            and isinstance(item[0], int)
            and isinstance(item[1], str)
        ):
            return None
        if not isinstance(item[2], int) or not 0 < item[2] < 65536 or item[0] == peer_id:
            return None
        members.append((item[0], item[1], item[2]))
    return epoch, members
