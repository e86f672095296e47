"""pccl_py: fault-tolerant collective communication over plain TCP."""

from pccl_py.errors import (
    Aborted,
    AuthError,
    ConfigError,
    InvalidArgument,
    PcclError,
    PeerLost,
    ProtocolError,
    StateMismatch,
    Timeout,
)

__version__ = "0.1.0"

__all__ = [
    "Aborted",
    "AuthError",
    "ConfigError",
    "InvalidArgument",
    "PcclError",
    "PeerLost",
    "ProtocolError",
    "StateMismatch",
    "Timeout",
]
