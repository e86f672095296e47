"""Failure kinds are one typed encoding (pccl_py.errors.FailureKind) from the wire to
the Python classes, and no retry decision is made by matching message text."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pccl_py as pccl
from pccl_py.wire import protocol
from pccl_py.errors import FailureKind, error_class, failure_kind

PACKAGE = Path(pccl.__file__).parent


@pytest.mark.parametrize("kind", list(FailureKind), ids=str)
def test_every_kind_round_trips_through_its_class(kind: FailureKind) -> None:
    cls = error_class(kind)
    if kind in (FailureKind.NONE, FailureKind.RETRY):
        assert cls is pccl.PcclError  # not errors a caller sees
        return
    expected = FailureKind.PEER_LOST if kind is FailureKind.PEER_LEFT else kind
    assert failure_kind(cls("x")) is expected


def test_the_wire_carries_exactly_the_failure_kinds() -> None:
    assert set(protocol.FAILURE_KINDS) == {k.value for k in FailureKind}
    msg = protocol.make("outcome", epoch=1, tag=0, seq=0, ok=False, kind=FailureKind.PEER_LOST, msg="m", peer=-1,
                        next_epoch=2, world=3)
    decoded = protocol.decode(protocol.encode(msg), 1 << 20)
    assert FailureKind.parse(decoded["kind"]) is FailureKind.PEER_LOST
    assert FailureKind.parse("FromTheFuture") == "FromTheFuture"


def test_a_subclass_maps_to_its_own_kind() -> None:
    assert failure_kind(pccl.CollectiveMismatch("x")) is FailureKind.COLLECTIVE_MISMATCH
    assert failure_kind(pccl.ProtocolError("x")) is FailureKind.PROTOCOL


def test_no_module_decides_on_an_error_message() -> None:
    """`"..." in str(exc)` decided retries once; failure kinds replace it."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Compare)
                and any(isinstance(op, ast.In | ast.NotIn) for op in node.ops)
                and isinstance(node.left, ast.Constant)
                and isinstance(node.left.value, str)
                and any(
                    isinstance(c, ast.Call) and isinstance(c.func, ast.Name) and c.func.id == "str"
                    for c in node.comparators
                )
            ):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not offenders, offenders


def test_every_native_error_kind_is_a_failure_kind() -> None:
    """The engine's error kinds (pccl_py._native.ErrorKind) are named as the FailureKind
    they map onto, and error_kind_name() gives its wire value."""
    from pccl_py import _native

    for name, kind in _native.ErrorKind.__members__.items():
        assert FailureKind[name].value == _native.error_kind_name(kind)
