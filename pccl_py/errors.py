"""The exception hierarchy of pccl_py: one root, typed subclasses for what callers
handle differently. Every error names the peer, epoch, tag and step it concerns, when
known."""

from __future__ import annotations

import enum


class PcclError(Exception):
    """Root of every error pccl_py raises."""

    def __init__(
        self,
        message: str,
        *,
        peer: int | None = None,
        epoch: int | None = None,
        tag: int | None = None,
        step: int | None = None,
    ) -> None:
        super().__init__(message)
        self.peer = peer
        self.epoch = epoch
        self.tag = tag
        self.step = step


class PeerLost(PcclError):
    """A participant of the operation crashed, hung, or left; the op failed everywhere."""


class Timeout(PcclError, TimeoutError):
    """The operation did not finish within its timeout."""


class Aborted(PcclError):
    """The operation was aborted (by the caller, by close(), or by the master)."""


class Partitioned(Aborted):
    """This peer heard nothing from the master for `heartbeat_timeout` although its
    connection stayed up: a silent network partition cut it off (or the master hangs).
    The master evicts a peer it cannot hear within the same bound, so the peer leaves
    the group on its own: its calls end with this error at once, never by their timeout,
    and its inputs are intact. Rejoin with a new Communicator; the state comes from the
    group, whatever this peer's last op did."""


class ProtocolError(PcclError):
    """A peer or the master sent something that breaks the protocol, or peers disagree
    on an operation's shape (element count, dtype, operator)."""


class CollectiveMismatch(ProtocolError):
    """The members of a group were blocked in different collectives (say one in
    all_reduce(), another in sync_shared_state()), or in the same all-reduce step with
    different shapes, so none of them could ever complete. The master fails every one
    of those calls at once; the message names each peer's call. Inputs are intact, and
    the group stays usable: the next calls that match succeed."""


class AuthError(PcclError):
    """Authentication failed (wrong or missing shared secret)."""


class ConfigError(PcclError, ValueError):
    """Invalid configuration."""


class InvalidArgument(PcclError, ValueError):
    """An argument is invalid (unsupported dtype, size mismatch, ...)."""


class StateMismatch(PcclError):
    """Shared state disagrees in a way synchronisation cannot repair (revision rules)."""


class FailureKind(enum.StrEnum):
    """Why an op or a sync failed: the one encoding of failure kinds. The wire's "kind"
    fields carry these values, the native engine's error kinds map onto them
    (pccl_py._native.ErrorKind, checked by a test), and error_class() gives the Python
    class a caller sees. Retry decisions are made on these, never on message text."""

    NONE = ""
    PEER_LOST = "PeerLost"  # a participant crashed, hung, or its connection broke
    PEER_LEFT = "PeerLeft"  # a participant left gracefully before taking part: the survivors re-run
    TIMEOUT = "Timeout"
    ABORTED = "Aborted"
    PROTOCOL = "ProtocolError"
    INVALID_ARGUMENT = "InvalidArgument"
    COLLECTIVE_MISMATCH = "CollectiveMismatch"
    STATE_MISMATCH = "StateMismatch"
    RETRY = "Retry"  # a sync the master never saw (it restarted): ask again

    @classmethod
    def parse(cls, value: str) -> FailureKind | str:
        """The kind named by a wire value; an unknown value (a newer peer's) is kept as is."""
        try:
            return cls(value)
        except ValueError:
            return value


def error_class(kind: str) -> type[PcclError]:
    """The error class a caller sees for a failure of `kind` (PcclError if unknown)."""
    return _CLASSES.get(kind, PcclError)


def failure_kind(exc: PcclError) -> FailureKind:
    """The kind of a local error, as reported to the master."""
    for cls, kind in _KINDS:
        if isinstance(exc, cls):
            return kind
    return FailureKind.ABORTED


__all__ = [
    "Aborted",
    "AuthError",
    "CollectiveMismatch",
    "ConfigError",
    "FailureKind",
    "InvalidArgument",
    "PcclError",
    "PeerLost",
    "ProtocolError",
    "StateMismatch",
    "Timeout",
    "error_class",
    "failure_kind",
]

_CLASSES: dict[str, type[PcclError]] = {
    FailureKind.PEER_LOST: PeerLost,
    FailureKind.PEER_LEFT: PeerLost,
    FailureKind.TIMEOUT: Timeout,
    FailureKind.ABORTED: Aborted,
    FailureKind.PROTOCOL: ProtocolError,
    FailureKind.INVALID_ARGUMENT: InvalidArgument,
    FailureKind.COLLECTIVE_MISMATCH: CollectiveMismatch,
    FailureKind.STATE_MISMATCH: StateMismatch,
}
# Most specific first: CollectiveMismatch is a ProtocolError.
_KINDS: tuple[tuple[type[PcclError], FailureKind], ...] = (
    (CollectiveMismatch, FailureKind.COLLECTIVE_MISMATCH),
    (StateMismatch, FailureKind.STATE_MISMATCH),
    (PeerLost, FailureKind.PEER_LOST),
    (Timeout, FailureKind.TIMEOUT),
    (Aborted, FailureKind.ABORTED),
    (ProtocolError, FailureKind.PROTOCOL),
    (InvalidArgument, FailureKind.INVALID_ARGUMENT),
)
