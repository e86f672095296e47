"""pccl_py native data plane (private; use pccl_py.Communicator).

Typed description of the pybind11 module built from bindings/module.cpp.
tests/test_native_stub.py checks it against the built module: keep the two in step.
"""

from collections.abc import Sequence
from typing import Any, ClassVar, Final, Literal, TypeAlias

# Any object exporting a C-contiguous buffer (numpy array, bytearray, memoryview, ...).
# It is held, zero-copy, until the op that took it finishes.
_Buffer: TypeAlias = Any

PROTOCOL_VERSION: Final[int]
MAX_FRAME_PAYLOAD: Final[int]
HELLO_MAGIC: Final[int]
FRAME_MAGIC: Final[int]
FRAME_TYPE_GOODBYE: Final[int]
HELLO_SIZE: Final[int]
HELLO_ACK_SIZE: Final[int]
HELLO_AUTH: Final[int]
HELLO_STATUS_AUTH_FAILED: Final[int]
AUTH_PROOF_SIZE: Final[int]
AUTH_RESULT_SIZE: Final[int]
FRAME_HEADER_SIZE: Final[int]
HELLO_STATUS_OK: Final[int]
NONCE_BYTES: Final[int]
MAC_BYTES: Final[int]
# The layouts of native/include/pccl/wire.hpp in struct notation (checked against the C++
# structs when the module is built) and the labels each side's handshake MAC starts with:
# MAC = HMAC-SHA256(secret, label + struct.pack(HANDSHAKE_TRANSCRIPT_FORMAT, ...)).
HELLO_FORMAT: Final[str]
HELLO_ACK_FORMAT: Final[str]
AUTH_PROOF_FORMAT: Final[str]
AUTH_RESULT_FORMAT: Final[str]
HANDSHAKE_TRANSCRIPT_FORMAT: Final[str]
HANDSHAKE_CONNECTOR_LABEL: Final[bytes]
HANDSHAKE_ACCEPTOR_LABEL: Final[bytes]
FRAME_HEADER_FORMAT: Final[str]
STATE_REQUEST_FORMAT: Final[str]
CUDA_BUILT: Final[bool]
"""Whether the module was built with the CUDA kernels (cuda_quantize/cuda_dequantize)."""

class ErrorKind:
    """Why a native op failed; each member is named as the pccl_py FailureKind it maps onto."""

    NONE: ClassVar[ErrorKind]
    PEER_LOST: ClassVar[ErrorKind]
    TIMEOUT: ClassVar[ErrorKind]
    ABORTED: ClassVar[ErrorKind]
    PROTOCOL: ClassVar[ErrorKind]
    INVALID_ARGUMENT: ClassVar[ErrorKind]
    __members__: ClassVar[dict[str, ErrorKind]]
    def __init__(self, value: int) -> None: ...
    def __eq__(self, other: object, /) -> bool: ...
    def __ne__(self, other: object, /) -> bool: ...
    def __hash__(self) -> int: ...
    def __int__(self) -> int: ...
    def __index__(self) -> int: ...
    def __getstate__(self) -> int: ...
    def __setstate__(self, state: int, /) -> None: ...
    @property
    def name(self) -> str: ...
    @property
    def value(self) -> int: ...

def error_kind_name(kind: ErrorKind) -> str:
    """The stable name of a native error kind: its pccl_py FailureKind value and error class ("" for NONE)."""

class DataType:
    """Element type of a buffer."""

    FLOAT16: ClassVar[DataType]
    BFLOAT16: ClassVar[DataType]
    FLOAT32: ClassVar[DataType]
    FLOAT64: ClassVar[DataType]
    INT8: ClassVar[DataType]
    INT16: ClassVar[DataType]
    INT32: ClassVar[DataType]
    INT64: ClassVar[DataType]
    UINT8: ClassVar[DataType]
    UINT16: ClassVar[DataType]
    UINT32: ClassVar[DataType]
    UINT64: ClassVar[DataType]
    __members__: ClassVar[dict[str, DataType]]
    def __init__(self, value: int) -> None: ...
    def __eq__(self, other: object, /) -> bool: ...
    def __ne__(self, other: object, /) -> bool: ...
    def __hash__(self) -> int: ...
    def __int__(self) -> int: ...
    def __index__(self) -> int: ...
    def __getstate__(self) -> int: ...
    def __setstate__(self, state: int, /) -> None: ...
    @property
    def name(self) -> str: ...
    @property
    def value(self) -> int: ...

class ReduceOp:
    """Reduction applied by all_reduce."""

    SUM: ClassVar[ReduceOp]
    AVG: ClassVar[ReduceOp]
    PROD: ClassVar[ReduceOp]
    MIN: ClassVar[ReduceOp]
    MAX: ClassVar[ReduceOp]
    __members__: ClassVar[dict[str, ReduceOp]]
    def __init__(self, value: int) -> None: ...
    def __eq__(self, other: object, /) -> bool: ...
    def __ne__(self, other: object, /) -> bool: ...
    def __hash__(self) -> int: ...
    def __int__(self) -> int: ...
    def __index__(self) -> int: ...
    def __getstate__(self) -> int: ...
    def __setstate__(self, state: int, /) -> None: ...
    @property
    def name(self) -> str: ...
    @property
    def value(self) -> int: ...

class CollectiveKind:
    """The all-to-all collectives other than the all-reduce (part of their shape digest)."""

    ALL_GATHER: ClassVar[CollectiveKind]
    REDUCE_SCATTER: ClassVar[CollectiveKind]
    BROADCAST: ClassVar[CollectiveKind]
    BROADCAST_DIRECT: ClassVar[CollectiveKind]
    ALL_TO_ALL: ClassVar[CollectiveKind]
    __members__: ClassVar[dict[str, CollectiveKind]]
    def __init__(self, value: int) -> None: ...
    def __eq__(self, other: object, /) -> bool: ...
    def __ne__(self, other: object, /) -> bool: ...
    def __hash__(self) -> int: ...
    def __int__(self) -> int: ...
    def __index__(self) -> int: ...
    def __getstate__(self) -> int: ...
    def __setstate__(self, state: int, /) -> None: ...
    @property
    def name(self) -> str: ...
    @property
    def value(self) -> int: ...

class AllReduceAlgorithm:
    """How an unquantized all-reduce moves its bytes (part of its shape digest)."""

    RING: ClassVar[AllReduceAlgorithm]
    DIRECT: ClassVar[AllReduceAlgorithm]
    DIRECT_RSAG: ClassVar[AllReduceAlgorithm]
    __members__: ClassVar[dict[str, AllReduceAlgorithm]]
    def __init__(self, value: int) -> None: ...
    def __eq__(self, other: object, /) -> bool: ...
    def __ne__(self, other: object, /) -> bool: ...
    def __hash__(self) -> int: ...
    def __int__(self) -> int: ...
    def __index__(self) -> int: ...
    def __getstate__(self) -> int: ...
    def __setstate__(self, state: int, /) -> None: ...
    @property
    def name(self) -> str: ...
    @property
    def value(self) -> int: ...

class QuantKind:
    """Wire quantization of an all-reduce."""

    NONE: ClassVar[QuantKind]
    MINMAX: ClassVar[QuantKind]
    ZEROPOINT: ClassVar[QuantKind]
    __members__: ClassVar[dict[str, QuantKind]]
    def __init__(self, value: int) -> None: ...
    def __eq__(self, other: object, /) -> bool: ...
    def __ne__(self, other: object, /) -> bool: ...
    def __hash__(self) -> int: ...
    def __int__(self) -> int: ...
    def __index__(self) -> int: ...
    def __getstate__(self) -> int: ...
    def __setstate__(self, state: int, /) -> None: ...
    @property
    def name(self) -> str: ...
    @property
    def value(self) -> int: ...

def auto_pool_size(rtt_seconds: float, send_buffer_bytes: int, sharers: int) -> int:
    """Connections per pool that connections_per_peer=0 gives a peer at this round trip, with this send
    buffer (SO_SNDBUF as the kernel reports it), when `sharers` pools open together for one epoch."""

def auto_pacing_rate(sharers: int, pool_size: int) -> int:
    """The pacing cap (bytes/s, SO_MAX_PACING_RATE) of each connection of an auto-sized pool of
    `pool_size` opened with `sharers` pools; 0: not paced (a pool of one)."""

def cuda_available() -> bool:
    """Whether the CUDA kernels can run here (always False when CUDA_BUILT is False)."""

# Bound only when CUDA_BUILT is True. src/dst are device addresses (e.g. tensor.data_ptr()).
def cuda_quantize(kind: QuantKind, wire: DataType, dtype: DataType, src: int, count: int, dst: int) -> None:
    """Encode `count` elements at device address src into device address dst (synchronous)."""

def cuda_dequantize(kind: QuantKind, wire: DataType, dtype: DataType, src: int, count: int, dst: int) -> None:
    """Decode an encoded run at device address src into `count` elements at dst (synchronous)."""

def element_size(dtype: DataType, /) -> int:
    """Bytes per element of `dtype`."""

def hmac_sha256(key: bytes, data: bytes) -> bytes:
    """HMAC-SHA256 as the handshake computes it (for tests)."""

def populate(buffer: _Buffer) -> bool:
    """Fault the buffer's pages in writable without changing a byte, as the engine does ahead of a
    receive (MADV_POPULATE_WRITE); False when the kernel cannot (for tests)."""

def prefault(buffer: _Buffer) -> int:
    """Make the buffer's pages resident ahead of bytes that will land in it, as the engine does ahead
    of a receive (huge-page advice where nothing is mapped, then MADV_POPULATE_WRITE where cheap),
    without changing a byte; blocks, without the GIL. Returns the bytes populated (0 where the
    kernel cannot, or for buffers under 4 MiB)."""

def quant_encoded_bytes(kind: QuantKind, wire: DataType, dtype: DataType, count: int) -> int:
    """Bytes of `count` elements of `dtype` quantized to `wire` (uint8/uint16) by `kind`."""

def quantize(kind: QuantKind, wire: DataType, dtype: DataType, src: _Buffer, dst: _Buffer) -> None:
    """Encode src (elements of dtype) into dst (quant_encoded_bytes bytes), as the all-reduce does."""

def dequantize(kind: QuantKind, wire: DataType, dtype: DataType, src: _Buffer, dst: _Buffer) -> None:
    """Decode src (an encoded run) into dst (elements of dtype)."""

class OpHandle:
    """A running op; made by Engine, not constructible from Python."""

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the op finishes or `timeout` seconds pass; returns whether it finished."""

    def result(self, timeout: float | None = None) -> None:
        """Wait, then raise the op's error if it failed."""

    def done(self) -> bool: ...
    def abort(self, reason: str = "aborted by caller", keep_idle_to: Sequence[int] = []) -> None:
        """Fails the op with Aborted (no-op once it ended). keep_idle_to: the peers of the epoch that
        replaces the op's; connections to them that hold nothing of the op stay open for it."""

class AllReduceHandle(OpHandle):
    """Handle of Engine.all_reduce; dropping it aborts a running op."""

    def settle(self, commit: bool) -> None:
        """For defer_commit in-place ops: keep the result (commit=True; only an op that
        succeeded or voted has one) or put the input back."""

    @property
    def tx_bytes(self) -> int: ...
    @property
    def rx_bytes(self) -> int: ...
    @property
    def key(self) -> tuple[int, int, int]:
        """The op's (epoch, tag, seq)."""

    @property
    def voted(self) -> bool:
        """Whether this peer cast its commit vote (it held the complete result)."""

class P2PHandle(OpHandle):
    """Handle of Engine.send / Engine.recv; holds the buffer, dropping it aborts a running op."""

    @property
    def peer(self) -> int | None:
        """The other peer: the destination, the source, or (a receive from any peer) the
        sender once matched (None until then)."""

    @property
    def nbytes(self) -> int: ...
    @property
    def tag(self) -> int: ...
    @property
    def epoch(self) -> int: ...
    @property
    def tx_bytes(self) -> int: ...
    @property
    def rx_bytes(self) -> int: ...

class StateExposure:
    """Buffers served to fetching peers until close() (or garbage collection)."""

    @property
    def id(self) -> int: ...
    def close(self) -> int:
        """Stop serving; returns the bytes served."""

class FetchHandle(OpHandle):
    """Handle of Engine.fetch_state."""

    @property
    def rx_bytes(self) -> int:
        """Bytes received so far (the total once done)."""

    @property
    def source(self) -> int:
        """Peer id the state is fetched from."""

class Engine:
    """One peer's data plane: a listening socket, the ring connections and the ops on them."""

    def __init__(
        self,
        peer_id: int,
        host: str = "127.0.0.1",
        port: int = 0,
        connections_per_peer: int = 1,
        segment_bytes: int = 524288,
        socket_buffer_bytes: int = 0,
        mailbox_limit_bytes: int = 268435456,
        secret: bytes = b"",
        zero_copy: bool = True,
        prefault: bool = True,
        shared_memory: bool = True,
        ring_bytes: int = 8388608,
        congestion_control: str = "bbr",
    ) -> None: ...
    @property
    def port(self) -> int: ...
    def pool_size(self, peer: int) -> int: ...
    @property
    def zero_copy_bytes(self) -> int:
        """Payload bytes sent by reference (vmsplice + splice) instead of copied."""
    @property
    def shared_memory_bytes(self) -> int:
        """Payload bytes sent through shared-memory rings to peers on this host instead of TCP."""
    @property
    def congestion_control(self) -> str:
        """The TCP congestion control of this engine's data connections (the one asked for, or the host's default)."""
    @property
    def congestion_control_note(self) -> str:
        """Why the congestion control asked for is not in use; empty when it is (or none was asked for)."""
    @property
    def send_buffer_max(self) -> int:
        """The largest send buffer a data connection can have, in the kernel's bytes (about 2/3 carry payload)."""
    @property
    def recv_buffer_max(self) -> int:
        """The largest receive buffer a data connection can have, in the kernel's bytes."""
    @property
    def connections_opened(self) -> int:
        """Outgoing data-plane connections opened so far (every pool, every epoch)."""
    @property
    def connections_kept(self) -> int:
        """Outgoing connections kept across a re-ring for the new epoch (confirmed by the peer)."""
    @property
    def padding_bytes(self) -> int:
        """Padding bytes sent by pools warming ahead of their epoch (prepare)."""
    @property
    def state_rx_bytes(self) -> int:
        """State bytes received so far (the payload of state-data frames)."""
    @property
    def padding_rx_bytes(self) -> int:
        """Padding bytes received so far (from peers' pools warming ahead of a join)."""
    @property
    def connect_seconds(self) -> float:
        """Wall seconds callers waited for connection pools to open (connect + handshake)."""
    @property
    def prefaulted_bytes(self) -> int:
        """Bytes of receive destinations faulted in ahead of their payloads (prefault=True)."""
    @property
    def peer_id(self) -> int: ...
    def set_ring(
        self,
        epoch: int,
        ring: Sequence[tuple[int, str, int]],
        rank: int,
        timeout: float | None = None,
        connect_all: bool = False,
    ) -> None:
        """Install the ring of `epoch` ((peer_id, host, port) in ring order) and connect to the next peer
        (connect_all: to every peer of the ring, all at once)."""

    def all_reduce(
        self,
        input: _Buffer,
        output: _Buffer,
        dtype: DataType,
        op: ReduceOp,
        tag: int = 0,
        seq: int = 0,
        timeout: float | None = None,
        connect_timeout: float | None = None,
        segment_bytes: int = 0,
        defer_commit: bool = False,
        quantization: QuantKind = QuantKind.NONE,
        quant_dtype: DataType = DataType.UINT8,
        vote: bool = False,
        algorithm: AllReduceAlgorithm = AllReduceAlgorithm.RING,
    ) -> AllReduceHandle:
        """Start a ring all-reduce of `input` into `output` (the same object: in place).

        quantization != NONE: quantized to quant_dtype (UINT8/UINT16), SUM/AVG of floats only.
        algorithm (unquantized only; every peer must pass the same): RING, or DIRECT (every
        peer sends its input to every other and reduces all N in rank order; all-to-all vote),
        or DIRECT_RSAG (chunk c goes straight to rank c, which reduces the N contributions in
        rank order and sends the result to every other peer; all-to-all vote).
        vote: succeed only once every peer holds the result (handle.voted, settle(True)).
        A voting op (out of place, or in place with defer_commit) sends large payloads by
        reference: leave both buffers alone until it has ended (committed or settled). In
        place with defer_commit, a voting op that fails puts its input back at settle(False)
        (or when the handle is dropped), not when it fails.
        """

    def all_to_all(
        self,
        kind: CollectiveKind,
        input: _Buffer,
        output: _Buffer,
        dtype: DataType,
        op: ReduceOp = ReduceOp.SUM,
        tag: int = 0,
        seq: int = 0,
        timeout: float | None = None,
        connect_timeout: float | None = None,
        segment_bytes: int = 0,
        vote: bool = False,
        root: int = 0,
    ) -> AllReduceHandle:
        """Start an all-gather, reduce-scatter, broadcast or all-to-all (kind) over every peer of the ring.

        ALL_GATHER: output holds N x input, row r from rank r. REDUCE_SCATTER: output holds
        this rank's chunk of the input's reduction by `op` (the ring's N chunks, the first
        count % N one element larger), reduced in rank order. BROADCAST (root scatters,
        owners pass on) / BROADCAST_DIRECT (root sends everything): rank `root`'s input lands
        in every other rank's output (one buffer as both: in place). ALL_TO_ALL: the input holds
        N equal blocks (count a multiple of N), block d goes to rank d; row s of the output (as
        large as the input; one buffer as both: in place) is rank s's block r. Every peer must
        pass the same kind, count, dtype, op and root (else ProtocolError). vote: succeed only once
        every peer holds its result. A failed op leaves the input intact, the output undefined.
        """

    def send(
        self,
        buffer: _Buffer,
        peer: int,
        tag: int = 0,
        timeout: float | None = None,
        connect_timeout: float | None = None,
    ) -> P2PHandle:
        """Send buffer's bytes to `peer` of the current ring with a 64-bit tag (the k-th
        send to a peer with a tag matches its k-th receive from this peer with that tag).
        Raises PeerLost / Timeout / Aborted, or ProtocolError when the sizes differ."""

    def recv(
        self,
        buffer: _Buffer,
        peer: int | None = None,
        tag: int = 0,
        timeout: float | None = None,
        connect_timeout: float | None = None,
    ) -> P2PHandle:
        """Receive exactly len(buffer) bytes from `peer` (None: any peer of the ring)."""

    def disconnect(self, peer: int, reason: str = "disconnected by caller") -> None: ...
    def next_event(
        self, timeout: float | None = None
    ) -> tuple[Literal["peer_disconnected"], int, str] | None:
        """The next (kind, peer, reason) event, or None if none came within `timeout`."""

    def live_connections(self, peer: int, epoch: int) -> int: ...
    def state_round_trip(self, source: int) -> float:
        """Seconds: the smallest round trip any connection to `source` has measured (0: none)."""
    def clamp_state_windows(self, sources: Sequence[int], window_bytes: int, starting: bool = False) -> int:
        """Bound the receive windows of the state-transfer connections to `sources` to about `window_bytes` together (TCP_WINDOW_CLAMP, each its share: of those that carried bytes since the last call, or with `starting` (a fetch starts) of those that ever carried state, all if none has); returns the connections clamped."""
    def expose_state(self, buffers: list[_Buffer]) -> StateExposure:
        """Serve these buffers (entry i = buffers[i]) to fetching peers until close()."""

    def prepare(
        self,
        peers: Sequence[tuple[int, str, int]],
        epoch: int,
        sharers: int,
        timeout: float | None = None,
        warm_seconds: float = 0.0,
        warm_bytes: int = 0,
        warm_min_rtt: float = 0.0,
    ) -> None:
        """Open pools of `epoch` to every (peer, host, port) ahead of the epoch that needs them, then warm
        those whose round trip is warm_min_rtt or more with padding (up to warm_seconds / warm_bytes) until
        TCP leaves slow start or the connection carries an op's first frame."""

    def connect_state_sources(self, sources: Sequence[tuple[int, str, int]], timeout: float | None = None) -> None:
        """Open the state-transfer connections to every (peer, host, port) at once (before fetch_state)."""

    def fetch_state(
        self,
        source: int,
        host: str,
        port: int,
        exposure: int,
        dsts: list[_Buffer],
        chunks: Sequence[tuple[int, int, int, int, int]],
        timeout: float | None = None,
    ) -> FetchHandle:
        """Fetch (entry, offset, length, dst index, dst offset) chunks of a peer's exposure into dsts."""

    def inject_fault(self, kind: str, count: int = 1) -> None:
        """Test-only: 'corrupt_state' flips a byte in the next served chunks; 'withhold_vote': the
        next voting ops cast their commit vote without sending it."""

    def close(self) -> None: ...

class WanRelay:
    """The WAN emulator's packet relay between TUN devices (pccl_py.tools.wan drives it)."""

    def __init__(
        self, tun_fds: Sequence[int], addresses: Sequence[int], seed: int = 0, max_pending_bytes: int = 536870912
    ) -> None: ...
    def start(self) -> None: ...
    def close(self) -> None:
        """Stop the relay thread and drop what is pending (idempotent)."""

    @property
    def hosts(self) -> int: ...
    def set_link(
        self,
        src: int,
        dst: int,
        delay_s: float,
        jitter_s: float = 0.0,
        rate_bits: int = 0,
        loss: float = 0.0,
        queue_s: float = 0.05,
    ) -> None: ...
    def link(self, src: int, dst: int) -> tuple[float, float, int, float, float]: ...
    def set_host(
        self, host: int, up_bits: int = 0, down_bits: int = 0, up_queue_s: float = 0.05, down_queue_s: float = 0.05
    ) -> None:
        """Set host's access link: uplink and downlink rates (bits/s, 0: unlimited), shared by all
        its pairs, each with a drop-tail queue (seconds at its rate)."""

    def host(self, host: int) -> tuple[int, int, float, float]:
        """(up_bits, down_bits, up_queue_s, down_queue_s) of host's access link."""

    def set_partitioned(self, host: int, on: bool) -> None: ...
    def set_link_partitioned(self, src: int, dst: int, on: bool) -> None: ...
    def stats(self) -> dict: ...  # type: ignore[type-arg]
