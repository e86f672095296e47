"""Control-plane wire protocol: msgpack maps over ZeroMQ, checked against a schema.

Every message is a map with "t" (its type) and "v" (the protocol version). Decoding
validates the type, version, and each field's type; anything else raises
ProtocolError, which the receiver answers with an "error" message or drops. See
docs/protocol.md for the messages and the state machines.
"""

from __future__ import annotations

from typing import Any

import msgpack

from pccl_py.errors import FailureKind, ProtocolError

VERSION = 9

Message = dict[str, Any]

# type -> {field: accepted python types}. Extra fields are rejected too.
# The collective calls that wait on a data-plane op (a "blocked" report names it).
DATA_CALLS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all")

_INT = (int,)
_STR = (str,)
_BOOL = (bool,)
_FLOAT = (int, float)
_LIST = (list,)
_BYTES = (bytes,)

SCHEMAS: dict[str, dict[str, tuple[type, ...]]] = {
    # peer -> master
    "hello": {"peer_id": _INT, "group": _INT, "host": _STR, "port": _INT, "name": _STR},
    # After a master restart: a member re-registers with what it knows (revision -1:
    # never synced; pending: [[epoch, tag, seq, ok, kind, msg]] reported without a
    # verdict; decided: [[epoch, tag, seq, ok, kind, msg, world]] verdicts received).
    "rejoin": {
        "peer_id": _INT,
        "group": _INT,
        "host": _STR,
        "port": _INT,
        "name": _STR,
        "epoch": _INT,
        "ring": _LIST,
        "round": _INT,
        "revision": _INT,
        "pending": _LIST,
        "decided": _LIST,
        "waiting": _LIST,  # the collective it waits in: ["pending", round, index, query], ["vote", round], []
        "answered": _LIST,  # its last pending_peers() answer: [round, index, count] or []
        "rsag": _BOOL,  # its epoch's algorithm choice (the topology's `rsag`): kept if the group re-forms in place
    },
    # Right after "hello" or "rejoin": what this peer's data connections get from its
    # host (shown by `pccl status`): the TCP congestion control in use, why it is not
    # the one asked for ("" when it is), and the largest send and receive buffers a
    # connection can have (bytes, the kernel's figures).
    "transport": {"cc": _STR, "cc_note": _STR, "send_buffer": _INT, "recv_buffer": _INT},
    "hb": {},
    # fresh: the caller made no other collective call since it was admitted (a joiner's
    # first update_topology() is the vote that admitted it: docs/protocol.md).
    "vote": {"epoch": _INT, "fresh": _BOOL},
    "pending": {"epoch": _INT, "query": _INT, "fresh": _BOOL},
    # A collective call that has waited Config.blocked_report_after seconds: the call
    # ("update_topology", "pending_peers", "sync_shared_state", "optimize_topology", or
    # one of DATA_CALLS), the op it waits on ([epoch, tag, seq] or []), a description of
    # it, and the data-plane ops this peer has in flight: [[epoch, tag, seq, desc], ...].
    "blocked": {"call": _STR, "op": _LIST, "desc": _STR, "inflight": _LIST},
    "op": {"epoch": _INT, "tag": _INT, "seq": _INT, "ok": _BOOL, "kind": _STR, "msg": _STR, "peer": _INT},
    # Ops this peer committed through the commit vote, batched: [[epoch, tag, seq], ...].
    # Never answered.
    "done": {"ops": _LIST},
    "leave": {},
    "status": {},
    "sync": {"epoch": _INT, "revision": _INT, "strategy": _STR, "exposure": _INT, "entries": _LIST},
    # revision: the revision of the plan it answers (the sync it took part in).
    "sync_done": {"ok": _BOOL, "kind": _STR, "msg": _STR, "rx_bytes": _INT, "revision": _INT},
    "optimize": {"epoch": _INT, "exposure": _INT, "probe_bytes": _INT},
    "probe_done": {"round": _INT, "results": _LIST},
    # Authentication (pccl_py.auth), before "hello" or "status" when a secret is set.
    "auth_begin": {"nonce": _BYTES},
    "auth": {"mac": _BYTES},
    # master -> peer
    "auth_challenge": {"nonce": _BYTES, "proof": _BYTES},
    "auth_ok": {},
    "welcome": {
        "peer_id": _INT,
        "heartbeat_interval": _FLOAT,
        "heartbeat_timeout": _FLOAT,
        "admitted": _BOOL,
        "master": _INT,  # the master's incarnation: a different one means it restarted
        # Heartbeat datagrams (pccl_py.wire.beats): the master's UDP port for them (0:
        # none) and the token this peer's datagrams carry.
        "beat_port": _INT,
        "beat_token": _BYTES,
        # A newcomer that waits for the members' vote: the ring it will join
        # ([[peer_id, host, port], ...]) and its epoch, to open its pools to them ahead
        # of that vote (Config.prepare_joins); [] otherwise.
        "members": _LIST,
        "epoch": _INT,
    },
    # To every member when a newcomer registers and waits for their vote: open a pool
    # to it ahead of the epoch that admits it.
    "joining": {"peer": _INT, "host": _STR, "port": _INT},
    "unknown": {"master": _INT},  # to a routing id this master has not registered
    "topology": {"epoch": _INT, "ring": _LIST, "reason": _STR, "vote": _BOOL, "round": _INT, "rsag": _BOOL},
    "pending_count": {"query": _INT, "count": _INT},
    # Every member of the group was blocked in collectives that cannot match: each
    # one's call fails with CollectiveMismatch, and op numbering restarts at `round`.
    "mismatch": {"round": _INT, "msg": _STR, "ops": _LIST},
    "outcome": {
        "epoch": _INT,
        "tag": _INT,
        "seq": _INT,
        "ok": _BOOL,
        "kind": _STR,
        "msg": _STR,
        "peer": _INT,
        "next_epoch": _INT,
        "world": _INT,
    },
    "evicted": {"reason": _STR},
    "sync_plan": {"revision": _INT, "fetch": _LIST, "sources": _LIST},
    "sync_result": {"ok": _BOOL, "kind": _STR, "msg": _STR, "revision": _INT},
    "probe": {"round": _INT, "fetch": _LIST},
    "error": {"code": _STR, "msg": _STR},
    "status_reply": {"state": (dict,)},
}

# Failure kinds carried by "op", "outcome", "sync_done" and "sync_result"
# (pccl_py.errors.FailureKind).
FAILURE_KINDS = tuple(kind.value for kind in FailureKind)


def make(msg_type: str, /, **fields: Any) -> Message:
    msg: Message = {"t": msg_type, "v": VERSION}
    msg.update(fields)
    validate(msg)
    return msg


def encode(msg: Message) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def validate(msg: Any) -> Message:
    if not isinstance(msg, dict):
        raise ProtocolError("message is not a map")
    kind = msg.get("t")
    if not isinstance(kind, str) or kind not in SCHEMAS:
        raise ProtocolError(f"unknown message type {kind!r}")
    version = msg.get("v")
    if type(version) is not int or version != VERSION:
        raise ProtocolError(f"protocol version {version!r} is not supported (this side speaks {VERSION})")
    schema = SCHEMAS[kind]
    for name, types in schema.items():
        if name not in msg:
            raise ProtocolError(f"{kind}: missing field {name!r}")
        value = msg[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ProtocolError(f"{kind}: field {name!r} has type {type(value).__name__}")
    extra = set(msg) - set(schema) - {"t", "v"}
    if extra:
        raise ProtocolError(f"{kind}: unexpected fields {sorted(map(repr, extra))}")
    return msg


def decode(data: bytes, max_bytes: int) -> Message:
    if len(data) > max_bytes:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the {max_bytes}-byte cap")
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=max_bytes, max_str_len=max_bytes)
    except Exception as exc:  # noqa: BLE001 - msgpack raises several unrelated types on garbage
        raise ProtocolError(f"undecodable message: {type(exc).__name__}") from None
    return validate(msg)
