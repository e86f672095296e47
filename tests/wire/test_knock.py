"""The join knock's datagrams (pccl_py.wire.knock): what decodes, and everything that
must not (a forged, tampered, stale or malformed datagram is no knock)."""

from __future__ import annotations

import msgpack
import pytest

from pccl_py.wire import knock

SECRET = b"a shared secret for the knock"
NOW = 1_800_000_000.0
PEER = 123_456_789


def test_a_knock_round_trips_with_and_without_a_secret() -> None:
    for secret in (None, SECRET):
        data = knock.encode_knock(PEER, 3, "10.0.0.7", 4711, NOW, secret)
        assert knock.decode_knock(data, secret, NOW + 1) == (PEER, 3, "10.0.0.7", 4711, NOW)


def test_a_knock_is_believed_only_with_the_masters_own_secret() -> None:
    unsigned = knock.encode_knock(PEER, 0, "h", 1, NOW, None)
    signed = knock.encode_knock(PEER, 0, "h", 1, NOW, SECRET)
    assert knock.decode_knock(unsigned, SECRET, NOW) is None  # the master needs a MAC
    assert knock.decode_knock(signed, None, NOW) is None  # the master has no secret: a mismatch
    assert knock.decode_knock(signed, b"another secret", NOW) is None
    tampered = bytearray(signed)
    tampered[12] ^= 1  # a byte of the body
    assert knock.decode_knock(bytes(tampered), SECRET, NOW) is None
    assert knock.decode_knock(signed[:-1], SECRET, NOW) is None
    assert knock.decode_knock(signed + b"\0", SECRET, NOW) is None


def test_a_signed_knock_from_far_off_the_masters_clock_is_refused() -> None:
    signed = knock.encode_knock(PEER, 0, "h", 1, NOW, SECRET)
    assert knock.decode_knock(signed, SECRET, NOW + knock.KNOCK_MAX_AGE - 1) is not None
    assert knock.decode_knock(signed, SECRET, NOW + knock.KNOCK_MAX_AGE + 1) is None
    assert knock.decode_knock(signed, SECRET, NOW - knock.KNOCK_MAX_AGE - 1) is None


def _raw(magic: bytes, body: object, version: int = knock.VERSION, flags: int = 0) -> bytes:
    packed = msgpack.packb(body, use_bin_type=True)
    return magic + bytes([version, flags]) + len(packed).to_bytes(2, "big") + packed


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"PCKN",
        _raw(b"PCKA", {"peer": PEER, "group": 0, "host": "h", "port": 1, "time": NOW}),  # an answer's magic
        _raw(b"PCKN", {"peer": PEER, "group": 0, "host": "h", "port": 1, "time": NOW}, version=2),
        _raw(b"PCKN", {"peer": PEER, "group": 0, "host": "h", "port": 1, "time": NOW}, flags=2),
        _raw(b"PCKN", {"peer": PEER, "group": 0, "host": "h", "port": 0, "time": NOW}),  # port 0
        _raw(b"PCKN", {"peer": PEER, "group": 0, "host": "h", "port": 65536, "time": NOW}),
        _raw(b"PCKN", {"peer": -1, "group": 0, "host": "h", "port": 1, "time": NOW}),
        _raw(b"PCKN", {"peer": PEER, "group": -1, "host": "h", "port": 1, "time": NOW}),
        _raw(b"PCKN", {"peer": PEER, "group": 0, "host": "", "port": 1, "time": NOW}),
        _raw(b"PCKN", {"peer": str(PEER), "group": 0, "host": "h", "port": 1, "time": NOW}),
        _raw(b"PCKN", {"peer": PEER, "group": 0, "host": "h", "port": 1, "time": True}),
        _raw(b"PCKN", {"peer": PEER, "group": 0, "host": "h", "port": 1}),  # no time
        _raw(b"PCKN", {"peer": PEER, "group": 0, "host": "h", "port": 1, "time": NOW, "x": 1}),
        _raw(b"PCKN", [PEER, 0, "h", 1, NOW]),  # not a map
        b"PCKN\x01\x00\x00\x03\xc1\xc1\xc1",  # not msgpack
    ],
)
def test_malformed_knocks_are_no_knocks(data: bytes) -> None:
    assert knock.decode_knock(data, None, NOW) is None


def test_an_answer_round_trips_and_belongs_to_its_knock_only() -> None:
    members = [[11, "10.0.0.1", 5000], [12, "10.0.0.2", 5001]]
    for secret in (None, SECRET):
        data = knock.encode_answer(PEER, 7, members, NOW, secret)
        assert knock.decode_answer(data, secret, PEER, NOW) == (7, [(11, "10.0.0.1", 5000), (12, "10.0.0.2", 5001)])
        assert knock.decode_answer(data, secret, PEER + 1, NOW) is None  # another peer's
        assert knock.decode_answer(data, secret, PEER, NOW + 1) is None  # another knock's
    signed = knock.encode_answer(PEER, 7, members, NOW, SECRET)
    assert knock.decode_answer(signed, b"another secret", PEER, NOW) is None
    assert knock.decode_answer(knock.encode_answer(PEER, 7, members, NOW, None), SECRET, PEER, NOW) is None


@pytest.mark.parametrize(
    "members",
    [
        [[11, "h", 0]],  # port 0
        [[11, "h"]],
        [["11", "h", 5000]],
        [[PEER, "h", 5000]],  # this peer itself
        "not a list",
    ],
)
def test_malformed_answers_are_ignored(members: object) -> None:
    data = _raw(b"PCKA", {"peer": PEER, "epoch": 1, "members": members, "time": NOW})
    assert knock.decode_answer(data, None, PEER, NOW) is None
