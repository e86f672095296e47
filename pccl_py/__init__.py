"""pccl_py: fault-tolerant collective communication over plain TCP.

    import pccl_py as pccl
    comm = pccl.Communicator(master="127.0.0.1:48148").connect()
    info = comm.all_reduce(tensor, op=pccl.ReduceOp.AVG, retry=True)
"""

from pccl_py.config import Config
from pccl_py.errors import (
    Aborted,
    AuthError,
    CollectiveMismatch,
    ConfigError,
    InvalidArgument,
    Partitioned,
    PcclError,
    PeerLost,
    ProtocolError,
    StateMismatch,
    Timeout,
)
from pccl_py.master.server import Master
from pccl_py.peer.communicator import AllReduceHandle, Communicator, P2PHandle
from pccl_py.peer.group import join_group
from pccl_py.peer.shared_state import SharedState, SyncInfo
from pccl_py.types import Compression, GatherInfo, P2PInfo, Quantization, ReduceInfo, ReduceOp, SyncStrategy

__version__ = "0.1.0"

__all__ = [
    "Aborted",
    "AllReduceHandle",
    "AuthError",
    "CollectiveMismatch",
    "Communicator",
    "Compression",
    "Config",
    "ConfigError",
    "GatherInfo",
    "InvalidArgument",
    "Master",
    "P2PHandle",
    "P2PInfo",
    "Partitioned",
    "PcclError",
    "PeerLost",
    "ProtocolError",
    "Quantization",
    "ReduceInfo",
    "ReduceOp",
    "SharedState",
    "StateMismatch",
    "SyncInfo",
    "SyncStrategy",
    "Timeout",
    "join_group",
]
