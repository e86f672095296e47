"""The exception hierarchy of pccl_py: one root, typed subclasses for what callers
handle differently. Every error names the peer, epoch, tag and step it concerns, when
known."""

from __future__ import annotations


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


__all__ = [
    "Aborted",
    "AuthError",
    "CollectiveMismatch",
    "ConfigError",
    "InvalidArgument",
    "PcclError",
    "PeerLost",
    "ProtocolError",
    "StateMismatch",
    "Timeout",
]
