"""The control-plane wire protocol (pccl_py.protocol): every message type round-trips,
and decode() rejects anything else with pccl_py.errors.ProtocolError, never with
another exception type."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pccl_py.wire import protocol
from pccl_py.errors import PcclError, ProtocolError

CAP = 1 << 20
TYPES = sorted(protocol.SCHEMAS)
FIELDS = sorted((t, f) for t, schema in protocol.SCHEMAS.items() for f in schema)

# ---------------------------------------------------------------------- strategies

INT64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)
TEXT = st.text(max_size=40)
LEAF = st.one_of(st.none(), st.booleans(), INT64, st.floats(allow_nan=False), TEXT, st.binary(max_size=20))
# msgpack values that compare equal after a round trip (lists, not tuples; str keys).
VALUE = st.recursive(
    LEAF,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)),
    max_leaves=12,
)


def strategy_for(types: tuple[type, ...]) -> st.SearchStrategy[Any]:
    options: list[st.SearchStrategy[Any]] = []
    if bool in types:
        options.append(st.booleans())
    if int in types:
        options.append(INT64)
    if float in types:
        options.append(st.floats(allow_nan=False))
    if str in types:
        options.append(TEXT)
    if list in types:
        options.append(st.lists(VALUE, max_size=5))
    if dict in types:
        options.append(st.dictionaries(TEXT, VALUE, max_size=5))
    if bytes in types:
        options.append(st.binary(max_size=40))
    assert options, f"no strategy for {types}"
    return st.one_of(options)


@st.composite
def valid_messages(draw: st.DrawFn, msg_type: str | None = None) -> dict[str, Any]:
    t = msg_type or draw(st.sampled_from(TYPES))
    fields = {name: draw(strategy_for(types)) for name, types in protocol.SCHEMAS[t].items()}
    return protocol.make(t, **fields)


def sample_value(types: tuple[type, ...]) -> Any:
    if bool in types:
        return True
    if int in types:
        return 7
    if float in types:
        return 1.5
    if str in types:
        return "text"
    if list in types:
        return [[1, "127.0.0.1", 2]]
    if dict in types:
        return {"k": [1, {"x": None}]}
    if bytes in types:
        return b"\x00\xffbytes"
    raise AssertionError(types)


def sample(t: str) -> dict[str, Any]:
    return {"t": t, "v": protocol.VERSION, **{f: sample_value(ty) for f, ty in protocol.SCHEMAS[t].items()}}


def wrong_values(types: tuple[type, ...]) -> list[Any]:
    """Values of the wrong type for a field accepting `types` (bool is not an int)."""
    candidates: list[Any] = [None, "1", b"1", 1, 1.5, True, False, [], [1], {}, {"a": 1}]
    out = []
    for value in candidates:
        accepted = isinstance(value, types) and (not isinstance(value, bool) or bool in types)
        if not accepted:
            out.append(value)
    return out


def rejects(data: bytes, cap: int = CAP) -> ProtocolError:
    """decode() must raise ProtocolError (a pytest failure names any other exception)."""
    try:
        msg = protocol.decode(data, cap)
    except ProtocolError as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - the failure we look for
        pytest.fail(f"decode raised {type(exc).__name__} instead of ProtocolError: {exc!r}")
    pytest.fail(f"decode accepted {data!r} as {msg!r}")


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# ---------------------------------------------------------------------- round trips


def test_every_message_type_has_a_schema_and_a_version() -> None:
    assert protocol.VERSION == 9  # 2: "vote"/"pending" carry "fresh", "blocked", "mismatch"; 3: the master answers "hb";
    # 4: "blocked" may name all_gather, reduce_scatter and broadcast; 5: and all_to_all;
    # 6: "rejoin" carries the epoch's algorithm choice ("rsag"); 7: "transport"; 8: "welcome" names the heartbeat datagrams' port and token;
    # 9: "welcome" names the ring a waiting newcomer joins, and "joining" tells the members
    assert {"hello", "hb", "vote", "pending", "op", "leave", "status", "blocked"} <= set(TYPES)
    assert {"welcome", "topology", "pending_count", "outcome", "evicted", "error", "status_reply", "mismatch"} <= set(
        TYPES
    )


# The documented wire format (docs/protocol.md). The other tests derive their cases from
# protocol.SCHEMAS; this one pins SCHEMAS itself, so a schema change is deliberate.
I, S, B, N, L, M, BIN = "int", "str", "bool", "number", "list", "map", "bin"
DOCUMENTED = {
    "hello": {"peer_id": I, "group": I, "host": S, "port": I, "name": S},
    "rejoin": {"peer_id": I, "group": I, "host": S, "port": I, "name": S, "epoch": I, "ring": L, "round": I,
               "revision": I, "pending": L, "decided": L, "waiting": L, "answered": L, "rsag": B},
    "transport": {"cc": S, "cc_note": S, "send_buffer": I, "recv_buffer": I},
    "hb": {},
    "vote": {"epoch": I, "fresh": B},
    "pending": {"epoch": I, "query": I, "fresh": B},
    "blocked": {"call": S, "op": L, "desc": S, "inflight": L},
    "op": {"epoch": I, "tag": I, "seq": I, "ok": B, "kind": S, "msg": S, "peer": I},
    "leave": {},
    "status": {},
    "welcome": {
        "peer_id": I, "heartbeat_interval": N, "heartbeat_timeout": N, "admitted": B, "master": I,
        "beat_port": I, "beat_token": BIN, "members": L, "epoch": I,
    },
    "joining": {"peer": I, "host": S, "port": I},
    "unknown": {"master": I},
    "topology": {"epoch": I, "ring": L, "reason": S, "vote": B, "round": I, "rsag": B},
    "pending_count": {"query": I, "count": I},
    "mismatch": {"round": I, "msg": S, "ops": L},
    "outcome": {
        "epoch": I,
        "tag": I,
        "seq": I,
        "ok": B,
        "kind": S,
        "msg": S,
        "peer": I,
        "next_epoch": I,
        "world": I,
    },
    "evicted": {"reason": S},
    "error": {"code": S, "msg": S},
    "status_reply": {"state": M},
    "sync": {"epoch": I, "revision": I, "strategy": S, "exposure": I, "entries": L},
    "sync_done": {"ok": B, "kind": S, "msg": S, "rx_bytes": I, "revision": I},
    "done": {"ops": L},
    "sync_plan": {"revision": I, "fetch": L, "sources": L},
    "sync_result": {"ok": B, "kind": S, "msg": S, "revision": I},
    "optimize": {"epoch": I, "exposure": I, "probe_bytes": I},
    "probe": {"round": I, "fetch": L},
    "probe_done": {"round": I, "results": L},
    "auth_begin": {"nonce": BIN},
    "auth_challenge": {"nonce": BIN, "proof": BIN},
    "auth": {"mac": BIN},
    "auth_ok": {},
}
_KIND_OF_TYPES = {(int,): I, (str,): S, (bool,): B, (int, float): N, (list,): L, (dict,): M, (bytes,): BIN}


def test_schemas_match_the_documented_wire_format() -> None:
    actual = {
        t: {f: _KIND_OF_TYPES.get(tuple(types), repr(types)) for f, types in schema.items()}
        for t, schema in protocol.SCHEMAS.items()
    }
    assert actual == DOCUMENTED


def test_protocol_error_belongs_to_the_package_hierarchy() -> None:
    assert issubclass(ProtocolError, PcclError)


@pytest.mark.parametrize("msg_type", TYPES)
def test_make_encode_decode_round_trip(msg_type: str) -> None:
    fields = {f: sample_value(ty) for f, ty in protocol.SCHEMAS[msg_type].items()}
    msg = protocol.make(msg_type, **fields)
    assert msg["t"] == msg_type and msg["v"] == protocol.VERSION
    data = protocol.encode(msg)
    assert isinstance(data, bytes)
    assert protocol.decode(data, CAP) == msg
    assert protocol.decode(data, len(data)) == msg  # a message exactly at the cap is fine


@pytest.mark.parametrize("msg_type", TYPES)
@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_round_trip_of_random_valid_messages(msg_type: str, data: st.DataObject) -> None:
    msg = data.draw(valid_messages(msg_type))
    assert protocol.decode(protocol.encode(msg), CAP) == msg


def test_field_order_does_not_matter() -> None:
    msg = sample("op")
    reordered = dict(reversed(list(msg.items())))
    assert protocol.decode(pack(reordered), CAP) == msg


def test_typical_messages_round_trip_with_their_values() -> None:
    hello = protocol.make("hello", peer_id=2**63 - 1, group=0, host="127.0.0.1", port=65535, name="é-peer")
    outcome = protocol.make(
        "outcome",
        epoch=3,
        tag=2**32 - 1,
        seq=(5 << 40) | (9 << 8) | 1,
        ok=False,
        kind="PeerLost",
        msg="neighbour closed",
        peer=-1,
        next_epoch=4,
        world=3,
    )
    welcome = protocol.make(
        "welcome", peer_id=1, heartbeat_interval=1, heartbeat_timeout=5.5, admitted=False, master=7,
        beat_port=4000, beat_token=b"t" * 16, members=[[2, "10.0.0.2", 5000]], epoch=3,
    )
    for msg in (hello, outcome, welcome):
        assert protocol.decode(protocol.encode(msg), CAP) == msg


# ---------------------------------------------------------------------- make() validates too


def test_make_rejects_unknown_type() -> None:
    with pytest.raises(ProtocolError):
        protocol.make("no_such_type")


def test_make_rejects_missing_field() -> None:
    with pytest.raises(ProtocolError):
        protocol.make("vote")


def test_make_rejects_wrong_field_type() -> None:
    with pytest.raises(ProtocolError):
        protocol.make("vote", epoch="1", fresh=False)


def test_make_rejects_extra_field() -> None:
    with pytest.raises(ProtocolError):
        protocol.make("hb", extra=1)


# ---------------------------------------------------------------------- decode() rejects


@pytest.mark.parametrize(
    "value", [None, 1, -1, 1.5, True, "status", b"status", [], ["t", "status"], [{"t": "hb", "v": 1}]]
)
def test_decode_rejects_non_map(value: Any) -> None:
    rejects(pack(value))


@pytest.mark.parametrize(
    "msg",
    [
        {"v": 1},
        {"t": "nope", "v": 1},
        {"t": "", "v": 1},
        {"t": "HB", "v": 1},
        {"t": 1, "v": 1},
        {"t": None, "v": 1},
        {"t": b"hb", "v": 1},
        {"t": ["hb"], "v": 1},
        {b"t": "hb", "v": 1},
    ],
    ids=repr,
)
def test_decode_rejects_unknown_or_missing_type(msg: dict[Any, Any]) -> None:
    rejects(pack(msg))


@pytest.mark.parametrize("version", [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, -1, 2**64 - 1, "9", b"\x09", None, [9]], ids=repr)
@pytest.mark.parametrize("msg_type", ["hb", "hello", "outcome"])
def test_decode_rejects_wrong_version(msg_type: str, version: Any) -> None:
    msg = sample(msg_type)
    msg["v"] = version
    exc = rejects(pack(msg))
    assert "version" in str(exc)


@pytest.mark.parametrize("msg_type", ["hb", "hello"])
def test_decode_rejects_missing_version(msg_type: str) -> None:
    msg = sample(msg_type)
    del msg["v"]
    rejects(pack(msg))


@pytest.mark.parametrize("version", [True, 1.0], ids=repr)
def test_decode_rejects_version_of_the_wrong_type(version: Any) -> None:
    # The version is the integer 1; True and 1.0 compare equal to 1 in Python but are
    # not that integer on the wire (the same rule as "bool is not an int" for fields).
    msg = sample("status")
    msg["v"] = version
    rejects(pack(msg))


@pytest.mark.parametrize("msg_type,field", [tf for tf in FIELDS], ids=lambda x: str(x))
def test_decode_rejects_missing_field(msg_type: str, field: str) -> None:
    msg = sample(msg_type)
    del msg[field]
    exc = rejects(pack(msg))
    assert field in str(exc)


@pytest.mark.parametrize("msg_type,field", [tf for tf in FIELDS], ids=lambda x: str(x))
def test_decode_rejects_wrong_field_type(msg_type: str, field: str) -> None:
    types = protocol.SCHEMAS[msg_type][field]
    wrong = wrong_values(types)
    assert wrong
    for value in wrong:
        msg = sample(msg_type)
        msg[field] = value
        rejects(pack(msg))


@pytest.mark.parametrize(
    "msg_type,field",
    [(t, f) for t, f in FIELDS if protocol.SCHEMAS[t][f] in ((int,), (int, float))],
    ids=lambda x: str(x),
)
@pytest.mark.parametrize("flag", [True, False])
def test_decode_rejects_bool_where_a_number_is_expected(msg_type: str, field: str, flag: bool) -> None:
    msg = sample(msg_type)
    msg[field] = flag
    rejects(pack(msg))


@pytest.mark.parametrize(
    "msg_type,field", [(t, f) for t, f in FIELDS if protocol.SCHEMAS[t][f] == (bool,)], ids=lambda x: str(x)
)
@pytest.mark.parametrize("number", [0, 1, 1.0])
def test_decode_rejects_number_where_a_bool_is_expected(msg_type: str, field: str, number: Any) -> None:
    msg = sample(msg_type)
    msg[field] = number
    rejects(pack(msg))


@pytest.mark.parametrize("msg_type", TYPES)
def test_decode_rejects_extra_fields(msg_type: str) -> None:
    msg = sample(msg_type)
    msg["zz_extra"] = 1
    exc = rejects(pack(msg))
    assert "zz_extra" in str(exc)


def test_decode_rejects_extra_bytes_key() -> None:
    msg: dict[Any, Any] = sample("hb")
    msg[b"extra"] = 1
    rejects(pack(msg))


def test_decode_rejects_extra_fields_with_str_and_bytes_keys() -> None:
    # msgpack map keys may be str or bin; extra fields of both kinds at once must still
    # be a ProtocolError (not a TypeError from comparing str with bytes).
    rejects(pack({"t": "hb", "v": 1, "a": 1, b"b": 1}))


def test_decode_rejects_oversized_input() -> None:
    msg = protocol.make("error", code="x", msg="y" * 5000)
    data = protocol.encode(msg)
    exc = rejects(data, cap=len(data) - 1)
    assert "cap" in str(exc) or "exceeds" in str(exc)
    assert protocol.decode(data, len(data)) == msg


def test_decode_rejects_oversized_input_before_parsing_it() -> None:
    # Garbage beyond the cap is refused for its size, whatever it holds.
    exc = rejects(b"\xc1" * 100, cap=10)
    assert "exceeds" in str(exc) or "cap" in str(exc)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # never used in msgpack
        b"\x81",  # map of one entry, truncated
        b"\xdf\xff\xff\xff\xff",  # map header claiming 4G entries
        b"\xdd\xff\xff\xff\xff",  # array header claiming 4G entries
        b"\xdb\xff\xff\xff\xff",  # str header claiming 4G bytes
        b"\xc6\xff\xff\xff\xff",  # bin header claiming 4G bytes
        b"\x82\xa1t\xa2hb",  # truncated map
        b"\x91" * 5000 + b"\xc0",  # 5000 nested arrays
        b"\x81\xa1a" * 3000 + b"\xc0",  # 3000 nested maps
        b"\x81\x01\xa2hb",  # integer map key
        b"\x81\xc0\xa2hb",  # nil map key
        b"\x81\x91\x01\x01",  # array map key
        b"\x82\xa1t\xa2\xff\xfe\xa1v\x01",  # invalid UTF-8 in a str
        b"\xd4\x01\x00",  # ext type
        b"\xd6\xff\x00\x00\x00\x00",  # msgpack timestamp
        b"\xff\xff\xff\xff",
        b"\x00\x00\x00\x00",  # several values
        b"GET / HTTP/1.1\r\n\r\n",
    ],
    ids=lambda d: d[:12].hex() or "empty",
)
def test_decode_rejects_garbage_bytes(data: bytes) -> None:
    rejects(data)


def test_decode_rejects_trailing_bytes_after_a_valid_message() -> None:
    data = protocol.encode(protocol.make("hb"))
    rejects(data + b"\x00")
    rejects(data + data)


def test_decode_rejects_every_truncation_of_a_valid_message() -> None:
    data = protocol.encode(sample("outcome"))
    for n in range(len(data)):
        rejects(data[:n])


def test_decode_rejects_non_utf8_field_value() -> None:
    valid = pack({"t": "error", "v": 1, "code": "ab", "msg": "x"})
    data = valid.replace(b"\xa2ab", b"\xa2\xc3\x28")
    assert data != valid
    rejects(data)


def test_decode_rejects_bytes_where_a_string_is_expected() -> None:
    rejects(pack({"t": "error", "v": 1, "code": b"bad_message", "msg": "x"}))


# ---------------------------------------------------------------------- properties


def decode_or_protocol_error(data: bytes, cap: int = CAP) -> dict[str, Any] | None:
    try:
        msg = protocol.decode(data, cap)
    except ProtocolError:
        return None
    except Exception as exc:  # noqa: BLE001 - the failure we look for
        pytest.fail(f"decode raised {type(exc).__name__} instead of ProtocolError: {exc!r} on {data!r}")
    # Whatever is accepted is a well-formed message of a known type.
    assert protocol.validate(msg) is msg
    assert msg["t"] in protocol.SCHEMAS
    return msg


@settings(max_examples=400, deadline=None, database=None)
@given(st.binary(max_size=200))
def test_random_bytes_decode_or_raise_protocol_error(data: bytes) -> None:
    decode_or_protocol_error(data)


@settings(max_examples=200, deadline=None, database=None)
@given(VALUE)
def test_random_msgpack_values_decode_or_raise_protocol_error(value: Any) -> None:
    decode_or_protocol_error(pack(value))


@st.composite
def near_messages(draw: st.DrawFn) -> dict[Any, Any]:
    """Maps that look like messages: a known or random type, a version, and a mix of the
    schema's fields (some missing, some of the wrong type) and random fields."""
    t = draw(st.one_of(st.sampled_from(TYPES), TEXT, VALUE))
    msg: dict[Any, Any] = {"t": t}
    if draw(st.booleans()):
        msg["v"] = draw(st.one_of(st.just(1), VALUE))
    schema = protocol.SCHEMAS.get(t, {}) if isinstance(t, str) else {}
    for name, types in schema.items():
        choice = draw(st.integers(0, 3))
        if choice == 0:
            continue
        msg[name] = draw(strategy_for(types) if choice < 3 else VALUE)
    # Extra keys of one kind per map (str and bin keys mixed: see
    # test_decode_rejects_extra_fields_with_str_and_bytes_keys).
    key = draw(st.sampled_from([TEXT, st.binary(max_size=5)]))
    msg.update(draw(st.dictionaries(key, VALUE, max_size=3)))
    return msg


@settings(max_examples=250, deadline=None, database=None)
@given(near_messages())
def test_near_messages_decode_only_when_they_match_the_schema(msg: dict[Any, Any]) -> None:
    decoded = decode_or_protocol_error(pack(msg))
    if decoded is not None:
        schema = protocol.SCHEMAS[decoded["t"]]
        assert set(decoded) == set(schema) | {"t", "v"}
        for name, types in schema.items():
            assert isinstance(decoded[name], types)
            assert not isinstance(decoded[name], bool) or bool in types


@settings(max_examples=200, deadline=None, database=None)
@given(valid_messages(), st.integers(min_value=0, max_value=64))
def test_cap_is_enforced_for_every_message(msg: dict[str, Any], slack: int) -> None:
    data = protocol.encode(msg)
    assert protocol.decode(data, len(data) + slack) == msg
    if len(data) > 1:
        rejects(data, cap=max(0, len(data) - 1 - slack))
